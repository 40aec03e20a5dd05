"""`teamup-proxy serve | demo | hash-key` (also `python -m proxy`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from aiohttp import web

from .settings import Settings, SettingsError, load_settings
from .web.auth import hash_key

__all__ = ["main"]

log = logging.getLogger("teamup_proxy")


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but not on every platform
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve_app(
    app: web.Application,
    settings: Settings,
    host: str,
    port: int,
    *,
    reuse_port: bool,
    on_listening: Callable[[int], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain: `/readyz` 503, stop accepting, finish in-flight.

    `on_listening` gets the bound port (the real one when `port` is 0) once connections are taken.
    """
    from .web.handlers import STATE

    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=settings.shutdown_timeout,
        handle_signals=False,
        # Also the deadline for a connection's first request head: slow clients are cut off.
        keepalive_timeout=settings.client_header_timeout,
        # Room for a query of MAX_QUERY_BYTES and more, so too-long queries get our JSON 414.
        max_line_size=16 * 1024,
        # A caller that hangs up cancels its handler, so a miss waiting in the fair queue gives
        # up its place (fetches run in shielded tasks: the cache and other callers lose nothing).
        handler_cancellation=True,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=2048)
    await site.start()
    if settings.client_sndbuf_bytes:
        set_sndbuf(site, settings.client_sndbuf_bytes)
    port = _bound_port(runner, port)
    if on_listening is not None:
        on_listening(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = multiprocessing.parent_process()
    if parent is not None and isinstance(parent.sentinel, int):
        # A worker whose supervisor died (SIGKILL, OOM) drains and exits instead of serving on
        # unsupervised: the sentinel pipe reads EOF once the supervisor is gone.
        sentinel = parent.sentinel

        def orphaned() -> None:
            loop.remove_reader(sentinel)
            log.warning("supervisor gone; draining", extra={"event": "supervisor_gone"})
            stop.set()

        loop.add_reader(sentinel, orphaned)
    log.info(
        "listening", extra={"event": "listening", "host": host, "port": port, "pid": os.getpid()}
    )
    await stop.wait()
    state = app.get(STATE)
    if state is not None:
        state.draining = True
    log.info("draining", extra={"event": "draining", "pid": os.getpid()})
    if settings.drain_delay > 0:
        await asyncio.sleep(settings.drain_delay)
    await runner.cleanup()
    log.info("stopped", extra={"event": "stopped", "pid": os.getpid()})


def set_sndbuf(site: web.BaseSite, size: int) -> None:
    """SO_SNDBUF on the listening sockets: Linux gives accepted connections the listener's."""
    server = getattr(site, "_server", None)  # aiohttp keeps the asyncio server private
    for sock in getattr(server, "sockets", None) or ():
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def _bound_port(runner: web.AppRunner, requested: int) -> int:
    """The port `runner` listens on: the kernel's choice when `requested` was 0."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return requested


def _run_worker(overrides: dict[str, Any], host: str, port: int, reuse_port: bool) -> None:
    """One serving process (the whole server when --workers is 1)."""
    from .logs import close_logging, setup_logging
    from .web.app import create_app

    settings = load_settings(**overrides)
    setup_logging(
        settings.log_level,
        settings.log_format,
        max_lines=settings.log_queue_lines,
        flush_timeout=settings.log_flush_timeout,
    )
    _install_uvloop()
    code = 0
    try:
        asyncio.run(_serve_app(create_app(settings), settings, host, port, reuse_port=reuse_port))
    except SettingsError:
        raise  # one line on stderr, as for any other settings error
    except Exception:
        log.exception("worker failed", extra={"event": "worker_failed", "pid": os.getpid()})
        code = 1
    if not close_logging():
        # stderr took nothing within PROXY_LOG_FLUSH_TIMEOUT: leave without the interpreter's
        # exit-time flushes, any of which could block on it for good.
        os._exit(code)
    if code:
        raise SystemExit(code)


# A worker still running this long after PROXY_DRAIN_DELAY + PROXY_SHUTDOWN_TIMEOUT has passed
# since its SIGTERM is killed: room for closing Redis and the upstream pool and the log flush.
_DRAIN_GRACE = 2.0


def _supervise(overrides: dict[str, Any], host: str, port: int, workers: int) -> int:
    """Run `workers` processes on one SO_REUSEPORT port; restart a crashed one; relay SIGTERM.

    The signal handler only records the signal: the loop below is the one place that starts
    and stops workers, so no worker can be started after the SIGTERM was relayed. Once
    stopping, it SIGKILLs (and reports) any worker still running after the drain timeout.
    """
    settings = load_settings(**overrides)
    drain_timeout = settings.drain_delay + settings.shutdown_timeout + _DRAIN_GRACE
    own_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    if own_metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="teamup-proxy-metrics-")
    # Imported only now: prometheus-client picks its multiprocess mode at import time.
    from prometheus_client import multiprocess as prom_multiprocess

    context = multiprocessing.get_context("spawn")
    procs: list[multiprocessing.process.BaseProcess] = []
    signals: list[int] = []

    def spawn() -> multiprocessing.process.BaseProcess:
        proc = context.Process(
            target=_run_worker, args=(overrides, host, port, True), name="teamup-proxy-worker"
        )
        proc.start()
        return proc

    def on_signal(signum: int, _frame: object) -> None:
        signals.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    killed: list[int] = []
    draining: list[multiprocessing.process.BaseProcess] = []
    try:
        while len(procs) < workers and not signals:
            procs.append(spawn())
        log.info(
            "supervisor started", extra={"event": "supervisor", "workers": workers, "port": port}
        )
        restart_at: dict[int, float] = {}  # slot → when its dead worker is replaced
        while not signals:
            time.sleep(0.05)
            now = time.monotonic()
            for i, proc in enumerate(procs):
                if proc.is_alive() or signals:
                    continue
                if i not in restart_at:
                    if proc.pid is not None:  # its live gauges no longer count
                        prom_multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
                    log.warning(
                        "worker exited; restarting",
                        extra={"event": "worker_restart", "exitcode": proc.exitcode},
                    )
                    restart_at[i] = now + 0.5  # a worker that dies at once is not a busy loop
                elif now >= restart_at[i]:
                    del restart_at[i]
                    procs[i] = spawn()
        # From here on nothing is started: every worker there is gets the SIGTERM.
        draining = [proc for proc in procs if proc.pid is not None and proc.exitcode is None]
        for proc in draining:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)  # type: ignore[arg-type]
        deadline = time.monotonic() + drain_timeout
        for proc in draining:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in draining:
            if proc.pid is not None and proc.exitcode is None:
                killed.append(proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.join(5)
                log.error(
                    "worker did not drain in time; killed",
                    extra={
                        "event": "worker_killed",
                        "pid": proc.pid,
                        "drain_timeout": drain_timeout,
                    },
                )
    finally:
        if own_metrics_dir:
            shutil.rmtree(os.environ.pop("PROMETHEUS_MULTIPROC_DIR"), ignore_errors=True)
    # Exit 1 when a worker had to be killed or failed its drain (an error exit, a crash). One
    # SIGKILLed by someone else around the SIGTERM (the race this loop is built for) is
    # reported but is no failed drain.
    failed = [
        p.exitcode
        for p in draining
        if p.exitcode not in (0, -signal.SIGTERM, -signal.SIGKILL) and p.pid not in killed
    ]
    for proc in draining:
        if proc.exitcode not in (0, -signal.SIGTERM) and proc.pid not in killed:
            log.warning(
                "worker exited while stopping",
                extra={"event": "worker_exit", "pid": proc.pid, "exitcode": proc.exitcode},
            )
    return 1 if failed or killed else 0


def _port_in_use(host: str, port: int, flag: str, *, reuse_port: bool = False) -> str | None:
    """One line saying `host:port` cannot be bound, naming the flag to change; None if it can.

    Checked before anything is printed or started, so a taken port is one clear line instead of
    a banner followed by a traceback (or a supervisor restarting workers that cannot bind).
    """
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return None  # let the server report the bad address itself
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            return f"teamup-proxy: port {port} on {host} is not available ({reason}); {flag}"
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    """`teamup-proxy serve`: flags win over `PROXY_HOST`, `PROXY_PORT`, `PROXY_WORKERS`."""
    overrides = {
        name: value
        for name, value in (("host", args.host), ("port", args.port), ("workers", args.workers))
        if value is not None
    }
    settings = load_settings(**overrides)
    from .logs import setup_logging

    setup_logging(
        settings.log_level,
        settings.log_format,
        max_lines=settings.log_queue_lines,
        flush_timeout=settings.log_flush_timeout,
    )
    workers = settings.workers or os.cpu_count() or 1
    busy = _port_in_use(
        settings.host, settings.port, "choose another with --port or PROXY_PORT", reuse_port=True
    )
    if busy is not None:
        print(busy, file=sys.stderr)
        return 2
    if workers == 1:
        _run_worker(overrides, settings.host, settings.port, False)
        return 0
    if settings.port == 0:
        # Each worker binds the port itself (SO_REUSEPORT): port 0 would give each its own.
        raise SettingsError(
            f"port 0 (any free port) needs one worker, not {workers}: "
            "add --workers 1 (PROXY_WORKERS=1) or name a port"
        )
    return _supervise(overrides, settings.host, settings.port, workers)


async def _demo(port: int) -> None:
    from .testing.mock import create_mock_app
    from .web.app import create_app

    token = "demo-" + secrets.token_hex(12)
    caller_key = "demo-" + secrets.token_urlsafe(18)
    admin_key = "admin-" + secrets.token_urlsafe(18)
    mock_runner = web.AppRunner(create_mock_app(token, latency=0.08), access_log=None)
    await mock_runner.setup()
    mock_site = web.TCPSite(mock_runner, "127.0.0.1", 0)
    await mock_site.start()
    mock_port = mock_runner.addresses[0][1]
    settings = Settings(
        upstream_url=f"http://127.0.0.1:{mock_port}",
        upstream_token=token,  # type: ignore[arg-type]
        clients={"demo": {"key_sha256": hash_key(caller_key), "rate": "600/minute"}},  # type: ignore[dict-item]
        admin_key_sha256=hash_key(admin_key),
        redis_url=None,
        log_format="text",
        _env_file=None,  # type: ignore[call-arg]
    )
    from .logs import setup_logging

    setup_logging("INFO", "text")
    try:
        await _serve_app(
            create_app(settings),
            settings,
            "127.0.0.1",
            port,
            reuse_port=False,
            on_listening=lambda bound: _demo_banner(bound, caller_key, admin_key),
        )
    finally:
        await mock_runner.cleanup()


def _demo_banner(port: int, caller_key: str, admin_key: str) -> None:
    """What the demo prints once it listens: its real port, the keys, five curl lines."""
    base = f"http://127.0.0.1:{port}"
    report = f"{base}/api/v2/reports/customer_credits/data"
    grouped = f"{base}/api/v2/reports/customers.grouped/data"
    print(
        "teamup-proxy demo: a mock TeamUp (80 ms latency) behind the proxy, embedded store.\n"
        f"  proxy      {base}\n"
        f"  caller key {caller_key}\n"
        f"  admin key  {admin_key}\n"
        "Try (the second and third are cache hits of one question, spelled differently):\n"
        f"  curl -si -H 'Authorization: Token {caller_key}' '{report}?format=json&limit=3'\n"
        f"  curl -si -H 'Authorization: Token {caller_key}' "
        f"'{report}?limit=3&format=JSON'\n"
        f"  curl -si -H 'X-API-Key: {caller_key}' '{report}?format=json&limit=003&offset=0'\n"
        "Another report, grouped (one entry for both spellings; without columns it is a 400):\n"
        f"  curl -si -H 'X-API-Key: {caller_key}' "
        f"'{grouped}?format=json&columns=gender,count&is_active=TRUE'\n"
        f"  curl -si -H 'X-API-Key: {caller_key}' "
        f"'{grouped}?is_active=1&columns=gender&columns=count&format=json'\n"
        "A list that pages (follow its `next`: it points back at the proxy):\n"
        f"  curl -si -H 'X-API-Key: {caller_key}' '{base}/api/v2/events?page_size=2'\n"
        "Ctrl-C stops it.",
        flush=True,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    """`teamup-proxy demo`: mock TeamUp + proxy + embedded store, ready to curl."""
    busy = _port_in_use("127.0.0.1", args.port, "choose another with --port N (make demo PORT=N)")
    if busy is not None:
        print(busy, file=sys.stderr)
        return 2
    _install_uvloop()
    asyncio.run(_demo(args.port))
    return 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    """`teamup-proxy hash-key KEY` (`-` reads it from stdin): the digest PROXY_CLIENTS wants."""
    key = sys.stdin.readline().strip() if args.key == "-" else args.key
    if not key:
        print("teamup-proxy: hash-key needs a non-empty KEY", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


def port_number(text: str) -> int:
    """argparse type of `--port`: 1-65535, or 0 for any free port."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a port: use 1-65535, or 0 for any free port"
        )
    return port


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line on stderr (exit 2), pointing at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


