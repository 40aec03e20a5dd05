# teamup-proxy image: Debian bookworm's own python3 (3.11), a venv in /opt/venv installed from
# the hashed lock, running as uid 10001. The base is any bookworm with python3, python3-venv and
# ca-certificates; scripts/container-check makes `teamup-proxy-base:bookworm` locally with
# debootstrap (no registry needed) and builds with
#   docker build --network host --build-arg BASE_IMAGE=teamup-proxy-base:bookworm -t teamup-proxy .
# Pin the base by digest for production builds: --build-arg BASE_IMAGE=<repo>@sha256:<digest>.
ARG BASE_IMAGE=teamup-proxy-base:bookworm

# --- builder: the venv, from the lock (every file hash-checked), then the project itself ---
FROM ${BASE_IMAGE} AS builder

# Where pip finds packages is the builder's business (index, CA bundle), passed as build args;
# nothing of it reaches the runtime stage.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY requirements.lock ./
# Wheels only (all dependencies ship manylinux wheels): no compiler in any stage.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --quiet --require-hashes --only-binary :all: -r requirements.lock
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# setuptools (the build backend) came from the lock too, so no unpinned build environment.
RUN /opt/venv/bin/pip install --quiet --no-deps --no-build-isolation . \
 && /opt/venv/bin/pip uninstall --quiet --yes setuptools \
 && /opt/venv/bin/pip check

# --- runtime: the base plus the venv; no pip cache, no build tools, no root ---
FROM ${BASE_IMAGE} AS runtime

LABEL org.opencontainers.image.title="teamup-proxy" \
      org.opencontainers.image.description="Caching reverse proxy for TeamUp's reporting API"

# The whole PATH, not `:$PATH`: an imported base image may carry no environment at all.
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Debian's base-passwd already has a `proxy` group (uid 13): ours is `teamup`, 10001:10001.
RUN groupadd --system --gid 10001 teamup \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin teamup

COPY --from=builder /opt/venv /opt/venv

# Secrets: files in /run/secrets (the code's default secrets directory, PROXY_SECRETS_DIR),
# e.g. /run/secrets/PROXY_UPSTREAM_TOKEN mounted by compose or Kubernetes; never baked in.
# No .env either: configuration comes from PROXY_* variables. The root filesystem may be
# read-only; with several workers the metrics files go to /tmp (mount a tmpfs there).
WORKDIR /app
USER 10001:10001

EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PROXY_PORT', '8080'), timeout=2)"]

ENTRYPOINT ["teamup-proxy"]
CMD ["serve"]
