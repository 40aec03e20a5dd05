# Everything starts from a clean clone with only Python and pip: `make demo`, `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# -qq: errors only (this machine's pip config points at local indexes that pip warns about).
PIP    := $(BIN)/python -m pip -qq
PORT   ?= 8080
# `make lock` refreshes both locks to the newest versions pyproject.toml allows (LOCK_ARGS= keeps
# the current pins and only adds what changed). uv resolves for every Python >= 3.11 and platform
# at once, so a lock made on a newer 3.11 still installs on Debian's 3.11.2.
LOCK_ARGS ?= --upgrade
UV_VERSION := 0.13.8
BUILD_IN := $(VENV)/build-system.in
COMPILE = $(BIN)/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	--custom-compile-command 'make lock' $(LOCK_ARGS) pyproject.toml $(BUILD_IN)

.PHONY: help install lock demo test chaos lint deploy-lint container-check check bench soak mutants clean

# `make help`: every target in one line each (a test checks every .PHONY target is listed).
help:
	@echo "make install          .venv from requirements-dev.lock (hash-checked; once, ~20-45 s)"
	@echo "make demo [PORT=8080] mock TeamUp + proxy + embedded store; prints keys and curl lines"
	@echo "make test             the whole suite (~7 min on 2 cores; needs redis-server)"
	@echo "make chaos            Redis killed, restarted, paused, filled under load (~1 min)"
	@echo "make lint             ruff check, ruff format --check, mypy --strict"
	@echo "make deploy-lint      hadolint, yamllint, shellcheck, kubernetes-validate, kustomize"
	@echo "make container-check  build the image and run it as an operator would (root, docker)"
	@echo "make check            lint + test + deploy-lint"
	@echo "make bench            benchmarks (BENCH_ARGS=...; see README's Benchmarks)"
	@echo "make soak             serve under mixed load, 300 s (SOAK_ARGS=--seconds 60)"
	@echo "make mutants          hand-made mutants of the decision code, 3-5 min (MUTANTS_ARGS=gcra)"
	@echo "make lock             refresh both locks to the newest versions pyproject allows"
	@echo "make clean            remove .venv and the tools' caches"

# Hash-checked install from the lock; a second run is a no-op until pyproject or the lock change.
$(STAMP): pyproject.toml requirements-dev.lock
	@echo "make: installing into $(VENV) from requirements-dev.lock (once: ~20-45 s)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(PIP) install --require-hashes --only-binary :all: -r requirements-dev.lock
	@$(PIP) install --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP)

# The build backend (pyproject's build-system.requires) is locked too: installs use
# --no-build-isolation, so nothing unhashed is ever fetched.
lock: $(STAMP)
	$(PIP) install uv==$(UV_VERSION)
	$(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' >$(BUILD_IN)
	$(COMPILE) --output-file requirements.lock
	$(COMPILE) --extra dev --output-file requirements-dev.lock
	sed -i 's|via -r $(BUILD_IN)|via pyproject.toml (build-system.requires)|' requirements.lock requirements-dev.lock

demo: $(STAMP)
	$(BIN)/teamup-proxy demo --port $(PORT)

# PYTHONDONTWRITEBYTECODE (set on some machines) also stops pytest caching the modules it
# rewrites for its asserts (the tests and every module of hypothesis and schemathesis, ~500):
# every run would parse them again, ~7 s of silent collection instead of ~3 s. Unset for pytest.
test: $(STAMP)
	@echo "make: running the suite (~7 min on 2 cores); collecting ~4,700 tests first takes a few s"
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest

# Redis killed, restarted, paused and filled under a mixed load through real processes (~60 s;
# the reproductions of issue 20 also run in `make test`, the long mixed run only here).
chaos: $(STAMP)
	TEAMUP_CHAOS=1 $(BIN)/python -m pytest tests/chaos -q -s

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict

deploy-lint: $(STAMP)
	VENV=$(VENV) scripts/lint-deploy

container-check: $(STAMP)
	VENV=$(VENV) scripts/container-check

check: lint test deploy-lint

bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

soak: $(STAMP)
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

mutants: $(STAMP)
	MUTANTS_PYTHON=$(BIN)/python $(BIN)/python scripts/mutants $(MUTANTS_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
