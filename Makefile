# One-command workflows for a fresh machine: `make demo` and `make test`.
# TORCH picks the PyTorch build; it is installed first so no other package pulls a different one
# (for a CUDA machine: make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128").
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test assets clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

setup: $(VENV)/.installed

assets: setup
	$(BIN)/llmquant assets fetch

demo: setup
	$(BIN)/llmquant run configs/demo.yaml --overwrite

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) out
