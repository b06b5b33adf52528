# Two commands: `make run` (the main job on the embedded default) and `make test` (the test suite).
# Both create .venv on first use. Torch: the CPU build by default; a GPU user picks another, e.g.
#   make run TORCH_SPEC="torch==2.6.0" PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cu124"
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
EXTRAS ?= dev
CONFIG ?= configs/testbed.yaml
PYTEST_ARGS ?=
BIN := $(VENV)/bin
export OMP_WAIT_POLICY ?= PASSIVE
STAMP := $(VENV)/.opd-installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: setup run test test-fast lint fmt bench clean

$(STAMP): pyproject.toml
	@echo "==> setting up $(VENV) (torch: $(TORCH_SPEC)); this takes a few minutes the first time"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(PIP) install -e ".[$(EXTRAS)]"
	@touch $(STAMP)
	@echo "==> $(VENV) ready"

setup: $(STAMP)

run: setup
	$(BIN)/opd run --config $(CONFIG)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

fmt: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf .opd .pytest_cache
