# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, install, pretrain the tiny base once (cached), run the CPU quickstart
#   make test   create .venv, install, run the test suite (what .ci/run calls)
# TORCH picks the torch build installed first: the CPU wheel 2.13.0 by default; bring your own CUDA
# build with `make setup TORCH=torch` or install torch yourself and `pip install -e .`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: setup
	$(BIN)/fed-ddp run configs/quickstart.yaml run.overwrite=true

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check fed_ddp tests benchmarks examples

clean:
	rm -rf $(VENV) runs
