"""The processes a run starts (redis, mock TeamUp, our proxy, NGINX) and what /proc says of them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from proxy.testing.support import free_port, wait_for_port
from proxy.web.auth import hash_key

__all__ = [
    "REPORT_PATH",
    "ROOT",
    "Ceiling",
    "Mock",
    "Nginx",
    "Ours",
    "Redis",
    "Service",
    "Varnish",
    "cpu_seconds",
    "http_get",
    "rss_bytes",
]

ROOT = Path(__file__).resolve().parent.parent
REPORT_PATH = "/api/v2/reports/customer_credits/data"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
# Rates no bench load can reach: the limiters still run on every request, they just never say no.
_UNLIMITED = "1000000/second"


def _stat_fields(pid: int) -> list[str] | None:
    """`/proc/<pid>/stat` after the command name (field 3 onwards), or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def children(pid: int) -> list[int]:
    """The live direct children of `pid`."""
    found = []
    for candidate in _all_pids():
        fields = _stat_fields(candidate)
        if fields is not None and int(fields[1]) == pid:
            found.append(candidate)
    return sorted(found)


def group_members(pgid: int) -> list[int]:
    """The live processes of process group `pgid`."""
    found = []
    for candidate in _all_pids():
        fields = _stat_fields(candidate)
        if fields is not None and int(fields[2]) == pgid:
            found.append(candidate)
    return found


def cpu_seconds(pids: Iterable[int]) -> float:
    """User plus system CPU time the processes have used so far (vanished ones count 0)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / _CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size now (`VmRSS`), 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def listening_sockets(port: int) -> int:
    """How many TCP sockets listen on 127.0.0.1:port (one per SO_REUSEPORT worker)."""
    wanted = f"0100007F:{port:04X}"
    count = 0
    with contextlib.suppress(FileNotFoundError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[1] == wanted and parts[3] == "0A":
                count += 1
    return count


def http_get(
    url: str, headers: Mapping[str, str] | None = None, *, method: str = "GET", body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """A small blocking request for control traffic (never for measurements)."""
    request = urllib.request.Request(
        url, data=body or None, headers=dict(headers or {}), method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


class Service:
    """One child process in a session of its own, its output in a log file, stopped by its id."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.proc.pid

    def spawn(self, argv: list[str], env: Mapping[str, str] | None = None) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=self.workdir,
                start_new_session=True,  # Ctrl-C reaches the bench, which stops us in order
            )

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """Signal the process, wait, then SIGKILL whatever is left of its process group."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        for pid in group_members(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def server_pids(self) -> list[int]:
        """The processes whose CPU counts as this server's."""
        return [self.pid, *children(self.pid)]

    def worker_pids(self) -> list[int]:
        """The processes that serve requests (their RSS is what a worker costs)."""
        return [self.pid]


class Redis(Service):
    """`redis-server` on a free loopback port (never 6379), no persistence."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("redis", workdir)
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "redis-server"
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        self.spawn([*argv, "--appendonly", "no", "--dir", str(self.workdir)])
        wait_for_port(self.port)


class Mock(Service):
    """The mock TeamUp (`proxy.testing.mock`) with a fixed latency."""

    def __init__(self, workdir: Path, token: str, latency: float, seed: int) -> None:
        super().__init__("mock", workdir)
        self.port = free_port()
        self.token = token
        self.latency = latency
        self.seed = seed

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [sys.executable, "-m", "proxy.testing.mock", "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--token", self.token]
        argv += ["--latency", str(self.latency), "--seed", str(self.seed)]
        self.spawn(argv, _child_env({}))
        wait_for_port(self.port, timeout=30)

    def calls(self) -> int:
        status, _, body = http_get(f"{self.base}/_mock/state")
        if status != 200:
            raise RuntimeError(f"mock state answered {status}")
        calls: int = json.loads(body)["calls"]
        return calls

    def reset(self) -> None:
        """Forget calls and recorded requests; reset also clears latency, so set it again."""
        http_get(f"{self.base}/_mock/reset", method="POST")
        payload = json.dumps({"latency": self.latency}).encode()
        status, _, body = http_get(f"{self.base}/_mock/faults", method="PUT", body=payload)
        if status != 200 or json.loads(body)["latency"] != self.latency:
            raise RuntimeError(f"could not set the mock's latency: {status} {body[:200]!r}")


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This environment without any PROXY_* of the caller's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


class Ours(Service):
    """`python -m proxy serve --workers N` on Redis, in front of the mock."""

    def __init__(
        self,
        workdir: Path,
        redis: Redis,
        mock: Mock,
        client_key: str,
        workers: int,
        *,
        name: str = "ours",
        log_level: str = "WARNING",
    ) -> None:
        super().__init__(name, workdir)
        self.port = free_port()
        self.redis = redis
        self.mock = mock
        self.client_key = client_key
        self.workers = workers
        self.log_level = log_level

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        clients = {"bench": {"key_sha256": hash_key(self.client_key), "rate": _UNLIMITED}}
        return _child_env(
            {
                "PROXY_UPSTREAM_URL": self.mock.base,
                "PROXY_UPSTREAM_TOKEN": self.mock.token,
                "PROXY_REDIS_URL": self.redis.url,
                "PROXY_CLIENTS": json.dumps(clients),
                "PROXY_RATE_LIMIT": _UNLIMITED,
                "PROXY_UPSTREAM_RATE_LIMIT": _UNLIMITED,
                "PROXY_CACHE_TTL": "300",
                "PROXY_LOG_LEVEL": self.log_level,
                # The workdir has no .env; this keeps a machine's /run/secrets out as well.
                "PROXY_SECRETS_DIR": str(self.workdir / "no-secrets"),
                # BENCH_PROXY_<NAME>=value sets PROXY_<NAME> for our proxy (before/after runs).
                **{
                    name.removeprefix("BENCH_"): value
                    for name, value in os.environ.items()
                    if name.startswith("BENCH_PROXY_")
                },
            }
        )

    def start(self, code: Path | None = None) -> None:
        """Start it; `code` (or `BENCH_CODE`) runs the proxy from another checkout (a `git
        archive` of an older commit, for before/after runs)."""
        argv = [sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--workers", str(self.workers)]
        env = self.environment()
        code = code or (Path(os.environ["BENCH_CODE"]) if os.environ.get("BENCH_CODE") else None)
        if code is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(code), env["PYTHONPATH"]])
        self.spawn(argv, env)
        deadline = time.monotonic() + 60
        while listening_sockets(self.port) < self.workers or len(self.worker_pids()) < self.workers:
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"our proxy did not start {self.workers} workers in 60 s")
            time.sleep(0.05)
        for _ in range(4 * self.workers):  # reach every worker (SO_REUSEPORT spreads new ones)
            status, _, body = http_get(f"{self.base}/readyz")
            if status != 200:
                raise RuntimeError(f"our /readyz answered {status}: {body[:200]!r}")

    def worker_pids(self) -> list[int]:
        """The supervisor's children, without multiprocessing's resource tracker."""
        if self.workers == 1:  # `serve --workers 1` serves in the process itself
            return [self.pid]
        return [pid for pid in children(self.pid) if "resource_tracker" not in _cmdline(pid)]


_NGINX_CONF = """\
# Written by bench/procs.py: NGINX proxy_cache set up like teamup-proxy (TTL 300 s, collapse on).
{user}worker_processes {workers};
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
    proxy_cache_path {cache} levels=1:2 keys_zone=teamup:16m max_size=1g inactive=60m
                     use_temp_path=off;
    upstream teamup {{
        server 127.0.0.1:{mock_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=2048;
        location = /_bench/ping {{ return 204; }}
        # Inherited by both locations below (neither sets a proxy_set_header or add_header).
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host 127.0.0.1:{mock_port};
        proxy_set_header Authorization "Token {token}";
        proxy_cache teamup;
        proxy_cache_key $request_uri;
        proxy_cache_valid 200 300s;
        proxy_cache_lock on;
        proxy_cache_lock_timeout 15s;
        proxy_cache_lock_age 15s;
        proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;
        proxy_cache_background_update on;
        add_header X-Cache-Status $upstream_cache_status always;
        location ~ ^/api/v2/reports/[a-z_.]+/data$ {{
            proxy_pass http://teamup;
        }}
        # Every other TeamUp read (lists, retrieves, …), as the proxy routes them.
        location /api/v2/ {{
            proxy_pass http://teamup;
            # Lists carry absolute `next` / `previous` links on TeamUp's host: pointed back at
            # NGINX (as the proxy does), or a visitor following them would call TeamUp itself.
            # The cache keeps TeamUp's bytes; the rewrite runs on every answer sent. (The mock
            # never compresses, so the bodies are plain text to sub_filter.)
            sub_filter "http://127.0.0.1:{mock_port}/api/" "http://127.0.0.1:{port}/api/";
            sub_filter_once off;
            sub_filter_types application/json application/xml;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    """`nginx` on PATH, or where Debian puts it (/usr/sbin is not on every user's PATH)."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


class Nginx(Service):
    """NGINX with `proxy_cache`, in the foreground (`daemon off`), everything in its workdir."""

    def __init__(self, workdir: Path, mock: Mock, workers: int) -> None:
        super().__init__("nginx", workdir)
        self.port = free_port()
        self.mock = mock
        self.workers = workers
        self.generation = 0
        self.conf_path = workdir / "nginx.conf"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cache_dir(self) -> Path:
        return self.workdir / f"cache-{self.generation}"

    def _write_conf(self) -> None:
        for sub in ("client_body", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp"):
            (self.workdir / sub).mkdir(exist_ok=True)
        self.cache_dir.mkdir()
        # As root, NGINX would run its workers as `nobody`, who cannot write into a private
        # temp dir; on a loopback bench, workers as root are the simpler fix.
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.conf_path.write_text(
            _NGINX_CONF.format(
                user=user,
                workers=self.workers,
                prefix=self.workdir,
                cache=self.cache_dir,
                mock_port=self.mock.port,
                port=self.port,
                path=REPORT_PATH,
                token=self.mock.token,
            )
        )

    def _argv(self) -> list[str]:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed")
        argv = [binary, "-c", str(self.conf_path), "-p", str(self.workdir)]
        return [*argv, "-e", str(self.workdir / "error.log")]

    def start(self) -> None:
        """Start with a new, empty cache directory."""
        self.generation += 1
        self._write_conf()
        check = subprocess.run([*self._argv(), "-t", "-q"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{check.stderr}")
        self.spawn(self._argv())
        deadline = time.monotonic() + 20
        while listening_sockets(self.port) < self.workers or len(self.worker_pids()) < self.workers:
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError("nginx did not start its workers in 20 s")
            time.sleep(0.02)

    def restart_cold(self) -> None:
        """Stop, then start again on a new cache directory (an empty cache, as on a new box)."""
        old = self.cache_dir
        self.stop(signal.SIGTERM)
        shutil.rmtree(old, ignore_errors=True)
        self.start()

    def worker_pids(self) -> list[int]:
        return [pid for pid in children(self.pid) if "worker process" in _cmdline(pid)]

    def cache_file_size(self, request_uri: str) -> int:
        """Bytes of the cache file NGINX keeps for one `$request_uri` (levels=1:2)."""
        digest = hashlib.md5(request_uri.encode()).hexdigest()
        path = self.cache_dir / digest[-1] / digest[-3:-1] / digest
        return path.stat().st_size if path.exists() else 0


class Ceiling(Service):
    """`bench/ceiling.py`: bare aiohttp + uvloop answering the hot query's bytes as a constant."""

    def __init__(self, workdir: Path, workers: int) -> None:
        super().__init__("ceiling", workdir)
        self.port = free_port()
        self.workers = workers

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_with(self, body: bytes, content_type: str) -> None:
        """Serve `body` (what the proxy answers to the hot query), as TeamUp typed it."""
        path = self.workdir / "body"
        path.write_bytes(body)
        argv = [sys.executable, str(ROOT / "bench" / "ceiling.py"), "--port", str(self.port)]
        argv += ["--workers", str(self.workers), "--body", str(path)]
        self.spawn([*argv, "--content-type", content_type], _child_env({}))
        deadline = time.monotonic() + 30
        while listening_sockets(self.port) < self.workers:
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError("the ceiling server did not start in 30 s")
            time.sleep(0.05)

    def worker_pids(self) -> list[int]:
        return [pid for pid in children(self.pid) if "resource_tracker" not in _cmdline(pid)]


_VCL = """\
vcl 4.1;
# Written by bench/procs.py: Varnish set up like the NGINX cache (key = URL, TTL 300 s).
backend teamup {{ .host = "127.0.0.1"; .port = "{mock_port}"; }}
sub vcl_recv {{
    set req.http.Authorization = "Token {token}";
    return (hash);
}}
sub vcl_hash {{ hash_data(req.url); return (lookup); }}
sub vcl_backend_response {{
    if (beresp.status == 200) {{
        set beresp.ttl = 300s;
        set beresp.grace = 1h;
    }} else {{
        set beresp.uncacheable = true;
        set beresp.ttl = 0s;
    }}
    return (deliver);
}}
sub vcl_deliver {{
    if (obj.hits > 0) {{ set resp.http.X-Cache-Status = "HIT"; }}
    else {{ set resp.http.X-Cache-Status = "MISS"; }}
}}
"""


def varnish_binary() -> str | None:
    """`varnishd` on PATH or in /usr/sbin (Debian's package)."""
    return shutil.which("varnishd") or next(
        (p for p in ("/usr/sbin/varnishd", "/usr/local/sbin/varnishd") if os.access(p, os.X_OK)),
        None,
    )


class Varnish(Service):
    """Debian's Varnish in the foreground (`-F`), its state and VCL in the workdir.

    Varnish has threads, not worker processes: `thread_pools` is set to the worker count.
    """

    def __init__(self, workdir: Path, mock: Mock, workers: int) -> None:
        super().__init__("varnish", workdir)
        self.port = free_port()
        self.mock = mock
        self.workers = workers

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = varnish_binary()
        if binary is None:
            raise RuntimeError("varnishd is not installed")
        vcl = self.workdir / "bench.vcl"
        vcl.write_text(_VCL.format(mock_port=self.mock.port, token=self.mock.token))
        argv = [binary, "-F", "-j", "none", "-a", f"127.0.0.1:{self.port}", "-f", str(vcl)]
        argv += ["-n", str(self.workdir / "state"), "-s", "malloc,256m", "-T", "none"]
        argv += ["-p", f"thread_pools={self.workers}", "-p", "thread_pool_min=50"]
        self.spawn(argv)
        deadline = time.monotonic() + 60
        while listening_sockets(self.port) < 1:
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError("varnishd did not start in 60 s")
            time.sleep(0.05)

    def worker_pids(self) -> list[int]:
        """The cache process (varnishd's child) serves; the manager only supervises it."""
        return children(self.pid) or [self.pid]


def describe_pids(pids: Iterable[int]) -> list[dict[str, Any]]:
    """For the JSON: which processes were measured."""
    return [{"pid": pid, "cmd": _cmdline(pid)[:80]} for pid in pids]
