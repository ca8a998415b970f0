# Every target sets up its own virtualenv on first use, so a fresh clone needs only python3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv run test lint typecheck bench schema validate clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)            ## run the repo's flows (embedded Redis unless CORTEX_REDIS_URL is set)
	$(BIN)/cortex-flow run

test: $(STAMP)           ## the test suite (uses Redis on 127.0.0.1:6379, or starts a private one)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check cortex_flow tests bench agents_example
	$(BIN)/ruff format --check cortex_flow tests bench agents_example
	$(BIN)/mypy

validate: $(STAMP)
	$(BIN)/cortex-flow validate
	$(BIN)/cortex-flow schema --check
	$(BIN)/python -m cortex_flow.docgen --check

bench: $(STAMP)          ## benchmarks: figures and ratios against hand-written baselines
	$(BIN)/python bench/run.py

schema: $(STAMP)
	$(BIN)/cortex-flow schema

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
