"""README stays honest: every setting documented, the commands it names exist."""

from __future__ import annotations

import re
from pathlib import Path

from proxy.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    documented = set(re.findall(r"^\| `(PROXY_[A-Z0-9_]+)` \|", README, re.MULTILINE))
    settings = {f"PROXY_{name.upper()}" for name in Settings.model_fields}
    assert settings - documented == set(), "settings missing from README"
    assert documented - settings == set(), "README documents settings that do not exist"


def test_the_two_commands_are_make_targets() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in README
        assert re.search(rf"^{target}:", makefile, re.MULTILINE)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_the_upstream_spec_copy_matches_shared() -> None:
    shared = ROOT.parent / "shared" / "upstream" / "openapi.yaml"
    copy = ROOT / "docs" / "upstream" / "teamup-openapi.yaml"
    if shared.exists():  # beside a checkout that has shared/, the copy must be current
        assert copy.read_text() == shared.read_text()
    assert "customer_credits/data" in copy.read_text()
