"""Thin Prefect tasks, one stage per module. The work itself lives in `rollouts.*`."""
