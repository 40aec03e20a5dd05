"""README stays honest: every setting documented, the commands it names exist."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest

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


def test_make_help_lists_every_target() -> None:
    makefile = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY: (.+)$", makefile, re.MULTILINE)
    assert phony is not None
    done = subprocess.run(
        ["make", "-s", "--no-print-directory", "help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    listed = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("make ")}
    assert set(phony.group(1).split()) - {"help"} == listed


def shared_upstream() -> Path | None:
    """TeamUp's pages as the project shares them (`shared/upstream/`), beside any ancestor."""
    for folder in ROOT.parents:
        candidate = folder / "shared" / "upstream"
        if (candidate / "openapi.yaml").is_file():
            return candidate
    return None


def test_the_upstream_copies_are_the_recorded_ones() -> None:
    """The copies of TeamUp's pages in the repo are exactly what SHA256SUMS records (an edit
    must update both), and the copied OpenAPI page agrees with the document the proxy builds
    its contracts from (proxy/spec/teamup.json) on customer_credits' parameters."""
    import yaml

    folder = ROOT / "docs" / "upstream"
    recorded = {}
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        recorded[name.lstrip("*")] = digest
    assert {"teamup-openapi.yaml", "reports/README.md"} <= set(recorded)
    for name, digest in recorded.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    upstream = yaml.safe_load((folder / "teamup-openapi.yaml").read_text())
    operation = upstream["paths"]["/reports/customer_credits/data"]["get"]
    names = {p["name"] for p in operation["parameters"]}
    document = json.loads((ROOT / "proxy" / "spec" / "teamup.json").read_text())
    ours = document["paths"]["/api/v2/reports/customer_credits/data"]["get"]["parameters"]
    assert names and names == {p["name"] for p in ours}


def test_the_upstream_copies_match_shared() -> None:
    shared = shared_upstream()
    if shared is None:
        pytest.skip("no shared/upstream/ beside this checkout (the recorded digests still hold)")
    copies = ROOT / "docs" / "upstream"
    assert (copies / "teamup-openapi.yaml").read_text() == (shared / "openapi.yaml").read_text()
    for page in sorted((shared / "reports").iterdir()):
        assert (copies / "reports" / page.name).read_bytes() == page.read_bytes(), page.name
