"""The bench's website mix in a tiny configuration: what `bench/run.py --only site` claims holds.

The mix's figure (upstream calls per 1,000) rests on two claims: the apps' spellings of one
question are one cache entry of the proxy, and a visitor following `next` stays on the server.
Both are checked here through a real proxy in front of the mock TeamUp, over HTTP.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from bench.procs import Mock, Nginx, nginx_binary
from bench.scenarios import replay_site
from bench.site import APPS, ListQuestion, build_site, site_key, spell_list
from proxy.testing.e2e import auth
from proxy.testing.mock import MockState
from tests.conftest import MakeProxy

SEED = 20240601


def test_every_app_spells_a_list_differently_and_the_proxy_keys_them_as_one() -> None:
    schedule = ListQuestion(
        page_size=100,  # the default: written out by some apps, left off by others
        status=("active",),
        sort=("start",),
        week=2,
        venues=(265001, 265003),
        fields=("id", "name", "venue", "starts_at"),
        expand=("venue", "category"),
    )
    texts = {spell_list(schedule, app, SEED) for app in range(APPS)}
    assert len(texts) == APPS
    assert len({site_key(text) for text in texts}) == 1
    smaller = dataclasses.replace(schedule, page_size=20)
    assert site_key(spell_list(smaller, 0, SEED)) != site_key(spell_list(schedule, 0, SEED))


async def test_the_website_mix_costs_one_upstream_call_per_question_and_never_leaks_a_link(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    proxy = await make_proxy()
    site = build_site(120, SEED, list_questions=6)
    base = str(proxy.make_url("")).rstrip("/")
    tally = await replay_site(base, auth(), site.visits, 4)
    assert tally.failures == 0
    assert set(tally.statuses) == {200}
    assert tally.leaked == 0
    assert tally.followed > 0  # `next` links were followed, through the proxy
    keys = {site_key(target) for target in tally.sent}
    assert len(set(tally.sent)) > len(keys)  # some question came in several spellings
    assert mock_state.calls == len(keys)


@pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed")
def test_the_nginx_peer_config_is_valid(tmp_path: Path) -> None:
    mock = Mock(tmp_path, "bench-token", 0.0, seed=7)
    nginx = Nginx(tmp_path / "nginx", mock, workers=1)
    nginx.workdir.mkdir()
    nginx.generation = 1
    nginx._write_conf()
    conf = nginx.conf_path.read_text()
    assert "location /api/v2/" in conf and "sub_filter" in conf
    binary = nginx_binary()
    assert binary is not None
    check = subprocess.run([*nginx._argv(), "-t", "-q"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
