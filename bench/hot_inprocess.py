"""Hot hits in process: the whole aiohttp app handler (router, `observe`, the hot path) called
in a loop with one prepared request, no sockets, the client limiter's spend stubbed (it is
measured elsewhere). A quick A/B figure for changes to routing or the hot path.

`.venv/bin/python bench/hot_inprocess.py [PATH?QUERY] [N]` prints µs per hot hit, the median of
five rounds of N (default 20,000). Run it on two checkouts, alternating, on a quiet machine.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: the repository root is not on the path yet
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fakeredis
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from proxy.testing.e2e import KEY, TOKEN, auth, make_settings
from proxy.testing.mock import create_mock_app
from proxy.web.app import create_app
from proxy.web.auth import hash_key
from proxy.web.handlers import STATE

DEFAULT_PATH = "/api/v2/reports/customer_credits/data?format=json&limit=3"


async def measure(path: str, n: int) -> list[float]:
    """µs per hot hit, for five rounds of `n`."""
    mock = TestServer(create_mock_app(TOKEN))
    await mock.start_server()
    settings = make_settings(
        str(mock.make_url("")).rstrip("/"),
        cache_l1_ttl=60,
        clients={"billing": {"key_sha256": hash_key(KEY), "rate": "1000/second"}},
    )
    app = create_app(settings, redis_client=fakeredis.FakeAsyncRedis())
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        for _ in range(2):  # a miss, then a hit the hot path learns from
            response = await client.get(path, headers=auth())
            await response.read()
            assert response.status == 200, response.status
        service = app[STATE].service
        service.client_limiter.spend = lambda key, rate: (100, 1.0)  # type: ignore[method-assign]
        request = make_mocked_request("GET", path, headers=auth(), app=app)
        rounds = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(n):
                answered = await app._handle(request)
            rounds.append((time.perf_counter() - started) / n * 1e6)
        assert answered.headers["Cache-Status"].startswith("teamup-proxy; hit")
        return rounds
    finally:
        await client.close()
        await mock.close()


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_PATH
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
    rounds = asyncio.run(measure(path, n))
    shown = ", ".join(f"{r:.2f}" for r in rounds)
    print(f"{path}: {statistics.median(rounds):.2f} µs per hot hit (median of [{shown}])")


if __name__ == "__main__":
    main()
