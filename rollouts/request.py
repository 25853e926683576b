"""A collection's request, checked before any work: its parameters, where its chunks run, its
run-level agent.

The `rollouts` command checks it before Prefect starts (Prefect's temporary API alone takes
seconds) and hands it to the flow run it starts (``checked_before_the_flow``); a flow run
started any other way (a deployment, the UI's form, a Python call) checks it itself
(``checked_request``). Either way each check runs once, and always by the functions here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from rollouts.agent_client import check_agents_reachable
from rollouts.collect import DispatchPlan
from rollouts.errors import ConfigError, validation_message
from rollouts.models import CollectConfig, MultiDatasetConfig
from rollouts.replicas import agents_to_check
from rollouts.settings import RolloutsSettings
from rollouts.storage import check_readable, check_writable, is_url

# What probes agents: label -> URLs, connect timeout -> the replicas down while others are up;
# raises AgentUnreachable when every address of an agent is down.
AgentProbe = Callable[[Mapping[str, Sequence[str]], float], Awaitable[list[str]]]


@dataclass(frozen=True)
class RunRequest:
    """A collection's parameters, checked."""

    params: dict[str, Any]  # the flow parameters it was checked from
    config: CollectConfig
    processes: int  # local processes to collect in (1: the flow's own)
    # Set by ``check_agent_first``: the run-level agent resolved, and its replicas found down.
    # None: not checked yet (the run checks its agents after the split).
    plan: DispatchPlan | None = None
    agents_down: tuple[str, ...] | None = None

    def is_for(self, params: Mapping[str, Any]) -> bool:
        """Whether ``params`` (a flow run's, its defaults filled in) ask for this request: the
        ones it was checked from, every other at its default."""
        if any(params.get(k) != v for k, v in self.params.items()):
            return False
        fields = CollectConfig.model_fields
        return all(
            k in fields and v == fields[k].get_default(call_default_factory=True)
            for k, v in params.items()
            if k not in self.params
        )


def check_request(
    params: Mapping[str, Any], settings: RolloutsSettings | None = None
) -> RunRequest:
    """The parameters validated, then where chunks run (ConfigError for either), then the
    files in object storage (``check_storage``)."""
    config = validated_config(params)
    processes = collecting_processes(config, settings or RolloutsSettings())
    check_storage(config.input_jsonl_fpath, [("output", config.output_jsonl_fpath)])
    return RunRequest(dict(params), config, processes)


def check_storage(input_path: str, outputs: Sequence[tuple[str, str]]) -> None:
    """Before any request, what is in object storage: an input read-checked, an output's
    bucket write-checked (a probe object written and deleted beside it): refused credentials,
    a missing bucket or object, an endpoint that does not answer, each in one line naming the
    URL (rollouts/storage.py). ``outputs``: (what, path). A local input is checked by the
    split, a local output by the run's lock, as before."""
    if is_url(input_path):
        check_readable(input_path)
    for _, path in outputs:
        if is_url(path):
            check_writable(path)


def check_multi_storage(config: MultiDatasetConfig) -> None:
    """``check_storage`` of every dataset and of the mix's output, before any dataset starts
    (a mix output in a bucket that cannot take it would otherwise fail after every dataset
    was collected)."""
    for d in config.datasets:
        check_storage(d.input, [(f"dataset {d.name}'s output", d.output)])
    if config.mix is not None and is_url(config.mix.output):
        check_writable(config.mix.output)


def validated_config(params: Mapping[str, Any]) -> CollectConfig:
    try:
        return CollectConfig(**params)
    except ValidationError as e:
        raise ConfigError(validation_message(e)) from None


def collecting_processes(config: CollectConfig, settings: RolloutsSettings) -> int:
    """Local processes to collect in (1: this one). Refuses asking for both a local cluster
    and a remote one."""
    processes = config.process_count()
    if processes == 1 and settings.dask_local_workers:  # the older spelling of `processes`
        processes = min(settings.dask_local_workers, config.in_flight_ceiling)
    if processes > 1 and settings.dask_address:
        raise ConfigError(
            f"processes={config.processes} starts a local cluster, but ROLLOUTS_DASK_ADDRESS "
            f"(--dask-address) names one to use ({settings.dask_address}): choose one"
        )
    if config.slurm_jobs is not None:
        if processes > 1 or settings.dask_address:
            raise ConfigError(
                f"slurm_jobs={config.slurm_jobs} collects in Slurm jobs, but "
                + (f"processes={config.processes} asks for local processes"
                   if processes > 1 else
                   f"ROLLOUTS_DASK_ADDRESS names a Dask cluster ({settings.dask_address})")
                + ": choose one"
            )  # fmt: skip
        settings.slurm_job_shape()  # a bad ROLLOUTS_SLURM_WALLTIME, before anything starts
    return processes


async def agents_down(
    plan: DispatchPlan, settings: RolloutsSettings, probe: AgentProbe = check_agents_reachable
) -> list[str]:
    """Refuses (AgentUnreachable) an agent none of whose addresses accepts a connection: a dead
    address would otherwise spend every attempt and chunk retry first. Returns the replicas
    down while others of their agent are up (collecting goes on without them)."""
    agents = agents_to_check(plan.agents_in_use(), plan.agent_url, settings)
    return await probe(agents, settings.connect_timeout_s)


async def check_agent_first(request: RunRequest, settings: RolloutsSettings) -> RunRequest:
    """The run-level agent resolved (AgentResolutionError) and reachable; the request with its
    plan and the replicas found down. Agents the rows name are known after the split only:
    such a request comes back as it was."""
    if request.config.agent_identity is None:
        return request
    plan = DispatchPlan.for_run(request.config, [], settings)  # the run's own resolution
    return replace(request, plan=plan, agents_down=tuple(await agents_down(plan, settings)))


_handed_over: ContextVar[RunRequest | None] = ContextVar("rollouts_checked_request", default=None)


@contextlib.contextmanager
def checked_before_the_flow(request: RunRequest) -> Iterator[None]:
    """A flow run started in this block for ``request.params`` takes ``request`` as its
    checked request instead of checking it again (flow runs copy the context)."""
    token = _handed_over.set(request)
    try:
        yield
    finally:
        _handed_over.reset(token)


def checked_request(
    params: Mapping[str, Any], settings: RolloutsSettings | None = None
) -> RunRequest:
    """The flow run's request: the one checked before it for these very parameters, else
    checked now."""
    handed = _handed_over.get()
    if handed is not None and handed.is_for(params):
        return handed
    return check_request(params, settings)
