# syntax=docker/dockerfile:1
# teamup-proxy image: `docker build -t teamup-proxy:0.1.0 .` (BuildKit, the default since Docker 23).
# Pin by digest for production builds: python:3.11-slim@sha256:<digest>.

# --- builder: wheels for the project and every dependency (all ship manylinux wheels) ---
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime: the wheels installed into a slim image, no compilers, running as UID 10001 ---
FROM python:3.11-slim AS runtime

LABEL org.opencontainers.image.title="teamup-proxy" \
      org.opencontainers.image.description="Caching reverse proxy for TeamUp's customer credits report"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Secrets: files in /run/secrets (the code's default secrets directory, PROXY_SECRETS_DIR),
# e.g. /run/secrets/PROXY_UPSTREAM_TOKEN mounted by compose or Kubernetes; never baked in.
RUN groupadd --system --gid 10001 proxy \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin proxy

# The wheels are bind-mounted from the builder, so they never become a layer of this image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/teamup_proxy-*.whl \
 && pip uninstall --yes setuptools wheel \
 && pip check

# No .env here: configuration comes from PROXY_* variables and files in /run/secrets.
WORKDIR /app
USER 10001:10001

EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PROXY_PORT', '8080'), timeout=2)"]

ENTRYPOINT ["teamup-proxy"]
CMD ["serve"]
