"""Deployments on a real PostgreSQL-backed Prefect server and a process worker, deployed from
prefect.yaml; the README's deployment examples, run as written."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from conftest import ROOT, AgentServer, read_jsonl, write_jsonl
from pg_prefect import PgPrefectServer
from test_prefect_ui import assert_a_form_that_reads_well

from reference_agent.server import generate_tasks, write_tasks
from rollouts.run_state import run_dir_for

BIN = Path(sys.executable).parent


# What a deployment's flow run needs of the checkout. The test deploys from a directory of
# links to them: prefect.yaml's pull step makes the deploying directory the flow runs' working
# directory, so relative paths (the defaults' outputs) land there, not in the checkout's out/.
PROJECT_FILES = ("prefect.yaml", "flows", "tasks", "rollouts", "rollouts_cli", "data",
                 "examples", "scripts")  # fmt: skip


@dataclass
class PrefectStack:
    env: dict[str, str]
    agent: AgentServer
    tmp: Path
    project: Path  # where `make deploy` ran: the flow runs' working directory

    def prefect(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "prefect"), *args], env=self.env, cwd=self.project, capture_output=True,
            text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def run_deployment(self, name: str, *args: str, watch: bool = True) -> str:
        """The flow run's id; with ``watch``, `prefect deployment run --watch` waits for it
        (its exit code says whether it completed)."""
        res = self.prefect("deployment", "run", name, *args, *(["--watch"] if watch else []),
                           timeout=300)  # fmt: skip
        assert "UUID:" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
        return res.stdout.split("UUID:")[1].split()[0]

    async def flow_run(self, flow_run_id: str) -> Any:
        from prefect.client.orchestration import PrefectClient

        async with PrefectClient(self.env["PREFECT_API_URL"]) as client:
            return await client.read_flow_run(flow_run_id)

    def state_history(self, flow_run_id: str) -> list[str]:
        """The run's states in order, as "Type/Name: message", for assertion messages."""
        from prefect.client.orchestration import PrefectClient

        async def read() -> list[Any]:
            async with PrefectClient(self.env["PREFECT_API_URL"]) as client:
                return await client.read_flow_run_states(flow_run_id)

        states = sorted(asyncio.run(read()), key=lambda s: s.timestamp)
        return [f"{s.type.value}/{s.name}: {(s.message or '')[:80]}" for s in states]

    def wait_final(self, flow_run_id: str, timeout: float = 180) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fr = asyncio.run(self.flow_run(flow_run_id))
            if fr.state and fr.state.is_final() and fr.state.type.value != "CRASHED":
                return fr
            time.sleep(1)
        raise AssertionError(f"flow run {flow_run_id} did not finish: {fr.state}")


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, pg_prefect: PgPrefectServer
) -> Iterator[PrefectStack]:
    """The production setup: the session's PostgreSQL-backed server, the `rollouts` process
    pool with prefect.yaml's deployments and the resume automation, a worker, an agent."""
    tmp = tmp_path_factory.mktemp("prefect-stack")
    project = tmp / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        (project / name).symlink_to(ROOT / name)
    (project / ".venv").symlink_to(sys.prefix)  # for the README's `source .venv/bin/activate`
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("ROLLOUTS_", "PREFECT_"))},
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_API_URL": pg_prefect.api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp / "results"),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "ROLLOUTS_CHUNK_RETRY_DELAY_S": "0",
        "ROLLOUTS_BACKOFF_BASE_S": "0.02",
        "PWD": str(project),  # prefect.yaml's {{ $PWD }}
    }
    procs: list[subprocess.Popen[bytes]] = []
    agent_log = tmp / "agent-requests.jsonl"
    agent_proc = subprocess.Popen(
        [sys.executable, "-m", "reference_agent", "--port", "0", "--latency-ms", "10",
         "--request-log", str(agent_log)], stdout=subprocess.PIPE,
    )  # fmt: skip
    procs.append(agent_proc)
    assert agent_proc.stdout is not None
    agent_url = agent_proc.stdout.readline().decode().rsplit(" ", 1)[-1].strip()
    env["ROLLOUTS_AGENTS"] = orjson.dumps({"reference": agent_url}).decode()
    try:
        s = PrefectStack(env, AgentServer(agent_url, agent_proc, agent_log), tmp, project)
        res = s.prefect("work-pool", "create", "rollouts", "--type", "process")
        assert res.returncode == 0, res.stderr
        res = s.prefect("--no-prompt", "deploy", "--all")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        res = subprocess.run([sys.executable, "-m", "rollouts_cli.prefect_setup"], env=env,
                             capture_output=True, text=True, check=False)  # fmt: skip
        assert res.returncode == 0, res.stderr
        procs.append(subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "rollouts"],
            env=env, cwd=tmp, stdout=open(tmp / "worker.log", "wb"), stderr=subprocess.STDOUT,
        ))  # fmt: skip
        yield s
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp / "prefect-home", ignore_errors=True)


