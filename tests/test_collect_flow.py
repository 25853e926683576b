"""The collect-rollouts flow end to end: real agent process, real Prefect, real files."""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import AgentServer, read_jsonl, write_jsonl
from prefect.states import State
from prefect.utilities.callables import parameter_schema

from flows.collect import CollectSummary, collect_rollouts
from reference_agent.server import generate_tasks, write_tasks
from rollouts.errors import AgentUnreachable, InputError, RunConflict, RunLocked
from rollouts.models import CollectConfig
from rollouts.run_state import StartedFrom, prepare_run_dir, run_dir_for, run_lock, started_from
from rollouts.split import split_input
from rollouts_cli.main import main as cli_main


def run_collect(**params: Any) -> State:
    return asyncio.run(collect_rollouts(**params, return_state=True))


def collect_ok(**params: Any) -> CollectSummary:
    state = run_collect(**params)
    assert state.is_completed(), state.message
    summary = state.result()
    assert isinstance(summary, CollectSummary)
    return summary


def keys(rows: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in rows]


def test_3000_tasks_x2_sorted_unique_with_rewards_and_matching_metrics(
    tmp_path: Path, agent: AgentServer
) -> None:
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 3000, seed=1)
    out = tmp_path / "out.jsonl"

    summary = collect_ok(
        agent_url=agent.url, input_jsonl_fpath=str(inp), output_jsonl_fpath=str(out),
        num_repeats=2, responses_create_params={"temperature": 0.2}, chunk_size=700,
        num_samples_in_parallel=32,
    )  # fmt: skip

    rows = read_jsonl(out)
    assert keys(rows) == [(t, r) for t in range(3000) for r in range(2)]  # sorted, unique, all
    assert all(isinstance(r["reward"], float) for r in rows)
    assert all(r["responses_create_params"]["temperature"] == 0.2 for r in rows)
    assert all(r["agent_ref"] == {"name": agent.url} for r in rows)
    # the override reached every request the agent received
    reqs = agent.requests()
    assert len(reqs) == 6000
    assert {q["temperature"] for q in reqs} == {0.2}
    assert summary.expected == summary.succeeded == 6000
    assert summary.failed == summary.missing == 0
    assert summary.chunks == 5
    assert (tmp_path / "out_failures.jsonl").read_bytes() == b""

    metrics = orjson.loads((tmp_path / "out_aggregate_metrics.json").read_bytes())
    (entry,) = metrics
    rewards = [r["reward"] for r in rows]
    assert entry["agent_metrics"]["mean/reward"] == pytest.approx(sum(rewards) / len(rewards))
    assert entry["key_metrics"]["mean/reward"] == entry["agent_metrics"]["mean/reward"]
    assert entry["agent_metrics"]["num_succeeded_rollouts"] == 6000
    assert len(entry["group_level_metrics"]) == 3000
    by_task: dict[int, list[float]] = {}
    for r in rows:
        by_task.setdefault(r["_ng_task_index"], []).append(r["reward"])
    pass2 = sum(1.0 if max(v) == 1.0 else 0.0 for v in by_task.values()) / 3000
    assert entry["agent_metrics"]["pass@2"] == pytest.approx(pass2)


def test_rerun_is_all_cache_hits_and_sends_nothing(tmp_path: Path, agent: AgentServer) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", list(generate_tasks(120)))
    out = tmp_path / "out.jsonl"
    params = {"agent_url": agent.url, "input_jsonl_fpath": str(inp), "output_jsonl_fpath": str(out),
                  "chunk_size": 50}  # fmt: skip
    collect_ok(**params)
    first = out.read_bytes()
    sent = len(agent.requests())

    again = collect_ok(**params)

    assert again.chunks_from_cache == again.chunks == 3
    assert len(agent.requests()) == sent
    assert out.read_bytes() == first


