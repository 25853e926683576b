"""What a user sees in the Prefect UI, read back through the Prefect API: where artifacts and
logs land, run and task run names, parameter forms."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import orjson
import pytest
import yaml
from conftest import ROOT, AgentServer, write_jsonl
from pg_prefect import PgPrefectServer
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterTaskRunId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.flow_engine import run_flow
from prefect.flows import load_flow_from_entrypoint
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL, temporary_settings
from test_multi_dataset import pattern_6_4

from flows.artifacts import MIX_COLUMNS
from flows.collect import collect_rollouts
from flows.multi import collect_multi_dataset, dataset_run_name
from flows.ui import artifact_key, is_generated_run_name
from reference_agent.server import generate_tasks
from rollouts.failures import summarize_failures
from rollouts.models import MultiDatasetConfig, form_schema_of_properties

SIZES = {"high_quality": 40, "exploration": 20, "hard": 10}
RANDOM_SUFFIX = re.compile(r"-[0-9a-f]{3}$")  # Prefect's default task run name: `mix-282`


@pytest.fixture
def info_logs_to_api() -> Iterator[None]:
    """The suite runs at WARNING; the summary lines a user reads are INFO."""
    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


def data(artifact: Any) -> Any:
    return orjson.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


async def read_run(parent_id: UUID) -> dict[str, Any]:
    """The multi run, its subflow runs, and each run's task runs, artifacts and logs."""
    await APILogHandler.aflush()
    async with get_client() as client:
        parent = await client.read_flow_run(parent_id)
        subflows = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])
            )
        )
        runs: dict[UUID, dict[str, Any]] = {}
        for run in [parent, *subflows]:
            runs[run.id] = {
                "run": run,
                "task_runs": await client.read_task_runs(
                    task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run.id]))
                ),
                "artifacts": await client.read_artifacts(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
                ),
                "logs": await client.read_logs(
                    LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))
                ),
            }
        parent_task_ids = [t.id for t in runs[parent_id]["task_runs"]]
        on_parent_tasks = await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                task_run_id=ArtifactFilterTaskRunId(any_=parent_task_ids)
            )
        )
    return {"parent": runs.pop(parent_id), "subflows": runs, "on_parent_tasks": on_parent_tasks}


