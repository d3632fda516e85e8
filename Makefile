# The README's two commands: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE ?= 1

.PHONY: venv test lint typecheck pytest demo clean

# Created once and reused; torch is installed first so that pip never resolves a bare `torch` (multi-GB build).
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/basedpyright

pytest: venv
	$(BIN)/pytest -q --durations=10

test: lint typecheck pytest

demo: venv
	$(BIN)/workbench demo

clean:
	rm -rf runs outputs .pytest_cache .ruff_cache