def test_appended_rows_are_collected_and_nothing_is_redone(
    tmp_path: Path, agent: AgentServer
) -> None:
    tasks = list(generate_tasks(130))
    inp = write_jsonl(tmp_path / "in.jsonl", tasks[:100])
    out = tmp_path / "out.jsonl"
    params = {"agent_url": agent.url, "input_jsonl_fpath": str(inp), "output_jsonl_fpath": str(out),
                  "chunk_size": 40, "num_repeats": 2}  # fmt: skip
    collect_ok(**params)
    write_jsonl(inp, tasks)  # 30 more rows: the last chunk grows and a new one appears

    summary = collect_ok(**params)

    assert keys(read_jsonl(out)) == [(t, r) for t in range(130) for r in range(2)]
    per_key = Counter((q["_ng_task_index"], q["_ng_rollout_index"]) for q in agent.requests())
    assert len(per_key) == 260 and set(per_key.values()) == {1}
    assert summary.chunks_from_cache == 2  # chunks 0 and 1 untouched


def test_seed_style_manual_resume_is_refused_with_the_way_out(
    tmp_path: Path, agent: AgentServer
) -> None:
    tasks = list(generate_tasks(60))
    full = write_jsonl(tmp_path / "large_dataset.jsonl", tasks)
    out = tmp_path / "rollouts.jsonl"
    collect_ok(agent_url=agent.url, input_jsonl_fpath=str(full), output_jsonl_fpath=str(out),
               limit=30)  # fmt: skip
    before = out.read_bytes()
    sent = len(agent.requests())
    remaining = write_jsonl(tmp_path / "remaining.jsonl", tasks[30:])  # tail -n +31

    state = run_collect(agent_url=agent.url, input_jsonl_fpath=str(remaining),
                        output_jsonl_fpath=str(out), limit=30)  # fmt: skip

    assert state.is_failed()
    assert isinstance(state.result(raise_on_failure=False), RunConflict)
    assert "remaining.jsonl:1" in state.message
    assert "rerun the original command" in state.message
    assert len(agent.requests()) == sent and out.read_bytes() == before


def test_changed_row_is_refused(tmp_path: Path, agent: AgentServer) -> None:
    tasks = list(generate_tasks(20))
    inp = write_jsonl(tmp_path / "in.jsonl", tasks)
    out = tmp_path / "out.jsonl"
    collect_ok(agent_url=agent.url, input_jsonl_fpath=str(inp), output_jsonl_fpath=str(out))
    tasks[7]["expected_answer"] = "-1"
    write_jsonl(inp, tasks)

    state = run_collect(agent_url=agent.url, input_jsonl_fpath=str(inp),
                        output_jsonl_fpath=str(out))  # fmt: skip

    assert state.is_failed() and "in.jsonl:8" in state.message


