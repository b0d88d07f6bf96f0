# Two commands do all set-up: `make demo` and `make test` (see README).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.object2brain-installed
OUT ?= demo_out

.PHONY: demo test lint typecheck pytest install docs clean chromium

# torch/torchvision are pinned here, not in pyproject.toml: 2.14.1/0.29.1 are the builds that
# this machine (and CI) install from local files, and the only pair whose torchvision loads.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[dev,findingemo,ray]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/object2brain demo --out $(OUT)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks validation
	$(BIN)/ruff format --check src tests benchmarks validation

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

# The report's browser test drives the system Chromium (playwright from the dev extra, no
# browser download): install it when missing and we are root; a failure leaves the test's skip
# reason to say so.
chromium:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && apt-get install -y -qq chromium) || \
		echo "chromium could not be installed: the browser tests will be skipped"

test: lint typecheck chromium pytest

# Regenerate docs/formats.md and docs/cli.md from the code (a test fails while they are stale).
docs: $(STAMP)
	$(BIN)/python -m object2brain.reference

clean:
	rm -rf $(VENV) $(OUT) .mypy_cache .pytest_cache .ruff_cache