def test_multi_dataset_run_as_the_ui_shows_it(
    tmp_path: Path, agent: AgentServer, monkeypatch: pytest.MonkeyPatch, info_logs_to_api: None
) -> None:
    monkeypatch.setenv("ROLLOUTS_AGENTS", orjson.dumps({"sim": agent.url}).decode())
    config = MultiDatasetConfig.model_validate(pattern_6_4(tmp_path, SIZES, total=30))
    state = asyncio.run(collect_multi_dataset(config=config, return_state=True))
    assert state.is_completed(), state.message
    # Task runs reach the API through events, after the flow returns: wait for the last one
    # (the mix) as the UI would show it a moment later.
    deadline = time.monotonic() + 20
    while True:
        seen = asyncio.run(read_run(state.state_details.flow_run_id))
        if "mix" in {t.name for t in seen["parent"]["task_runs"]}:
            break
        if time.monotonic() > deadline:
            break  # the assertions below say what is missing
        time.sleep(0.5)

    # The parent run: a meaningful name, its own progress, the mix as a table, and a summary
    # of every dataset as the CLI prints it.
    parent = seen["parent"]
    assert parent["run"].name == f"{tmp_path.name}/train_mixed"
    mix_out = config.mix.output  # type: ignore[union-attr]
    artifacts = {a.key: a for a in parent["artifacts"]}
    (progress,) = [a for a in parent["artifacts"] if a.type == "progress"]
    assert float(progress.data) == 100.0
    lines = (progress.description or "").split("\n\n")
    assert lines[0] == "90/90 written, 0 failed, 3/3 datasets"
    assert lines[1:] == [
        "high_quality: 40/40 written, 0 failed (complete)",
        "exploration: 20/20 written, 0 failed (complete)",
        "hard: 30/30 written, 0 failed (complete)",
        f"mix: 30 rollouts into {mix_out}",
    ]
    mix_rows = {r["source"]: r for r in data(artifacts[artifact_key(mix_out, "mix")])}
    assert set(mix_rows) == set(SIZES)
    assert all(set(MIX_COLUMNS) <= set(r) for r in mix_rows.values())
    assert mix_rows["high_quality"]["selected"] == 18 and mix_rows["hard"]["target"] == 3
    summary = artifacts[artifact_key(mix_out, "multi-summary")].data
    assert mix_out in summary and "_manifest.json" in summary
    assert all(d.output in summary for d in config.datasets)
    result = state.result()
    for d in config.datasets:
        (agent_result,) = result.datasets[d.name].agents
        passk = ", ".join(f"@{k} {v:.3f}" for k, v in agent_result.pass_at_k.items()) or "-"
        row = (f"| {d.name} | {d.responses_create_params['temperature']:g} | {d.num_repeats} | "
               f"{SIZES[d.name] * d.num_repeats} | {SIZES[d.name] * d.num_repeats} | 0 | 0 | "
               f"{agent_result.mean_reward:.4f} | {passk} |")  # fmt: skip
        assert row in summary.splitlines(), (row, summary)
        assert d.num_repeats == 1 or f"@{d.num_repeats} " in passk

    # Nothing of the datasets' collections is attached to the parent's tasks.
    assert seen["on_parent_tasks"] == []
    assert not any("rollouts written" in log.message for log in parent["logs"])

    by_name = {s["run"].name: s for s in seen["subflows"].values()}
    assert set(by_name) == {f"{tmp_path.name}/{Path(d.output).stem} ({d.run_label()})"
                            for d in config.datasets}  # fmt: skip
    for d in config.datasets:
        sub = by_name[dataset_run_name(d)]
        run_id = sub["run"].id
        # Each subflow run holds its own progress, metrics, chunks and summary artifacts...
        kinds = {(a.type, a.key) for a in sub["artifacts"]}
        assert kinds == {
            ("progress", None),
            ("table", artifact_key(d.output, "metrics")),
            ("table", artifact_key(d.output, "chunks")),
            ("table", artifact_key(d.output, "failures")),
            ("markdown", artifact_key(d.output, "summary")),
        }, d.name
        assert all(a.flow_run_id == run_id and a.task_run_id is None for a in sub["artifacts"])
        (progress,) = [a for a in sub["artifacts"] if a.type == "progress"]
        assert float(progress.data) == 100.0
        # ...its own summary log line, on the flow run (not on a task run)...
        written = [log for log in sub["logs"] if "rollouts written" in log.message]
        assert len(written) == 1 and written[0].task_run_id is None, d.name
        # ...and each chunk's log line on that chunk's task run.
        tasks = {t.id: t.name for t in sub["task_runs"]}
        chunk_logs = [log for log in sub["logs"] if log.message.startswith("chunk ")]
        assert chunk_logs and all(
            tasks.get(log.task_run_id) == f"collect-chunk-{log.message[6:11]}" for log in chunk_logs
        ), d.name
        # Every task run has a stable, meaningful name.
        assert {"split", "merge", "metrics", "collect-chunk-00000"} <= set(tasks.values())
        assert not any(RANDOM_SUFFIX.search(n) for n in tasks.values()), tasks

    subflow_trackers = {s["run"].parent_task_run_id for s in seen["subflows"].values()}
    parent_tasks = {t.name for t in parent["task_runs"] if t.id not in subflow_trackers}
    assert parent_tasks == {"mix", *(f"collect-dataset-{d.name}" for d in config.datasets)}


def test_a_run_name_given_by_the_user_is_kept(tmp_path: Path, agent: AgentServer) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", list(generate_tasks(5)))
    params = {"input_jsonl_fpath": str(inp), "output_jsonl_fpath": str(tmp_path / "ui_form.jsonl"),
              "agent_url": agent.url}  # fmt: skip

    async def run_named(name: str | None) -> str:
        # As a deployment run is: created on the server first (named or not), then executed.
        async with get_client() as client:
            created = await client.create_flow_run(
                collect_rollouts,
                name=name,
                parameters=params,  # type: ignore[arg-type]
            )
        state = await run_flow(collect_rollouts, flow_run=created, parameters=params,
                               return_type="state")  # type: ignore[misc]  # fmt: skip
        assert state.is_completed(), state.message
        async with get_client() as client:
            return (await client.read_flow_run(created.id)).name

    label = f"{tmp_path.name}/ui_form"  # the output's folder and stem
    assert asyncio.run(run_named("ui-form-run")) == f"{label} (ui-form-run)"
    assert asyncio.run(run_named(None)) == label  # the server made one up