def test_other_result_changing_parameters_are_refused_and_fresh_starts_over(
    tmp_path: Path, agent: AgentServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flow run is told of the `fresh` parameter as its form titles it; the command line of
    --fresh. Each way out works where it is named."""
    inp = write_jsonl(tmp_path / "in.jsonl", list(generate_tasks(10)))
    out = tmp_path / "out.jsonl"
    base = {"agent_url": agent.url, "input_jsonl_fpath": str(inp), "output_jsonl_fpath": str(out)}
    collect_ok(**base, responses_create_params={"temperature": 0.2})

    state = run_collect(**base, responses_create_params={"temperature": 0.9})
    form_title = parameter_schema(collect_rollouts).properties["fresh"]["title"]
    assert form_title == "Start fresh"
    assert state.is_failed()
    collected, asked = state.message.split("; this run asks for ")
    assert collected.startswith(f"{out} was collected with ") and '"temperature":0.2' in collected
    assert '"temperature":0.9' in asked and asked.endswith(
        ". Mixing them would corrupt the dataset: write to another output, or set the `fresh` "
        f'parameter ("{form_title}" in the UI form) to discard it and start over.'
    )
    collect_ok(**base, responses_create_params={"temperature": 0.9}, fresh=True)
    assert {r["responses_create_params"]["temperature"] for r in read_jsonl(out)} == {0.9}

    cli = ["collect", f"--agent-url={agent.url}", f"--input={inp}", f"--output={out}"]
    capsys.readouterr()
    assert cli_main([*cli, "--temperature", "0.5"]) == 2
    assert capsys.readouterr().err.endswith(
        "Mixing them would corrupt the dataset: write to another output, or add --fresh to "
        "discard it and start over.\n"
    )
    assert cli_main([*cli, "--temperature", "0.5", "--fresh"]) == 0
    assert {r["responses_create_params"]["temperature"] for r in read_jsonl(out)} == {0.5}


@pytest.mark.fast
@pytest.mark.parametrize(
    ("origin", "way_out"),
    [
        ("command line", "add --fresh"),
        ("flow run", 'set the `fresh` parameter ("Start fresh" in the UI form)'),
        ("multi-dataset run", "delete the output's files and its run state {run_dir}"),
    ],
)  # fmt: skip
def test_every_conflict_names_the_way_to_start_over_where_the_run_was_started(
    tmp_path: Path, origin: StartedFrom, way_out: str
) -> None:
    """Other parameters, another chunk size, a changed row, an output without its run state:
    each refusal names the one way to start over that exists where the run was started (a
    multi-dataset run has neither --fresh nor the `fresh` parameter)."""
    inp = write_jsonl(tmp_path / "in.jsonl", list(generate_tasks(6)))
    out = tmp_path / "out.jsonl"
    run_dir = run_dir_for(out, None)
    way_out = way_out.format(run_dir=run_dir)
    config = CollectConfig(agent_url="http://127.0.0.1:9", input_jsonl_fpath=str(inp),
                           output_jsonl_fpath=str(out), chunk_size=4)  # fmt: skip
    run_id = prepare_run_dir(config, run_dir)
    split_input(inp, run_dir, run_id=run_id, chunk_size=4)
    out.write_bytes(b'{"a": 1}\n')
    tasks = list(generate_tasks(6))
    tasks[1]["expected_answer"] = "changed"

    def output_without_its_run_state() -> None:
        shutil.rmtree(run_dir)
        prepare_run_dir(config, run_dir)

    messages = []
    with started_from(origin):
        for refused in (
            lambda: prepare_run_dir(config.model_copy(update={"num_repeats": 2}), run_dir),
            lambda: prepare_run_dir(config.model_copy(update={"chunk_size": 5}), run_dir),
            lambda: split_input(write_jsonl(inp, tasks), run_dir, run_id=run_id, chunk_size=4),
            output_without_its_run_state,
        ):
            with pytest.raises(RunConflict) as e:
                refused()
            messages.append(str(e.value))

    assert [m.count(way_out) for m in messages] == [1, 1, 1, 1], messages
    if origin != "command line":
        assert not [m for m in messages if "--fresh" in m], messages


def test_fresh_with_bad_input_keeps_what_was_collected(tmp_path: Path, agent: AgentServer) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", list(generate_tasks(10)))
    out = tmp_path / "out.jsonl"
    base = {"agent_url": agent.url, "input_jsonl_fpath": str(inp), "output_jsonl_fpath": str(out)}
    collect_ok(**base)
    before = out.read_bytes()
    inp.write_bytes(inp.read_bytes() + b"not json\n")

    state = run_collect(**base, fresh=True)

    assert isinstance(state.result(raise_on_failure=False), InputError)
    assert "in.jsonl:11" in state.message
    assert out.read_bytes() == before  # --fresh discards nothing until the input is valid


def test_a_second_run_on_the_same_output_is_refused(tmp_path: Path, agent: AgentServer) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", list(generate_tasks(5)))
    out = tmp_path / "out.jsonl"
    with run_lock(run_dir_for(out, None), out):
        state = run_collect(agent_url=agent.url, input_jsonl_fpath=str(inp),
                            output_jsonl_fpath=str(out))  # fmt: skip
    assert isinstance(state.result(raise_on_failure=False), RunLocked)
    assert "being collected by" in state.message
    assert agent.requests() == [] and not out.exists()


BAD_INPUTS = {
    "malformed_json": (b'{"responses_create_params": {"input": "a"}}\n{"oops": \n', 2, "JSON"),
    "non_object": (b'{"responses_create_params": {"input": "a"}}\n[1, 2]\n', 2, "object"),
    "missing_rcp": (b'{"responses_create_params": {"input": "a"}}\n{"q": 1}\n', 2,
                    "responses_create_params"),
    "rcp_not_object": (b'{"responses_create_params": "hi"}\n', 1, "responses_create_params"),
    "not_utf8": (b'{"responses_create_params": {"input": "\xff\xfe"}}\n', 1, "UTF-8"),
    "duplicate_index": (b'{"responses_create_params": {}, "_ng_task_index": 3}\n'
                        b'{"responses_create_params": {}, "_ng_task_index": 3}\n', 2, "duplicate"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_the_line_and_sends_nothing(
    case: str, tmp_path: Path, agent: AgentServer
) -> None:
    content, line, words = BAD_INPUTS[case]
    inp = tmp_path / "bad.jsonl"
    inp.write_bytes(b'{"responses_create_params": {"input": "ok"}}\n' * 0 + content)
    out = tmp_path / "out.jsonl"

    state = run_collect(agent_url=agent.url, input_jsonl_fpath=str(inp),
                        output_jsonl_fpath=str(out))  # fmt: skip

    assert state.is_failed()
    assert isinstance(state.result(raise_on_failure=False), InputError)
    assert f"bad.jsonl:{line}:" in state.message and words in state.message
    assert agent.requests() == [] and not out.exists()


@pytest.mark.parametrize("case", ["empty", "missing"])
def test_empty_or_missing_file_is_refused(case: str, tmp_path: Path, agent: AgentServer) -> None:
    inp = tmp_path / "in.jsonl"
    if case == "empty":
        inp.write_bytes(b"\n")
    state = run_collect(agent_url=agent.url, input_jsonl_fpath=str(inp),
                        output_jsonl_fpath=str(tmp_path / "out.jsonl"))  # fmt: skip
    assert state.is_failed() and str(inp) in state.message
    assert ("empty" if case == "empty" else "not found") in state.message
    assert agent.requests() == []


def test_unreachable_agent_is_refused_before_dispatch_then_the_run_resumes(
    tmp_path: Path, start_agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", list(generate_tasks(10)))
    out = tmp_path / "out.jsonl"
    dead = start_agent()
    dead.stop()
    params = {"input_jsonl_fpath": str(inp), "output_jsonl_fpath": str(out)}

    monkeypatch.setenv("ROLLOUTS_AGENTS", orjson.dumps({"sim": dead.url}).decode())
    state = run_collect(agent_name="sim", **params)
    assert isinstance(state.result(raise_on_failure=False), AgentUnreachable)
    assert f"agent 'sim' at {dead.url}: connection refused" in state.message
    assert not out.exists() and not (tmp_path / "out_failures.jsonl").exists()

    live = start_agent()  # the agent came back elsewhere: same name, new address
    monkeypatch.setenv("ROLLOUTS_AGENTS", orjson.dumps({"sim": live.url}).decode())
    summary = collect_ok(agent_name="sim", **params)
    assert summary.succeeded == 10
    assert read_jsonl(tmp_path / "out_failures.jsonl") == []


def test_agent_name_resolves_through_a_nemo_gym_head_server(
    tmp_path: Path, agent: AgentServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import yaml
    from aiohttp import web

    host, port = agent.url.removeprefix("http://").split(":")
    config = {
        "my_agent": {"responses_api_agents": {"simple_agent": {"host": host, "port": int(port)}}}
    }
    app = web.Application()

    async def global_config(_: web.Request) -> web.Response:
        # NeMo Gym answers with a JSON string holding the YAML config
        return web.json_response(yaml.safe_dump(config))

    app.router.add_get("/global_config_dict_yaml", global_config)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    head_port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("ROLLOUTS_HEAD_SERVER_URL", f"http://127.0.0.1:{head_port}")
        inp = write_jsonl(tmp_path / "in.jsonl", list(generate_tasks(6)))
        out = tmp_path / "out.jsonl"
        collect_ok(agent_name="my_agent", input_jsonl_fpath=str(inp), output_jsonl_fpath=str(out))
        assert {r["agent_ref"]["name"] for r in read_jsonl(out)} == {"my_agent"}
        assert len(agent.requests()) == 6

        state = run_collect(agent_name="nope", input_jsonl_fpath=str(inp),
                            output_jsonl_fpath=str(tmp_path / "o2.jsonl"))  # fmt: skip
        assert state.is_failed() and "my_agent" in state.message and "'nope'" in state.message
    finally:
        loop.call_soon_threadsafe(loop.stop)
