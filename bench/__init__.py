"""Load benchmarks: teamup-proxy and NGINX `proxy_cache` side by side (`bench/run.py`)."""
