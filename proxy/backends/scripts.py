"""The Lua scripts, kept as files beside this module (readable, diffable, testable on their own)."""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["load_script"]


@functools.cache
def load_script(name: str) -> str:
    """The text of `lua/<name>.lua`."""
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text()
