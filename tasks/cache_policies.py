"""Cache policies that survive new flow runs: keys from content and result-changing inputs.

Prefect's default policy includes the flow-run id, so a rerun would redo everything. Ours key on
what a step's result depends on (chunk content, sampling parameters, the run state's id) and
never on paths or concurrency. Every key also includes the task's source and name, because keys
share one storage across tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from prefect import Task, task
from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects


@dataclass
class KeyFromInputs(CachePolicy):
    """Key = hash of ``identity(inputs)`` and the task's name; None means "do not cache"."""

    identity: Callable[[dict[str, Any]], Any] = field(default=lambda inputs: None)

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        ident = self.identity(inputs)
        if ident is None:
            return None
        return hash_objects(task_ctx.task.name, ident, raise_on_failure=True)


def content_policy(identity: Callable[[dict[str, Any]], Any]) -> CachePolicy:
    return TASK_SOURCE + KeyFromInputs(identity=identity)


P = ParamSpec("P")
R = TypeVar("R")
AsyncStage = Callable[P, Coroutine[Any, Any, R]]


def cached_stage(
    name: str, identity: Callable[[dict[str, Any]], Any], retries: int = 1
) -> Callable[[AsyncStage[P, R]], Task[P, Coroutine[Any, Any, R]]]:
    """A whole-run stage (split, merge, metrics, mix) as a task: named for the UI, its result
    persisted and keyed by ``identity``, so a rerun gets it back instead of redoing it."""

    def decorate(fn: AsyncStage[P, R]) -> Task[P, Coroutine[Any, Any, R]]:
        return task(
            name=name, task_run_name=name, cache_policy=content_policy(identity),
            persist_result=True, retries=retries,
        )(fn)  # fmt: skip

    return decorate
