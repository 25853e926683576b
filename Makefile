# The one place where commands live.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install demo test lint clean

$(BIN)/rollouts: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/rollouts

## Start the reference agent simulator, collect the bundled sample, print the summary.
demo: install
	bash scripts/demo.sh

## The test suite (real agent processes and a real Prefect server on 127.0.0.1).
test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check rollouts flows tasks tests

clean:
	rm -rf out .rollouts
