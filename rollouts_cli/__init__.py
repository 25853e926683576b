"""The `rollouts` command and the Prefect setup command: the entry points, on top of `flows/`.

Layers point down only: `rollouts_cli` -> `flows` -> `tasks` -> `rollouts` (stages and models,
no Prefect). tests/test_layers.py checks it.
"""
