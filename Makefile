# One-command workflows for a fresh machine: `make demo` and `make test`.
# TORCH picks the PyTorch build; it is installed first so no other package pulls a different one
# (for a CUDA machine: make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128").
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test wheel-check gpu-check assets clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# on a machine with a CUDA GPU (make setup TORCH=... with a CUDA build first): see scripts/gpu_check.py
gpu-check: setup
	PYTHON=$(BIN)/python scripts/gpu_check.sh

assets: setup
	$(BIN)/llmquant assets fetch

demo: setup
	mkdir -p out
	test -f out/demo.yaml || $(BIN)/llmquant init demo -o out/demo.yaml
	$(BIN)/llmquant run out/demo.yaml --overwrite

test: setup
	$(BIN)/python -m pytest

# the wheel installed outside the source tree with the oldest supported transformers: demo, eval, compatibility tests
wheel-check: setup
	PYTHON=$(BIN)/python scripts/wheel_check.sh

clean:
	rm -rf $(VENV) out
