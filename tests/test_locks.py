"""The lock files: every pin hashed, runtime and dev agree, and they cover pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pins(name: str) -> dict[str, str]:
    """package -> version of a `uv pip compile --generate-hashes` lock; asserts every pin has a
    hash."""
    text = (ROOT / name).read_text(encoding="utf-8")
    found: dict[str, str] = {}
    for block in re.split(r"\n(?=\S)", text):
        match = re.match(r"([A-Za-z0-9._-]+)==([^\s;\\]+)", block)
        if match is None:
            continue
        assert "--hash=sha256:" in block, f"{name}: {match.group(1)} has no hash"
        found[match.group(1).lower().replace("_", "-")] = match.group(2)
    return found


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_locks_cover_pyproject_and_agree() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    runtime, dev = pins("requirements.lock"), pins("requirements-dev.lock")
    assert requirement_names(project["project"]["dependencies"]) <= set(runtime)
    assert requirement_names(project["project"]["optional-dependencies"]["dev"]) <= set(dev)
    # The build backend is locked too (installs use --no-build-isolation).
    assert requirement_names(project["build-system"]["requires"]) <= set(runtime) & set(dev)
    assert {name: dev.get(name) for name in runtime} == runtime
