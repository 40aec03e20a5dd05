"""The layout's rules (README "Development"), checked: bench/ and scripts/ import the package,
never tests/; service never imports web; the core is pure; only modules about reports say so."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported(path: Path) -> set[str]:
    """Every module a Python file imports (relative imports resolved against the package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                found.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                found.add(node.module)
    return found


def python_files(folder: str) -> list[Path]:
    """The `.py` files under `folder`, and its scripts whose first line runs Python."""
    found = []
    for path in sorted((ROOT / folder).rglob("*")):
        if not path.is_file():
            continue
        if path.suffix == ".py" or path.read_bytes().split(b"\n", 1)[0].find(b"python") >= 0:
            found.append(path)
    return found


def test_bench_scripts_and_the_package_never_import_tests() -> None:
    scripts = python_files("scripts")
    assert {p.name for p in scripts} >= {"extract-spec", "mutants"}
    for folder in ("bench", "scripts", "proxy"):
        for path in python_files(folder):
            bad = {m for m in imported(path) if m == "tests" or m.startswith("tests.")}
            assert not bad, (path, bad)


def test_service_never_imports_web_and_the_core_is_pure() -> None:
    service = imported(ROOT / "proxy" / "service.py")
    assert not {m for m in service if m.startswith("proxy.web")}, service
    for path in (ROOT / "proxy" / "core").glob("*.py"):
        for module in imported(path):
            assert not module.startswith(("aiohttp", "redis", "proxy.web", "proxy.backends")), (
                path,
                module,
            )


def test_only_modules_about_reports_are_named_after_them() -> None:
    named = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "proxy").rglob("*report*.py"))
    assert named == ["proxy/core/reports_table.py", "proxy/spec/report_pages.py"]
