"""teamup-proxy: a caching reverse proxy in front of TeamUp's API."""

from __future__ import annotations

from typing import Any

__all__ = ["Settings", "SettingsError", "__version__", "create_app", "load_settings"]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy: `serve`'s supervisor must not import prometheus-client (through the app) before it
    # has chosen the metrics directory its workers share.
    if name == "create_app":
        from .web.app import create_app

        return create_app
    if name in ("Settings", "SettingsError", "load_settings"):
        from . import settings

        return getattr(settings, name)
    raise AttributeError(name)