def keys(rows: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in rows]


def test_deployment_run_with_param_and_params(stack: PrefectStack) -> None:
    out = stack.tmp / "deployed" / "sample.jsonl"
    flow_run_id = stack.run_deployment(
        "collect-rollouts/local",
        "--flow-run-name", "ui-form-run",  # as typed into the UI's run form
        "--param", f"output_jsonl_fpath={out}",
        "--param", "num_repeats=2",
        "--params", '{"responses_create_params": {"temperature": 0.7}, "limit": 30}',
    )  # fmt: skip
    fr = stack.wait_final(flow_run_id)
    assert fr.state.is_completed(), fr.state
    assert fr.name == "deployed/sample (ui-form-run)"  # a name given in the form is kept
    rows = read_jsonl(out)
    assert keys(rows) == [(t, r) for t in range(30) for r in range(2)]
    assert {r["responses_create_params"]["temperature"] for r in rows} == {0.7}
    assert {r["agent_ref"]["name"] for r in rows} == {"reference"}
    assert (out.parent / "sample_aggregate_metrics.json").exists()
    assert (out.parent / "sample_failures.jsonl").read_bytes() == b""


def test_what_make_deploy_creates_is_stored_in_the_servers_postgresql_database(
    stack: PrefectStack, pg_prefect: PgPrefectServer
) -> None:
    # Read from PostgreSQL directly, not through the API: a server that fell back to SQLite
    # would answer the API the same and fail here. (Flow runs: tests/test_multi_dataset.py.)
    deployments = pg_prefect.query(
        "SELECT f.name, d.name, p.name FROM deployment d JOIN flow f ON f.id = d.flow_id"
        " JOIN work_queue q ON q.id = d.work_queue_id JOIN work_pool p ON p.id = q.work_pool_id"
    )
    assert sorted(deployments) == [("collect-multi-dataset", "local", "rollouts"),
                                   ("collect-rollouts", "continuous", "rollouts"),
                                   ("collect-rollouts", "local", "rollouts")]  # fmt: skip
    automations = pg_prefect.query("SELECT name, enabled FROM automation")
    assert automations == [("rollouts-resume-crashed-runs", True)]


def test_killed_flow_run_process_resumes_by_itself(stack: PrefectStack) -> None:
    inp = stack.tmp / "big.jsonl"
    write_tasks(inp, 1500, seed=9)
    out = stack.tmp / "deployed" / "big.jsonl"
    sent_before = len(stack.agent.requests())
    flow_run_id = stack.run_deployment(
        "collect-rollouts/local", "--param", f"input_jsonl_fpath={inp}",
        "--param", f"output_jsonl_fpath={out}", "--param", "num_repeats=1",
        "--param", "chunk_size=300", "--param", "num_samples_in_parallel=4", watch=False,
    )  # fmt: skip
    run_dir = run_dir_for(out, None)
    lock = run_dir.with_name(run_dir.name + ".lock")
    deadline = time.monotonic() + 120
    while sum(p.read_bytes().count(b"\n") for p in (run_dir / "chunks").glob("*.rollouts.jsonl")
              ) < 200 if run_dir.exists() else True:  # fmt: skip
        assert time.monotonic() < deadline, "the deployed run made no progress"
        time.sleep(0.1)
    pid = int(lock.read_text().rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)  # the flow-run process, as an OOM kill would

    fr = stack.wait_final(flow_run_id, timeout=240)

    assert fr.state.is_completed(), fr.state
    assert fr.run_count == 2  # crashed once, resumed once, by the automation alone
    assert keys(read_jsonl(out)) == [(t, 0) for t in range(1500)]
    per_key = Counter(q["_ng_task_index"] for q in stack.agent.requests()[sent_before:])
    assert set(per_key) == set(range(1500))
    assert sum(1 for c in per_key.values() if c > 1) <= 4  # only those in flight at the kill