def test_prefect_generated_names_are_told_from_given_ones() -> None:
    from prefect.utilities.names import generate_slug

    assert all(is_generated_run_name(generate_slug(2)) for _ in range(2000))
    for given in ("ui-form-run", "nightly", "collect-ui_form", "train-hard-2024"):
        assert not is_generated_run_name(given), given


def deployed_entrypoints() -> list[str]:
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return sorted({d["entrypoint"] for d in doc["deployments"]})


@pytest.mark.parametrize("entrypoint", deployed_entrypoints())
def test_every_form_field_has_a_title_and_a_description(entrypoint: str) -> None:
    schema = load_flow_from_entrypoint(str(ROOT / entrypoint)).parameters.model_dump()
    form_schema_of_properties(schema)  # as `make deploy` reshapes the deployed form
    assert_a_form_that_reads_well(schema)


def assert_a_form_that_reads_well(schema: dict[str, Any]) -> None:
    """What the UI's form shows: a title in words and a description for every field (the form
    adds "(Optional)" itself: descriptions do not repeat it), no `null` toggle (under which
    the form prints `Property is type "None"`) but where "none" is a choice of its own, no
    null default (the form would send it), and toggles labelled in words, not class names."""
    fields = [("", name, prop) for name, prop in schema["properties"].items()]
    fields += [
        (model, name, prop)
        for model, definition in schema.get("definitions", {}).items()
        for name, prop in definition.get("properties", {}).items()
    ]
    assert len(fields) >= 12
    for model, name, prop in fields:
        where = f"{model}.{name}"
        assert prop.get("description"), f"{where} has no description"
        assert "Optional" not in prop["description"], where
        ref = prop.get("$ref", "").rsplit("/", 1)[-1]
        title = prop.get("title") or schema.get("definitions", {}).get(ref, {}).get("title")
        assert title and title != name, f"{where} has a raw title"  # a $ref's: its model's
        assert prop.get("default", "unset") is not None, f"{where}: a null default"
        options = prop.get("anyOf", [])
        titles = [o.get("title") for o in options]
        assert all(titles) and not set(titles) & {"null", "MixConfig", "integer"}, where
        if any(o.get("type") == "null" for o in options):
            assert any("$ref" in o for o in options), f"{where}: a null option"
    for model, definition in schema.get("definitions", {}).items():
        assert definition["title"] != model and not definition["title"].endswith("Config")


@pytest.mark.fast
def test_the_models_forms_read_well() -> None:
    """The multi-dataset form (nested models) as pydantic generates it, before any reshaping."""
    from pydantic import TypeAdapter

    schema = TypeAdapter(MultiDatasetConfig).json_schema(ref_template="#/definitions/{model}")
    schema["definitions"] = schema.pop("$defs")
    assert_a_form_that_reads_well(schema)
    mix = schema["properties"]["mix"]
    assert [o.get("title") for o in mix["anyOf"]] == ["Mix", "No mix"]
    limit = schema["definitions"]["DatasetConfig"]["properties"]["limit"]
    assert limit == {
        "title": "Row limit",
        "type": "integer",
        "exclusiveMinimum": 0,
        "description": "Collect only the first N input rows; empty: all rows.",
    }
    # An optional field left out of the form is None, as before.
    config = MultiDatasetConfig.model_validate(
        {"datasets": [{"name": "a", "input": "a.jsonl", "output": "o.jsonl"}]}
    )
    assert config.mix is None and config.datasets[0].limit is None


# After the run: failures, this run's figures, titles and order, run names. Against the
# PostgreSQL-backed `prefect server start` (the production setup), read through its API.


@pytest.fixture
def pg_api(pg_prefect: PgPrefectServer) -> Iterator[str]:
    with temporary_settings({PREFECT_API_URL: pg_prefect.api_url}):
        yield pg_prefect.api_url


async def artifacts_of(flow_run_id: UUID) -> list[Any]:
    """A run's artifacts in the order they were made (as the run's graph and the timeline of
    each key show them)."""
    async with get_client() as client:
        found = await client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return sorted(found, key=lambda a: a.created)


