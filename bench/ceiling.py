"""The stack's ceiling: bare aiohttp on uvloop answering one constant body, N SO_REUSEPORT workers.

`python bench/ceiling.py --port P --workers 2 --body FILE --content-type application/json`.
No middleware, no access log, one route; what any aiohttp handler costs at the least, so the
proxy's hot hit is judged against what its own stack can do on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import signal
import sys
from pathlib import Path

from aiohttp import web


def _serve(port: int, body: bytes, content_type: str) -> None:
    import uvloop

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type)

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", answer)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True, backlog=2048).start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()

    uvloop.run(main())


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/ceiling.py")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--body", type=Path, required=True)
    parser.add_argument("--content-type", default="application/json")
    args = parser.parse_args()
    body = args.body.read_bytes()
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_serve, args=(args.port, body, args.content_type))
        for _ in range(args.workers)
    ]
    for proc in procs:
        proc.start()

    def stop(_signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for proc in procs:
        proc.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