SERVE_HELP = """\
Serve the proxy with settings from PROXY_* variables, a .env file or files in the secrets
directory (/run/secrets, or PROXY_SECRETS_DIR). Required: the TeamUp credential, as
PROXY_UPSTREAM_TOKEN or a file of that name in the secrets directory. Callers need
PROXY_CLIENTS (their key digests, see hash-key). Every setting is in README's Configuration.
Flags win over their variables. Port 0 (any free port) needs --workers 1; the bound port is
in the "listening" log line."""


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = _Parser(
        prog="teamup-proxy",
        description=(
            "A caching reverse proxy in front of TeamUp's API: callers use their own "
            "keys, the proxy holds the credential, answers repeats from Redis and keeps every "
            "app inside TeamUp's rate budget."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = sub.add_parser(
        "serve",
        help="serve; needs PROXY_UPSTREAM_TOKEN (or its file in /run/secrets)",
        description=SERVE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", help="address to bind (PROXY_HOST, default 0.0.0.0)")
    serve.add_argument(
        "--port",
        type=port_number,
        help="1-65535, 0 = any free port (PROXY_PORT, default 8080)",
    )
    serve.add_argument("--workers", type=int, help="processes (PROXY_WORKERS, default: CPUs)")
    serve.set_defaults(func=cmd_serve)
    demo = sub.add_parser(
        "demo",
        help="mock TeamUp + proxy + embedded store, for a try-out",
        description=(
            "A mock TeamUp (80 ms latency) behind the proxy with an in-process store: prints "
            "the proxy's address, a caller key, an admin key and five curl lines to try."
        ),
    )
    demo.add_argument(
        "--port",
        type=port_number,
        default=8080,
        help="proxy port: 1-65535, 0 = any free port (default 8080)",
    )
    demo.set_defaults(func=cmd_demo)
    hk = sub.add_parser("hash-key", help="print the SHA-256 of a caller key for PROXY_CLIENTS")
    hk.add_argument("key", help="the key, or - to read it from stdin")
    hk.set_defaults(func=cmd_hash_key)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `teamup-proxy` console script."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except SettingsError as exc:
        print(f"teamup-proxy: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    from .logs import close_logging

    if not close_logging():
        os._exit(code)  # stderr takes nothing: the exit-time flushes would wait on it for good
    raise SystemExit(code)
