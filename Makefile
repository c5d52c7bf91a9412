# One command each on a fresh machine: `make demo`, `make test`. Both run `setup` first
# when the virtualenv is missing or pyproject.toml changed.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU machines (no nvidia-smi): install the local CPU build of torch first, or pip resolves
# `torch` to a multi-GB CUDA build (DESIGN §6). GPU machines take torch from PyPI.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_CPU ?= torch==2.13.0
EXTRAS ?= dev,alfworld
PYTEST_ARGS ?=
# The venv first on PATH: alfworld's fast-downward build runs a bare `python build.py` inside
# pip's isolated build, which must not resolve to a pyenv shim.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup test test-fast test-vllm demo bench clean tiny-model

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
ifneq ($(HAS_GPU),1)
	$(BIN)/pip install -q "$(TORCH_CPU)"
endif
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

test-vllm: setup
	bash scripts/test_vllm.sh

demo: setup
	$(BIN)/gtr demo

bench: setup
	$(BIN)/python -m benchmarks.run_all

tiny-model: setup
	$(BIN)/gtr tiny-model runs/models/tiny

clean:
	rm -rf runs bench-results .pytest_cache
