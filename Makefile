# `make demo` and `make test` are all a new user needs; both set up first when needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench lint clean-runs

setup: $(STAMP) .venv-argilla/.installed

# Re-installs only when the project's dependencies change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The embedded Argilla server lives in its own environment: its pins clash with ours.
.venv-argilla/.installed: annotation/setup_server_env.sh
	bash annotation/setup_server_env.sh

demo: setup
	$(BIN)/rlhf run workflows/demo.yaml

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m 'not slow'

bench: setup
	@for script in bench/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean-runs:
	rm -rf artifacts runs
