"""Test doubles shipped with the package: the mock TeamUp (also the demo's upstream)."""
