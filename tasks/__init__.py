"""Thin Prefect tasks, one stage per module. The work itself lives in `rollouts.*`."""

from rollouts.logs import quiet_user_error_tracebacks

# Wherever our tasks run (CLI, a deployment's flow-run process, a Dask worker), an error we
# raise on purpose is logged as its message, without a traceback through Prefect's engine.
quiet_user_error_tracebacks()