def test_cancelling_a_deployed_run_stops_it_and_the_next_run_completes_it(
    stack: PrefectStack,
) -> None:
    """The UI's Cancel on a deployed run (the worker's path): the run ends Cancelled, not
    Crashed (the resume automation leaves it alone), and a new run of the deployment resends
    only what was cut in flight."""
    from prefect.client.orchestration import PrefectClient
    from prefect.states import Cancelling

    inp = stack.tmp / "to-cancel.jsonl"
    write_tasks(inp, 1500, seed=12)
    out = stack.tmp / "deployed" / "to-cancel.jsonl"
    params = ("--param", f"input_jsonl_fpath={inp}", "--param", f"output_jsonl_fpath={out}",
              "--param", "num_repeats=1", "--param", "chunk_size=300",
              "--param", "num_samples_in_parallel=4")  # fmt: skip
    sent_before = len(stack.agent.requests())
    flow_run_id = stack.run_deployment("collect-rollouts/local", *params, watch=False)
    run_dir = run_dir_for(out, None)
    deadline = time.monotonic() + 120
    while sum(p.read_bytes().count(b"\n") for p in (run_dir / "chunks").glob("*.rollouts.jsonl")
              ) < 200 if run_dir.exists() else True:  # fmt: skip
        assert time.monotonic() < deadline, "the deployed run made no progress"
        time.sleep(0.1)

    async def cancel() -> None:
        async with PrefectClient(stack.env["PREFECT_API_URL"]) as client:
            await client.set_flow_run_state(flow_run_id, Cancelling())

    asyncio.run(cancel())
    fr = stack.wait_final(flow_run_id, timeout=120)
    assert fr.state.type.value == "CANCELLED", fr.state
    time.sleep(3)  # long enough for the automation to have acted, were it to
    run_count = asyncio.run(stack.flow_run(flow_run_id)).run_count
    assert run_count == 1, stack.state_history(flow_run_id)

    again = stack.wait_final(stack.run_deployment("collect-rollouts/local", *params))
    assert again.state.is_completed(), again.state
    assert keys(read_jsonl(out)) == [(t, 0) for t in range(1500)]
    per_key = Counter(q["_ng_task_index"] for q in stack.agent.requests()[sent_before:])
    assert set(per_key) == set(range(1500))
    assert sum(1 for c in per_key.values() if c > 1) <= 4  # only those in flight at the cancel


def test_continuous_deployment_collects_exactly_the_new_rows(stack: PrefectStack) -> None:
    tasks = list(generate_tasks(90, seed=3))
    inp = write_jsonl(stack.tmp / "stream.jsonl", tasks[:50])
    out = stack.tmp / "deployed" / "stream.jsonl"
    params = ("--param", f"input_jsonl_fpath={inp}", "--param", f"output_jsonl_fpath={out}")

    def run_once() -> Any:
        return stack.wait_final(stack.run_deployment("collect-rollouts/continuous", *params))

    sent_before = len(stack.agent.requests())
    first = run_once()
    assert first.state.is_completed()
    assert first.name == "deployed/stream"  # not the server's random name
    write_jsonl(inp, tasks)  # 40 rows land between two scheduled runs
    assert run_once().state.is_completed()

    rows = read_jsonl(out)
    assert keys(rows) == [(t, r) for t in range(90) for r in range(2)]
    per_key = Counter((q["_ng_task_index"], q["_ng_rollout_index"])
                      for q in stack.agent.requests()[sent_before:])  # fmt: skip
    assert len(per_key) == 180 and set(per_key.values()) == {1}

    tasks[10]["expected_answer"] = "changed"
    write_jsonl(inp, tasks)
    fr = run_once()
    assert fr.state.is_failed() and "stream.jsonl:11" in fr.state.message
    assert keys(read_jsonl(out)) == [(t, r) for t in range(90) for r in range(2)]


def test_deployed_forms_describe_every_field_and_the_automation_says_what_it_does(
    stack: PrefectStack,
) -> None:
    from prefect.client.orchestration import PrefectClient

    async def read() -> tuple[list[Any], list[Any]]:
        async with PrefectClient(stack.env["PREFECT_API_URL"]) as client:
            deployments = [
                await client.read_deployment_by_name(name)
                for name in ("collect-rollouts/local", "collect-rollouts/continuous",
                             "collect-multi-dataset/local")
            ]  # fmt: skip
            return deployments, await client.read_automations_by_name(
                "rollouts-resume-crashed-runs"
            )

    deployments, automations = asyncio.run(read())
    for d in deployments:
        schema = d.parameter_openapi_schema
        fields = [(name, p) for name, p in schema["properties"].items()] + [
            (f"{model}.{name}", p)
            for model, definition in schema.get("definitions", {}).items()
            for name, p in definition.get("properties", {}).items()
        ]
        undescribed = [name for name, p in fields if not p.get("description")]
        raw_titles = [name for name, p in fields if p.get("title") == name.split(".")[-1]]
        assert not undescribed and not raw_titles, (d.name, undescribed, raw_titles)
        assert_a_form_that_reads_well(schema)  # as `make deploy` reshaped it
    (automation,) = automations
    for words in ("collect-rollouts", "collect-multi-dataset", "Crashed", "Scheduled"):
        assert words in automation.description
    # The UI's "flow run state" shape (else it reads "A custom trigger"): flow runs, matched to
    # our two flows by id, one state, threshold 1.
    trigger = automation.trigger
    flow_ids = {f"prefect.flow.{d.flow_id}" for d in deployments}
    assert len(flow_ids) == 2
    assert trigger.match["prefect.resource.id"] in ("prefect.flow-run.*", ["prefect.flow-run.*"])
    assert set(trigger.match_related["prefect.resource.id"]) == flow_ids
    assert trigger.expect == {"prefect.flow-run.Crashed"} and trigger.threshold == 1


