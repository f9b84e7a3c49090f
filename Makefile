# The two README commands (`make demo`, `make test`) set themselves up on first use:
# a .venv with torch pinned and installed first, then the locked dependencies.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
TORCH_VERSION := 2.13.0
# Another CUDA build of the same torch: make TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 demo
TORCH_INDEX_URL ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export LAV2_ROOT := $(CURDIR)
include src/llama_adapter_v2/offline.env
export $(shell sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/\1/p' src/llama_adapter_v2/offline.env)

# pip's local-mirror set-up prints one harmless warning per package; keep the log readable.
QUIET_PIP := 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }

.PHONY: help setup demo test lint bench clean-venv

help:
	@echo "make demo   - the whole pipeline on the demo config (sets up .venv on first use)"
	@echo "make test   - lint and the test suite (sets up .venv on first use)"
	@echo "make lint   - ruff and the import contracts (lint-imports)"
	@echo "make bench  - benchmarks against peers, lav2 serve under load, memory (benchmarks/README.md; creates benchmarks/.venv-litgpt)"

$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) $(QUIET_PIP)
	$(BIN)/pip install -q -c requirements/lock.txt -e '.[dev,bench]' $(QUIET_PIP)
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/lav2 config check configs/demo.yaml
	$(BIN)/lav2 pipeline configs/demo.yaml
	$(BIN)/lav2 reference check artifacts/train/demo/eval/metrics.json --reference docs/demo-metrics.json

lint: $(STAMP)
	$(BIN)/ruff check src tests flows benchmarks fuzz
	$(BIN)/lint-imports

test: $(STAMP)
	$(BIN)/ruff check src tests flows benchmarks fuzz
	$(BIN)/lint-imports
	$(BIN)/pytest

# LitGPT pins a huggingface-hub that breaks transformers 5.x: it gets its own venv, torch pinned first
# and held by a constraint so litgpt cannot pull another (CUDA) torch.
LITGPT_VENV := benchmarks/.venv-litgpt
LITGPT_VERSION := 0.5.13
BENCH_ARGS ?=

$(LITGPT_VENV)/.installed:
	test -x $(LITGPT_VENV)/bin/python || $(PYTHON) -m venv $(LITGPT_VENV)
	$(LITGPT_VENV)/bin/pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) $(QUIET_PIP)
	echo "torch==$(TORCH_VERSION)" > $(LITGPT_VENV)/constraints.txt
	$(LITGPT_VENV)/bin/pip install -q -c $(LITGPT_VENV)/constraints.txt litgpt==$(LITGPT_VERSION) $(QUIET_PIP)
	touch $@

bench: $(STAMP) $(LITGPT_VENV)/.installed
	$(BIN)/python -m benchmarks.runner $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.serve_load
	$(BIN)/python -m benchmarks.memory

clean-venv:
	rm -rf $(VENV)
