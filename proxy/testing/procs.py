"""Real `teamup-proxy serve` processes for tests that need more than one replica or worker."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

from proxy.web.auth import hash_key

from .e2e import ADMIN_KEY, KEY, OTHER_KEY, TOKEN
from .support import free_port, wait_for_port

__all__ = ["ProxyProcess", "proxy_env"]


def proxy_env(**values: Any) -> dict[str, str]:
    """This environment without PROXY_* variables, plus `values` as PROXY_<NAME>."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    env["PROXY_SECRETS_DIR"] = "/nonexistent"
    for name, value in values.items():
        env[name if name.startswith("PROXY_") else f"PROXY_{name.upper()}"] = str(value)
    return env


class ProxyProcess:
    """`python -m proxy serve` on a free port, with the test clients and the mock as upstream."""

    def __init__(self, upstream_url: str, *, workers: int = 1, **settings: Any) -> None:
        self.port = free_port()
        self.workers = workers
        values: dict[str, Any] = {
            "upstream_url": upstream_url,
            "upstream_token": TOKEN,
            "clients": (
                f'{{"billing": {{"key_sha256": "{hash_key(KEY)}", "rate": "100000/second"}},'
                f' "crm": {{"key_sha256": "{hash_key(OTHER_KEY)}", "rate": "100000/second"}}}}'
            ),
            "admin_key_sha256": hash_key(ADMIN_KEY),
            "upstream_rate_limit": "100000/second",
            "upstream_burst": 10000,
            "log_format": "json",
            "redis_retry_interval": 0.2,
        }
        values.update(settings)
        if "upstreams" in settings and "upstream_token" not in settings:
            del values["upstream_token"]  # several credentials replace the single one
        self.env = proxy_env(**values)
        self.process: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Future[None] | None = None
        self.stderr = b""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> ProxyProcess:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        self._drain = asyncio.ensure_future(self._read_stderr())
        await asyncio.to_thread(wait_for_port, self.port, 30)
        return self

    async def _read_stderr(self) -> None:
        """Keep reading the logs, so a busy proxy never blocks on a full pipe."""
        assert self.process is not None and self.process.stderr is not None
        while chunk := await self.process.stderr.read(65536):
            self.stderr += chunk

    async def stop(self, sig: int = signal.SIGTERM, wait: float = 60) -> int:
        """Signal the process and wait; returns its exit code (stderr kept in `self.stderr`)."""
        assert self.process is not None
        if self.process.returncode is None:
            if sig == signal.SIGKILL:  # the whole group: a supervisor's workers too
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.send_signal(sig)
        try:
            code = await asyncio.wait_for(self.process.wait(), wait)
        except TimeoutError:
            # Still running after `wait` seconds: kill it so the session goes on, say so, and
            # return -9 (a test that asserts a clean drain, `== 0`, still fails).
            os.killpg(self.process.pid, signal.SIGKILL)
            code = await self.process.wait()
            tail = self.stderr.decode(errors="replace").splitlines()[-20:]
            print(f"proxy on :{self.port} ignored signal {sig} for {wait:g} s; killed", *tail)
        if self._drain is not None:
            await self._drain
        return code

    async def __aenter__(self) -> ProxyProcess:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None and self.process.returncode is None:
            await self.stop(signal.SIGKILL if exc[0] is not None else signal.SIGTERM)