HASH = re.compile(r"\b[0-9a-f]{6}\b")


def test_a_run_with_failures_shows_them_by_class_with_the_retry_and_its_figures(
    tmp_path: Path, start_agent: Any, monkeypatch: pytest.MonkeyPatch, pg_api: str
) -> None:
    # Two tasks always answered 400 and one agent-declared failure (final), and HTTP 500s that
    # give up after the one attempt allowed (a rerun sends them again): the run ends Failed
    # with rollouts missing, and says what to do about each class.
    agent = start_agent("--latency-ms", "20", "--fail-400-tasks", "1,2",
                        "--fail-class-tasks", "3", "--p-500", "0.15", "--seed", "4")  # fmt: skip
    monkeypatch.setenv("ROLLOUTS_MAX_ATTEMPTS", "1")
    inp = write_jsonl(tmp_path / "in.jsonl", list(generate_tasks(40)))
    out = tmp_path / "triaged" / "train.jsonl"
    state = asyncio.run(collect_rollouts(
        input_jsonl_fpath=str(inp), output_jsonl_fpath=str(out), agent_url=agent.url,
        num_repeats=2, return_state=True))  # fmt: skip
    assert state.is_failed() and "neither written nor failed" in state.message  # the 500s

    artifacts = asyncio.run(artifacts_of(state.state_details.flow_run_id))
    by_key = {a.key: a for a in artifacts}
    triage = summarize_failures(out)  # what `rollouts failures` prints
    assert set(triage.classes) == {"http_400", "simulated_agent_failure", "http_500"}

    failures = by_key[artifact_key(out, "failures")]
    rows = {r["class"]: r for r in data(failures)}
    assert set(rows) == set(triage.classes)
    for name, c in triage.classes.items():
        row = rows[name]
        assert (row["rollouts"], row["final"], row["gave up"]) == (c.count, c.terminal, c.gave_up)
        assert row["example error"] == c.first_error
        assert row["retry command"] == f"rollouts retry {out} --failure-class {name}"
        assert orjson.loads(row["retry_failure_classes"]) == [name]
    assert (rows["http_400"]["rollouts"], rows["http_400"]["final"]) == (4, 4)
    assert rows["simulated_agent_failure"]["final"] == 2
    assert rows["http_500"]["gave up"] == rows["http_500"]["rollouts"] > 0
    assert rows["http_400"]["example error"].startswith("HTTP 400")
    # Its description: the triage command, and one retry for every final class, both as a
    # command and as the flow parameter a run from the UI takes.
    description = failures.description or ""
    assert description.startswith("Failures of triaged/train by class")
    assert f"`rollouts failures {out}`" in description
    final = ["http_400", "simulated_agent_failure"]
    assert ("rollouts retry " + str(out) + " --failure-class http_400 --failure-class "
            "simulated_agent_failure") in description  # fmt: skip
    assert f"`retry_failure_classes`) set to `{json.dumps(final)}`" in description
    assert "Gave up (http_500): a rerun" in description

    # The final progress and the summary keep this run's figures: duration, rate, latencies.
    (progress,) = [a for a in artifacts if a.type == "progress"]
    final_line = progress.description or ""
    expected, failed = 80, triage.total - rows["http_500"]["rollouts"]
    written = expected - triage.total
    assert final_line.startswith(f"{written}/{expected} written, {failed} failed, "
                                 f"{rows['http_500']['rollouts']} missing, in 0m")  # fmt: skip
    figures = re.search(r"This run: in 0m\d\ds, ([\d.]+) rollouts/s, p50 (\d+) ms, "
                        r"p95 (\d+) ms, p99 (\d+) ms", final_line)  # fmt: skip
    assert figures, final_line
    rate, p50, p95, p99 = (float(g) for g in figures.groups())
    assert rate > 0 and 15 <= p50 <= p95 <= p99 < 1000  # the agent answers in 20 ms
    summary = by_key[artifact_key(out, "summary")].data
    assert "## This run" in summary and "| rollouts/s | " in summary
    assert f"p50 {int(p50)} ms, p95 {int(p95)} ms, p99 {int(p99)} ms (" in summary
    assert "| duration | 0m" in summary
    assert f"`rollouts failures {out}`" in summary and f"- rollouts: `{out}`" in summary


