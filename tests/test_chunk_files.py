"""After split, merge and status need no chunk tasks file: split recorded what they need."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from conftest import AgentServer, read_jsonl, write_jsonl

from flows.collect import CollectSummary, collect_rollouts
from reference_agent.server import generate_tasks
from rollouts.chunks import ChunkFiles
from rollouts.merge import merge_chunks
from rollouts.run_state import OutputPaths, read_run_state, recorded_chunks, run_dir_for
from rollouts.split import split_input
from rollouts.status import read_status
from rollouts_cli.main import main as cli_main


@pytest.mark.parametrize("spread", [1, 3], ids=["contiguous", "gaps"])
def test_merge_and_status_work_with_every_tasks_file_removed(
    tmp_path: Path, start_agent: object, capsys: pytest.CaptureFixture[str], spread: int
) -> None:
    agent: AgentServer = start_agent("--fail-400-tasks", f"{4 * spread}")  # type: ignore[operator]
    rows = [{**t, "_ng_task_index": i * spread} for i, t in enumerate(generate_tasks(40))]
    inp = write_jsonl(tmp_path / "in.jsonl", rows[::-1])  # chunks' task ranges out of order
    out = tmp_path / "out.jsonl"
    state = asyncio.run(collect_rollouts(
        agent_url=agent.url, input_jsonl_fpath=str(inp), output_jsonl_fpath=str(out),
        num_repeats=2, chunk_size=15, return_state=True,
    ))  # fmt: skip
    assert state.is_completed(), state.message
    summary = state.result()
    assert isinstance(summary, CollectSummary)
    assert (summary.expected, summary.succeeded, summary.failed) == (80, 78, 2)
    status_before = read_status(out, sample_s=0)
    assert status_before.phase == "complete"

    run_dir = run_dir_for(out, None)
    tasks_files = sorted((run_dir / "chunks").glob("*.tasks.jsonl"))
    assert len(tasks_files) == 3
    for p in tasks_files:
        p.unlink()

    state = read_run_state(run_dir)
    assert state is not None
    specs = recorded_chunks(run_dir, state)
    assert specs is not None and [s.index for s in specs] == [0, 1, 2]
    assert all(s.contiguous == (spread == 1) for s in specs)
    assert all(ChunkFiles.of(s).task_indices.exists() == (spread != 1) for s in specs)
    paths = OutputPaths.for_output(out)
    report = merge_chunks(
        specs, num_repeats=2, agent_of=lambda _: agent.url,
        output_path=tmp_path / "again.jsonl", failures_path=tmp_path / "again_failures.jsonl",
    )  # fmt: skip
    assert (tmp_path / "again.jsonl").read_bytes() == paths.rollouts.read_bytes()
    assert (tmp_path / "again_failures.jsonl").read_bytes() == paths.failures.read_bytes()
    assert (report.expected, report.succeeded, report.failed, report.missing) == (80, 78, 2, 0)
    assert report.expected_by_agent == {agent.url: 80}
    assert [r["_ng_task_index"] for r in read_jsonl(tmp_path / "again_failures.jsonl")] == [
        4 * spread, 4 * spread
    ]

    status = read_status(out, sample_s=0)
    assert status == status_before
    assert (status.expected, status.done, status.failed) == (80, 78, 2)
    assert cli_main(["status", str(out), "--json"]) == 0
    shown = orjson.loads(capsys.readouterr().out)
    assert (shown["expected"], shown["done"], shown["failed"]) == (80, 78, 2)
    assert shown["state"] == "complete"
    assert [c["expected"] for c in shown["chunks"]] == [30, 30, 20]


def test_status_of_a_run_dir_split_before_chunks_were_recorded(tmp_path: Path) -> None:
    """Old run dirs (no chunk list in run.json) still work: status counts the tasks files."""
    inp = write_jsonl(tmp_path / "in.jsonl", list(generate_tasks(25)))
    out = tmp_path / "out.jsonl"
    run_dir = run_dir_for(out, None)
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_bytes(orjson.dumps(
        {"run_id": "r", "result_params": {"num_repeats": 3}, "chunk_size": 10}
    ))  # fmt: skip
    split_input(inp, run_dir, run_id="r", chunk_size=10)
    recorded = read_run_state(run_dir)
    assert recorded is not None and len(recorded.chunks or []) == 3
    recorded.chunks = None  # as an older version left it
    recorded.write(run_dir)
    status = read_status(out, sample_s=0)
    assert [c.expected for c in status.chunks] == [30, 30, 15]
    assert status.expected == 75 and status.done == 0
