"""The agent API key goes in the Authorization header and nowhere else."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.settings import PREFECT_HOME, PREFECT_SERVER_DATABASE_CONNECTION_URL

from reference_agent.server import generate_tasks, write_tasks
from rollouts.run_state import OutputPaths, run_dir_for


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


async def prefect_records(output_stem: str) -> tuple[list[Any], list[str]]:
    """Our flow runs and everything Prefect stored about them, as JSON texts."""
    async with get_client() as client:
        runs = [r for r in await client.read_flow_runs() if r.name.endswith(f"/{output_stem}")]
        ids = [r.id for r in runs]
        texts = [r.model_dump_json() for r in runs]
        texts += [
            t.model_dump_json()
            for t in await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))
            )
        ]
        logs = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids))
        )
        texts += [log.model_dump_json() for log in logs]
        texts += [a.model_dump_json() for a in await client.read_artifacts()]
        return runs, texts


def test_api_key_is_sent_as_bearer_and_found_nowhere_else(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    key = f"sk-rollouts-{secrets.token_hex(16)}"
    agent = start_agent("--fail-400-tasks", "1", env={"ROLLOUTS_AGENT_API_KEY": key})
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 12, seed=7)
    out = tmp_path / "secret_out.jsonl"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_LOGGING_LEVEL": "DEBUG",
           "ROLLOUTS_AGENT_API_KEY": key}  # fmt: skip

    res = subprocess.run(
        [sys.executable, "-m", "rollouts_cli", "collect", f"+agent_url={agent.url}",
         f"+input_jsonl_fpath={inp}", f"+output_jsonl_fpath={out}", "+num_repeats=2",
         "+chunk_size=5"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip

    assert res.returncode == 0, res.stderr[-3000:]
    # The agent enforces the key (no header: 401) and accepted every request we sent.
    sent = agent.requests()
    assert len(sent) == 24 and all(q["authorized"] for q in sent)
    row = next(generate_tasks(1)) | {"_ng_task_index": 0, "_ng_rollout_index": 0}
    assert httpx.post(f"{agent.url}/run", json=row).status_code == 401
    assert "DEBUG" in res.stderr + res.stdout  # the logs really were at debug level

    runs, prefect_texts = asyncio.run(prefect_records(out.stem))
    assert len(runs) == 1 and runs[0].parameters["output_jsonl_fpath"] == str(out)
    assert len(prefect_texts) > 5  # task runs and logs were read back, not nothing

    places: dict[str, bytes] = {
        "CLI stdout": res.stdout.encode(),
        "CLI stderr": res.stderr.encode(),
        "flow-run parameters": orjson.dumps([r.parameters for r in runs]),
        "Prefect API records": "\n".join(prefect_texts).encode(),
    }
    roots = {
        "result storage": Path(os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"]),
        "run state": run_dir_for(out, None).parent,  # chunks, partial outputs, locks
        "Prefect database": Path(
            PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1]
        ).parent,
        "PREFECT_HOME": Path(PREFECT_HOME.value()),
    }
    scanned = 0
    for name, root in roots.items():
        for p in files_under(root):
            places[f"{name}: {p}"] = p.read_bytes()
            scanned += 1
    for p in OutputPaths.for_output(out).all():
        places[f"output {p.name}"] = p.read_bytes()
    assert len(files_under(Path(os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"]))) > 0
    assert scanned > 10

    leaks = [where for where, data in places.items() if key.encode() in data]
    assert leaks == [], f"the API key leaked into: {leaks}"
