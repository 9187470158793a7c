# dpo_lightning — `make help` lists the targets.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
WORKERS ?= 2  # pytest-xdist processes: tests run one torch thread each (conftest), one per core

.PHONY: help setup run run-vlm test test-fast lint bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "Test tiers (markers in pyproject.toml; a test may carry several):"
	@echo "  test-fast   everything not marked below: unit and in-process Lightning tests on the tiny model"
	@echo "  slow        longer end-to-end runs (sweeps, benchmark drivers, kill/requeue, memory scripts)"
	@echo "  distributed several training processes on the CPU (DDP / FSDP with gloo, parallel sweep jobs)"
	@echo "  subprocess  launches dpo-train / dpo-eval / python scripts / pip as a user would"
	@echo "  make test runs all of them; pytest -m distributed (or subprocess, slow) runs one tier"

$(BIN)/dpo-train: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

setup: $(BIN)/dpo-train  ## create .venv and install torch + the package with its dev extra

run: setup  ## set up, then train on the embedded default (tiny model, synthetic pairs, CPU, < 3 min)
	$(BIN)/dpo-train

run-vlm: setup  ## the vision default: a tiny LLaVA on generated shape pictures (experiment=tiny_vlm, CPU, < 3 min)
	$(BIN)/dpo-train experiment=tiny_vlm

test: setup  ## the whole suite, every tier: what CI runs (target: 15 min on 2 cores)
	$(BIN)/pytest -q -n $(WORKERS)

test-fast: setup  ## in-process tests only, after each change (target: 4 min on 2 cores): no slow/distributed/subprocess
	$(BIN)/pytest -q -n $(WORKERS) -m "not slow and not distributed and not subprocess"

lint: setup  ## ruff (pyflakes and friends), then mypy over the package ([tool.mypy] in pyproject.toml)
	$(BIN)/ruff check dpo_lightning tests scripts hydra_plugins
	$(BIN)/mypy dpo_lightning

bench: setup  ## speed/memory benchmark against the plain path (see docs/performance.md)
	$(BIN)/python scripts/benchmark.py

clean:  ## remove the virtual environment and run outputs
	rm -rf $(VENV) outputs