def test_artifacts_have_titles_in_words_and_the_same_order_every_run(
    tmp_path: Path, agent: AgentServer, pg_api: str
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", list(generate_tasks(12)))

    def run(folder: str) -> list[Any]:
        out = tmp_path / folder / "collect2.jsonl"
        state = asyncio.run(collect_rollouts(input_jsonl_fpath=str(inp), output_jsonl_fpath=str(
            out), agent_url=agent.url, chunk_size=5, return_state=True))  # fmt: skip
        assert state.is_completed(), state.message
        return asyncio.run(artifacts_of(state.state_details.flow_run_id))

    first, second = run("a"), run("b")
    # A card's title is the artifact's key: words first, the path's hash last; the first
    # line of its description (shown under it) reads as words with no hash.
    shown = [(a.type, a.key, (a.description or "").splitlines()[0]) for a in first]
    assert [(t, k and k.rsplit("-", 1)[0], line) for t, k, line in shown] == [
        ("progress", None, shown[0][2]),  # its figures vary: checked below
        ("markdown", "collect2-summary", "Summary of a/collect2: counts, rewards, this run's "
         "rate and latency, what failed and how to send it again"),
        ("table", "collect2-failures", "Failures of a/collect2 by class"),
        ("table", "collect2-metrics", "Rewards of a/collect2 per agent"),
        ("table", "collect2-chunks", "Chunks of a/collect2 and the worker (host:pid) that "
         "collected each"),
    ]  # fmt: skip
    assert shown[0][2].startswith("12/12 written, 0 failed, in 0m")
    for _, key, line in shown:
        assert not HASH.search(line) and (key is None or HASH.fullmatch(key.rsplit("-", 1)[1]))
    # Another output: the same artifacts in the same order, under its own keys.
    assert [(a.type, a.key and a.key.rsplit("-", 1)[0]) for a in second] == [
        (t, k and k.rsplit("-", 1)[0]) for t, k, _ in shown
    ]
    assert {a.key for a in first}.isdisjoint({a.key for a in second} - {None})
    assert (second[1].description or "").startswith("Summary of b/collect2:")


def test_runs_of_other_outputs_retries_and_form_started_runs_are_told_apart(
    tmp_path: Path, start_agent: Any, pg_api: str
) -> None:
    agent = start_agent("--fail-400-tasks", "0")
    inp = write_jsonl(tmp_path / "in.jsonl", list(generate_tasks(6)))

    async def run(output: Path, name: str | None = None, **params: Any) -> str:
        # As a deployment run is, from the UI's form or `prefect deployment run`: created on
        # the server (with the form's made-up name, or none), then executed.
        params = {"input_jsonl_fpath": str(inp), "output_jsonl_fpath": str(output),
                  "agent_url": agent.url, **params}  # fmt: skip
        async with get_client() as client:
            created = await client.create_flow_run(collect_rollouts, name=name,
                                                   parameters=params)  # type: ignore[arg-type]  # fmt: skip
        state = await run_flow(collect_rollouts, flow_run=created, parameters=params,
                               return_type="state")  # type: ignore[misc]  # fmt: skip
        assert state.is_completed(), state.message
        async with get_client() as client:
            return (await client.read_flow_run(created.id)).name

    a, b = tmp_path / "a" / "train.jsonl", tmp_path / "b" / "train.jsonl"
    names = [
        asyncio.run(run(a)),  # no name given: the server made one up
        asyncio.run(run(b)),
        asyncio.run(run(a, retry_failure_classes=["http_400"])),
        asyncio.run(run(a, name="mu5-asano-n")),  # the UI form's name, left as it was
        asyncio.run(run(a, name="nightly-eval")),  # a name typed into the form
    ]
    assert names == ["a/train", "b/train", "a/train: retry http_400", "a/train (mu5-asano-n)",
                     "a/train (nightly-eval)"]  # fmt: skip
    # In-process (the CLI's way): named at creation, the same way.
    state = asyncio.run(collect_rollouts(input_jsonl_fpath=str(inp), output_jsonl_fpath=str(a),
                                         agent_url=agent.url, return_state=True))  # fmt: skip

    async def name_of(flow_run_id: UUID) -> str:
        async with get_client() as client:
            return (await client.read_flow_run(flow_run_id)).name

    assert asyncio.run(name_of(state.state_details.flow_run_id)) == "a/train"
