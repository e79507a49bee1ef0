# One entry point for everything. Every target depends on `setup`, so on a fresh
# Debian 12 machine (as root) `make demo` and `make test` each work from nothing.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
export BCC_KERNEL_SOURCE := $(CURDIR)/.cache/kheaders
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup demo test lint fmt gen bench fuzz test-unit test-netns test-e2e test-kind test-fuzz kind-e2e clean

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
test-fuzz: setup
	$(BIN)/pytest -m fuzz

lint: setup
	$(BIN)/ruff check nodeagent tests scripts fuzz bench
	$(BIN)/ruff format --check nodeagent tests scripts fuzz bench
	$(BIN)/mypy nodeagent fuzz bench
	$(PY) scripts/check_layers.py
	PY=$(PY) bash scripts/gen_protos.sh --check
	$(PY) scripts/validate_manifests.py

fmt: setup
	$(BIN)/ruff format nodeagent tests scripts fuzz bench
	$(BIN)/ruff check --fix nodeagent tests scripts fuzz bench

gen: setup
	PY=$(PY) bash scripts/gen_protos.sh

# Every benchmark family (bench/), each in its own process, into reports/bench.{json,md};
# `$(PY) -m bench mesh` runs one family, `$(PY) -m bench.mesh --rounds 3` one with its options.
bench: setup
	$(PY) -m bench

# Coverage-guided fuzzing (fuzz/README.md): each target for FUZZ_SECONDS, FUZZ_JOBS at a time,
# learning into .cache/fuzz; crash inputs land in fuzz/crashes/TARGET/ and fail the run.
# The figures per target also go to reports/fuzz.json.
FUZZ_SECONDS ?= 60
FUZZ_JOBS ?= 1
FUZZ_TARGETS ?=
fuzz: setup
	$(PY) -m fuzz.run --seconds $(FUZZ_SECONDS) --jobs $(FUZZ_JOBS) --json reports/fuzz.json $(FUZZ_TARGETS)

kind-e2e: setup
	bash scripts/kind-e2e.sh

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache
