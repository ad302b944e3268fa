# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stackcat-installed

.PHONY: demo test test-fast lint install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[offline,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/stackcat demo

# The full suite (what CI runs), with the 15 slowest tests listed at the end.
test: $(STAMP)
	$(BIN)/python -m pytest --durations=15

# The fast lane for development (under a minute here): everything but the tests marked slow
# (the CLI end to end, subprocesses, clusters, real weights), on every core.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -n auto --durations=15

lint: $(STAMP)
	$(BIN)/ruff check stackcat tests experiments

clean:
	rm -rf $(VENV) artifacts .pytest_cache
