# The two entry points of the README. Each sets up .venv on first use (torch 2.13 CPU build, k2c, test extras).
# `make test` lints (ruff), type-checks (mypy) and runs the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.k2c-installed

.PHONY: train test
train: $(STAMP)
	$(BIN)/k2c train specs/k2-tiny.yaml

test: $(STAMP)
	$(BIN)/ruff check k2c tests scripts benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -n auto

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)
