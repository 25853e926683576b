"""Prefect objects our deployments rely on, beyond prefect.yaml: the automatic-resume automation,
and the deployments' parameter forms in the shape the UI shows well.

`python -m rollouts_cli.prefect_setup` (run by `make deploy`) creates or updates them on the
server that PREFECT_API_URL names.

A flow run whose process dies (worker or flow-run process killed, OOM) ends Crashed. The
automation puts it back to Scheduled: the same run, same parameters, picked up again by a
worker, where finished chunks are cache hits and unfinished ones skip what was written. The
flow itself refuses to start after `ROLLOUTS_MAX_AUTO_RESUMES` such resumes, so a run that
crashes every time stops instead of looping.
"""

from __future__ import annotations

import asyncio
import copy
from datetime import timedelta

from prefect.automations import Automation, ChangeFlowRunState, EventTrigger, Posture
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound

from rollouts.models import form_schema_of_properties

AUTOMATION_NAME = "rollouts-resume-crashed-runs"
CRASH_REPORT_WINDOW_S = 30
FLOW_NAMES = ["collect-rollouts", "collect-multi-dataset"]
CRASHED_EVENT = "prefect.flow-run.Crashed"


def resume_automation(flow_ids: list[str]) -> Automation:
    """The automation for the flows with these ids (the UI names the flows and the state only
    for a trigger in the shape of its own "flow run state" form: flows matched by id)."""
    return Automation(
        name=AUTOMATION_NAME,
        description=(
            f"When a flow run of {' or '.join(FLOW_NAMES)} enters Crashed (event "
            f"{CRASHED_EVENT}, e.g. its process was killed), set it back to Scheduled "
            "(AwaitingRetry): a worker picks it up again and it resumes from the cache. "
            "Runs in other states (Failed, Cancelled, Completed) are left alone; the flow "
            "stops by itself after ROLLOUTS_MAX_AUTO_RESUMES resumes."
        ),
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            expect={CRASHED_EVENT},
            match_related={
                "prefect.resource.role": "flow",
                "prefect.resource.id": [f"prefect.flow.{i}" for i in flow_ids],
            },
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
            # One crash is reported twice (by the flow-run's runner and by the worker). A
            # reactive trigger fires once per window, so the run is rescheduled once.
            within=timedelta(seconds=CRASH_REPORT_WINDOW_S),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.SCHEDULED,
                name="AwaitingRetry",
                message="rescheduled after a crash: resuming from the cache",
                force=True,
            )
        ],
    )


async def ensure_resume_automation() -> None:
    """Create (or replace) the automation; run after `prefect deploy`, which registers the flows."""
    async with get_client() as client:
        try:
            flow_ids = [str((await client.read_flow_by_name(n)).id) for n in FLOW_NAMES]
        except ObjectNotFound:
            raise SystemExit(
                f"the flows {', '.join(FLOW_NAMES)} are not on this server yet: deploy first "
                "(`make deploy` does both)"
            ) from None
    wanted = resume_automation(flow_ids)
    try:
        existing = await Automation.aread(name=AUTOMATION_NAME)
    except ValueError:
        existing = None
    if existing is not None:
        await existing.adelete()
    await wanted.acreate()


async def reshape_deployment_forms() -> list[str]:
    """Each of our deployments' parameter schema with every optional parameter as its own type,
    without a null option or a null default (``rollouts.models.form_schema``: the UI would show
    a "null" toggle and `Property is type "None"`; left empty, the form now sends nothing and
    the flow's default applies). Prefect builds the schema from the flow's signature, where a
    parameter's JSON schema can only be extended, so it is reshaped here, after `prefect
    deploy`. Returns the names of the deployments updated."""
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    updated = []
    async with get_client() as client:
        deployments = await client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=FLOW_NAMES))
        )
        for d in deployments:
            schema = copy.deepcopy(d.parameter_openapi_schema or {})
            form_schema_of_properties(schema)
            if schema != d.parameter_openapi_schema:
                await client.update_deployment(
                    d.id, DeploymentUpdate(parameter_openapi_schema=schema)
                )
                updated.append(d.name)
    return updated


def main() -> None:
    asyncio.run(ensure_resume_automation())
    print(f"automation {AUTOMATION_NAME!r} is in place")
    updated = asyncio.run(reshape_deployment_forms())
    print(f"parameter forms reshaped: {len(updated)} deployment(s)")


if __name__ == "__main__":
    main()
