# The one place where commands live.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# No telemetry and no first-run telemetry notice (offline machines): the server's setting and
# the client's (DO_NOT_TRACK, read from the environment only). `rollouts` sets both by itself.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

# Prefect state of this checkout (its result cache, the local server's SQLite database).
export PREFECT_HOME ?= $(CURDIR)/.prefect

# The local Prefect server. Only `server`, `deploy` and `worker` talk to it: `demo` and `test`
# must work whether or not a server runs (a test suite or a demo that fails because port 4200
# is down, or up, is a trap). Change the port here and every server target follows:
#   make server PREFECT_PORT=4300   (and in other shells: export PREFECT_API_URL=http://127.0.0.1:4300/api)
# `server` keeps its database in PREFECT_HOME (SQLite) unless the environment names another one.
# For real use (concurrent subflows: SQLite stalls them on its database lock) use PostgreSQL:
#   createdb -h 127.0.0.1 -U postgres prefect
#   PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/prefect make server
PREFECT_PORT ?= 4200
SERVER_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api
# The reference agent of `make agent`, which the deployments' defaults name `reference`:
#   make agent AGENT_PORT=8800   (and: make worker AGENT_PORT=8800)
AGENT_PORT ?= 8765
REFERENCE_AGENTS ?= {"reference": "http://127.0.0.1:$(AGENT_PORT)"}

.PHONY: install demo test test-fast typecheck lint docs clean server deploy worker agent slurm slurm-stop

$(BIN)/rollouts: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@# -qq: errors only; this keeps a machine's pip configuration notes out of the first screen.
	$(BIN)/pip install -qq --upgrade pip
	$(BIN)/pip install -qq -e '.[dev]'
	touch $@

install: $(BIN)/rollouts

## Start the reference agent simulator, collect the bundled sample, print the summary.
demo: install
	bash scripts/demo.sh

## The type checker (strict, pyproject.toml [tool.mypy]), then the test suite (real agent
## processes and a real Prefect server on 127.0.0.1).
test: typecheck
	$(BIN)/python -m pytest -q

typecheck: install
	$(BIN)/mypy

## The stages alone: no Prefect, no agent processes (seconds, not minutes).
test-fast: install
	$(BIN)/python -m pytest -q -m fast

lint: install
	$(BIN)/ruff check rollouts rollouts_cli flows tasks reference_agent tests

## docs/parameters.md's tables, regenerated from the parameters' declaration (rollouts/models.py).
docs: install
	$(BIN)/python -m rollouts_cli.parameters_table --write

clean:
	rm -rf out .rollouts

## A Prefect server on 127.0.0.1:$(PREFECT_PORT) with its UI (foreground).
server: install
	PREFECT_API_URL=$(SERVER_API_URL) $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

## The `rollouts` process pool, every deployment of prefect.yaml, the crash-resume automation.
deploy: export PREFECT_API_URL ?= $(SERVER_API_URL)
deploy: install
	$(BIN)/prefect work-pool inspect rollouts >/dev/null 2>&1 || \
		$(BIN)/prefect work-pool create rollouts --type process
	$(BIN)/prefect --no-prompt deploy --all
	$(BIN)/python -m rollouts_cli.prefect_setup

## A worker for the `rollouts` pool (foreground). Agents resolve in its environment.
worker: export PREFECT_API_URL ?= $(SERVER_API_URL)
worker: export ROLLOUTS_AGENTS ?= $(REFERENCE_AGENTS)
worker: install
	$(BIN)/prefect worker start --pool rollouts

## The reference agent simulator as agent `reference` for the deployments' defaults.
agent: install
	$(BIN)/rollouts serve-agent --port $(AGENT_PORT) --latency-ms 20

## A one-node Slurm on this machine (root; installs Debian's slurm-wlm and munge when missing,
## writes /etc/slurm/slurm.conf from scripts/slurm/slurm.conf.in). The tests start it themselves.
## `slurm-stop` stops only the daemons that `make slurm` started.
slurm:
	bash scripts/slurm.sh start

slurm-stop:
	bash scripts/slurm.sh stop
