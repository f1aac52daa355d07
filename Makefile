# One way to run the project's gates. Every target makes (or refreshes) the project virtualenv in .venv/ first:
# it is rebuilt when missing and reinstalled when pyproject.toml is newer than its stamp.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.balcaprl-installed
# torch is installed first and on its own so that pip never resolves a multi-GB CUDA build by accident.
# On a GPU machine pick your build, e.g. `make install TORCH="torch==2.13.0 --index-url <your CUDA index>"`.
TORCH ?= torch==2.13.0
EXTRAS ?= dev
PIP := $(PY) -m pip --disable-pip-version-check
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-fast lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

test: $(STAMP)  ## the whole suite, slow end-to-end tests included
	$(PY) -m pytest -q -ra --durations=10

test-fast: $(STAMP)  ## everything but the multi-process / wheel end-to-end tests
	$(PY) -m pytest -q -ra -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: $(STAMP)  ## step-time ratio of BalCapGRPOTrainer to TRL's GRPOTrainer, same config, interleaved
	$(PY) -m balcaprl.bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
