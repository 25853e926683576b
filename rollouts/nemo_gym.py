"""NeMo Gym's names: the fields of its rows and answers that the collector and the reference
agent read or write (the rows of NeMo Gym's ``ng_collect_rollouts`` and its agents' ``/run``). They are the wire format, shared with
NeMo Gym's own tools and NeMo RL: never change a value. A constant is its field's name in upper
case (without the leading underscore), so ``row[NG_TASK_INDEX]`` reads as the row's
``_ng_task_index``. Messages and help texts spell the fields out, as users read and search them.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import itemgetter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # this module imports nothing of the package: names only
    from rollouts.models import RolloutKey

# An input row's fields (and a /run body's).
RESPONSES_CREATE_PARAMS = "responses_create_params"  # OpenAI Responses API create params
AGENT_REF = "agent_ref"  # {"name": agent}: which agent serves the row
NG_TASK_INDEX = "_ng_task_index"  # the task's index; kept when the input has it
NG_ROLLOUT_INDEX = "_ng_rollout_index"  # 0..num_repeats-1 for each task

# An answer's fields.
RESPONSE = "response"  # the OpenAI Response object; its usage holds the token counts
REWARD = "reward"  # the verifier's reward
# An agent's word that a rollout failed: the failure's class (the answer is a failure row)...
NG_FAILURE_CLASS = "_ng_failure_class"
NG_FAILURE_TERMINAL = "_ng_failure_terminal"  # ...true: never retry it
NG_NO_PERSIST = "_ng_no_persist"  # true: write the answer nowhere (a later resume redoes it)

key_of: Callable[[dict[str, Any]], RolloutKey] = itemgetter(NG_TASK_INDEX, NG_ROLLOUT_INDEX)
"""A row's ``(_ng_task_index, _ng_rollout_index)``: the identity of its rollout (KeyError
without either). An ``itemgetter``: resume scans and merge call it for every row, and it costs
no more than the tuple written out in place; a Python function would cost a call frame."""
