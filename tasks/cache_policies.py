"""Cache policies that survive new flow runs: keys from content and result-changing inputs.

Prefect's default policy includes the flow-run id, so a rerun would redo everything. Ours key on
what a step's result depends on (chunk content, sampling parameters, the run state's id) and
never on paths or concurrency. Every key also includes the task's source and name, because keys
share one storage across tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
