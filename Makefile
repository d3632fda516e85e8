# The README's two commands: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE ?= 1

.PHONY: venv test test-faults test-slow lint typecheck pytest demo clean chromium

# Created once and reused; torch is installed first so that pip never resolves a bare `torch` (multi-GB build).
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e ".[dev,app]"
	touch $@

venv: $(BIN)/.installed

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/basedpyright

# The app's browser test drives Debian's chromium with Playwright (Playwright cannot download browsers here);
# installed when missing and possible (root + apt), otherwise that one test is skipped with a message.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null); } || \
	  echo "chromium not installed (needs root and apt-get): the browser test will be skipped"

pytest: venv chromium
	$(BIN)/pytest -q --durations=10

test: lint typecheck pytest

# The app's whole personal loop on the toy world (tests/test_app_loop.py: votes -> personal scorer -> background
# fine-tune -> blind before/after); marked slow (about 10 minutes on two CPU cores), so `make test` leaves it out and
# .ci/run calls it after. -rP prints what the test measured (votes, agreement, job time, blind win rate).
test-slow: venv
	$(BIN)/pytest -q -rP -m slow tests/test_app_loop.py

# Fault-injection and load tests (issue 14: kills during training, disk faults, votes under load with a server kill);
# each takes over a minute, so they run here and not in `make test`. .ci/run calls both targets.
test-faults: venv
	$(BIN)/pytest -q -m faults --durations=10 tests; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]  # 5: none collected

demo: venv
	$(BIN)/workbench demo

clean:
	rm -rf runs outputs .pytest_cache .ruff_cache
