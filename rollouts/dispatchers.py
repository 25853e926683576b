"""The per-process registry of dispatchers, one per run.

Chunk tasks of one run share a dispatcher (one HTTP client, one in-flight budget) when they run
on the same event loop. Its key is the run id, a plain string, so task inputs stay hashable and
free of clients or locks.
"""

from __future__ import annotations

from rollouts.agent_client import RetryPolicy
from rollouts.collect import Dispatcher
from rollouts.settings import RolloutsSettings

_dispatchers: dict[str, Dispatcher] = {}


def open_dispatcher(
    run_id: str, settings: RolloutsSettings, max_in_flight: int, max_parallel_chunks: int
) -> Dispatcher:
    key = run_id
    if key not in _dispatchers:
        api_key = settings.agent_api_key.get_secret_value() if settings.agent_api_key else None
        _dispatchers[key] = Dispatcher(
            RetryPolicy.from_settings(settings), max_in_flight, max_parallel_chunks, api_key
        )
    return _dispatchers[key]


def get_dispatcher(run_id: str) -> Dispatcher:
    try:
        return _dispatchers[run_id]
    except KeyError:
        raise RuntimeError(
            f"no dispatcher open for run {run_id} in this process; the flow opens it"
        ) from None


async def close_dispatcher(run_id: str) -> None:
    dispatcher = _dispatchers.pop(run_id, None)
    if dispatcher is not None:
        await dispatcher.aclose()
