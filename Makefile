# One entry point for everything. Every target depends on `setup`, so on a fresh
# Debian 12 machine (as root) `make demo` and `make test` each work from nothing.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
export BCC_KERNEL_SOURCE := $(CURDIR)/.cache/kheaders
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup demo test lint fmt gen bench test-unit test-netns test-e2e test-kind kind-e2e clean

setup: $(VENV)/.setup-stamp
$(VENV)/.setup-stamp: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

demo: setup
	$(BIN)/nodeagent sandbox demo

test: setup lint
	$(BIN)/pytest -m "not bench"

test-unit: setup
	$(BIN)/pytest -m unit
test-netns: setup
	$(BIN)/pytest -m netns
test-e2e: setup
	$(BIN)/pytest -m e2e
test-kind: setup
	$(BIN)/pytest -m kind

lint: setup
	$(BIN)/ruff check nodeagent tests scripts
	$(BIN)/ruff format --check nodeagent tests scripts
	$(BIN)/mypy nodeagent
	$(PY) scripts/check_layers.py
	PY=$(PY) bash scripts/gen_protos.sh --check
	$(PY) scripts/validate_manifests.py

fmt: setup
	$(BIN)/ruff format nodeagent tests scripts
	$(BIN)/ruff check --fix nodeagent tests scripts

gen: setup
	PY=$(PY) bash scripts/gen_protos.sh

bench: setup
	$(PY) scripts/bench.py

kind-e2e: setup
	bash scripts/kind-e2e.sh

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache
