# dpo_lightning — `make help` lists the targets.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: help setup run test test-fast lint bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/dpo-train: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

setup: $(BIN)/dpo-train  ## create .venv and install torch + the package with its dev extra

run: setup  ## set up, then train on the embedded default (tiny model, synthetic pairs, CPU, < 3 min)
	$(BIN)/dpo-train

test: setup  ## set up, then run the test suite
	$(BIN)/pytest -q

test-fast: setup  ## the suite without tests marked slow
	$(BIN)/pytest -q -m "not slow"

lint: setup  ## ruff (pyflakes and friends), then mypy over the package ([tool.mypy] in pyproject.toml)
	$(BIN)/ruff check dpo_lightning tests scripts hydra_plugins
	$(BIN)/mypy dpo_lightning

bench: setup  ## speed/memory benchmark against the plain path (see docs/performance.md)
	$(BIN)/python scripts/benchmark.py

clean:  ## remove the virtual environment and run outputs
	rm -rf $(VENV) outputs
