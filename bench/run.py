"""`python bench/run.py [--rounds N] [--duration S] [--only SCENARIO]`: us and NGINX, one run."""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script, so the repository root (for `bench` and `proxy`) is not on the path yet.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.harness import main

    raise SystemExit(main())
