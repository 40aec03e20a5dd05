"""What the proxy adds to a write: PATCHes sent to the mock TeamUp directly and through the
proxy (in process, a real redis-server), with and without an Idempotency-Key, for two values
of PROXY_GENERATION_CHECK_INTERVAL (a successful write waits that long before answering).

`.venv/bin/python bench/writes_inprocess.py [N]` prints the median and p90 in ms (N = 200).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: the repository root is not on the path yet
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp.test_utils import TestClient, TestServer

from proxy.testing.e2e import KEY, TOKEN, auth, make_settings
from proxy.testing.mock import create_mock_app
from proxy.testing.support import RedisServer
from proxy.web.app import create_app
from proxy.web.auth import hash_key

PATH = "/api/v2/customers/377001"
BODY = b'{"first_name": "Ann"}'


Client = TestClient[Any, Any]


async def timed(client: Client, headers: dict[str, str], n: int, keyed: bool) -> list[float]:
    took = []
    for i in range(n):
        sent = {**headers, "Idempotency-Key": f"bench-{time.time_ns()}-{i}"} if keyed else headers
        started = time.perf_counter()
        response = await client.patch(PATH, data=BODY, headers=sent)
        await response.read()
        took.append((time.perf_counter() - started) * 1000)
        assert response.status == 200, response.status
    return took


def show(label: str, took: list[float]) -> None:
    p90 = sorted(took)[int(len(took) * 0.9)]
    print(f"{label:48} median {statistics.median(took):6.2f} ms   p90 {p90:6.2f} ms")


async def main(n: int) -> None:
    redis = RedisServer().start()
    mock = TestServer(create_mock_app(TOKEN))
    await mock.start_server()
    direct = TestClient(mock)
    try:
        json = {"Content-Type": "application/json"}
        upstream = {**json, "Authorization": f"Token {TOKEN}"}
        show("direct to the mock", await timed(direct, upstream, n, False))
        for interval in (0.0, 0.05):
            settings = make_settings(
                str(mock.make_url("")).rstrip("/"),
                redis_url=redis.url,
                generation_check_interval=interval,
                clients={
                    "billing": {
                        "key_sha256": hash_key(KEY),
                        "rate": "100000/minute",
                        "write": ["customers"],
                    }
                },
                upstream_rate_limit="100000/minute",
                upstream_burst=1000,
            )
            client = TestClient(TestServer(create_app(settings)))
            await client.start_server()
            try:
                headers = {**auth(), **json}
                for keyed in (False, True):
                    label = f"proxy, interval {interval:g} s"
                    label += ", Idempotency-Key" if keyed else ""
                    show(label, await timed(client, headers, n, keyed))
            finally:
                await client.close()
    finally:
        await direct.close()
        redis.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200))