def readme_section(title: str) -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return readme.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def bash_block(section: str, containing: str) -> str:
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if containing in b]
    return block


def outputs_of(parameters: dict[str, Any], cwd: Path) -> set[Path]:
    """Every output a collect-rollouts or collect-multi-dataset run with ``parameters`` writes
    when it runs in ``cwd``."""
    if "config" in parameters:
        config = parameters["config"]
        paths = [d["output"] for d in config["datasets"]]
        paths += [config["mix"]["output"]] if config.get("mix") else []
    else:
        paths = [parameters["output_jsonl_fpath"]]
    return {Path(os.path.normpath(cwd / p)) for p in paths}


def test_the_readmes_deployment_examples_run_as_written_and_leave_the_defaults_working(
    stack: PrefectStack,
) -> None:
    """The README's examples of "Run it from Prefect", taken from the README itself, in a clean
    shell set up as the README says, against the running server; then every deployment's
    default run (what its schedule starts) still completes, and a run that would change a
    default output's parameters is refused naming the form's "Start fresh"."""
    from prefect.client.orchestration import PrefectClient

    section = readme_section("Run it from Prefect (deployments, schedules, automatic resume)")
    setup = bash_block(section, "source .venv/bin/activate")
    examples = bash_block(section, "prefect deployment run")
    api_url = stack.env["PREFECT_API_URL"]
    script = (f"set -euo pipefail\n{setup}\n"
              f"export PREFECT_API_URL={api_url}  # this test's server, not :4200\n{examples}")  # fmt: skip
    clean_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(stack.tmp / "home"),
                 "LANG": "C.UTF-8"}  # fmt: skip
    res = subprocess.run(["bash", "-c", script], cwd=stack.project, env=clean_env,
                         capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    example_runs = re.findall(r"UUID: ([0-9a-f-]{36})", res.stdout)
    assert len(example_runs) == examples.count("prefect deployment run") == 3, res.stdout

    names = ("collect-rollouts/local", "collect-multi-dataset/local", "collect-rollouts/continuous")

    async def read() -> tuple[list[Any], list[Any]]:
        async with PrefectClient(api_url) as client:
            return ([await client.read_flow_run(i) for i in example_runs],
                    [await client.read_deployment_by_name(n) for n in names])  # fmt: skip

    runs, deployments = asyncio.run(read())
    assert all(r.state.is_completed() for r in runs), [r.state for r in runs]
    # Outputs of their own: none of the deployments' defaults, none of `make demo`'s.
    cwd = stack.project
    default_outputs = set().union(*(outputs_of(d.parameters, cwd) for d in deployments))
    demo = yaml.safe_load((ROOT / "examples/mix.yaml").read_text(encoding="utf-8"))
    taken = default_outputs | outputs_of({"config": demo}, cwd)
    for run in runs:
        assert not outputs_of(run.parameters, cwd) & taken, run.parameters

    for name in names:  # what the schedules start
        fr = stack.wait_final(stack.run_deployment(name))
        assert fr.state.is_completed(), (name, fr.state)
    default_rows = read_jsonl(stack.project / "out/deployed/sample_rollouts.jsonl")
    assert len(default_rows) == 200 * 4
    assert {r["responses_create_params"]["temperature"] for r in default_rows} == {0.4}

    # The mistake the examples no longer make, made on purpose: refused, with the way out as
    # the run form names it, and the default output untouched.
    (local,) = [d for d in deployments if d.name == "local" and "config" not in d.parameters]
    form_title = local.parameter_openapi_schema["properties"]["fresh"]["title"]
    assert form_title == "Start fresh"
    refused = stack.wait_final(stack.run_deployment(
        "collect-rollouts/local", "--params", '{"responses_create_params": {"temperature": 0.7}}'))  # fmt: skip
    assert refused.state.is_failed()
    assert refused.state.message.endswith(
        "Mixing them would corrupt the dataset: write to another output, or set the `fresh` "
        f'parameter ("{form_title}" in the UI form) to discard it and start over.'
    ), refused.state.message
    assert "--fresh" not in refused.state.message
    assert read_jsonl(stack.project / "out/deployed/sample_rollouts.jsonl") == default_rows
