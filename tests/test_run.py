"""A run's sequence and decisions (rollouts/run.py, rollouts/request.py) with plain fake stages:
no Prefect, no agent, no process. Which stop ends a run how, when the agents are checked, when
a cached step runs again, what the summary counts, how a run's request is checked once."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rollouts.collect import DispatchPlan
from rollouts.errors import (
    STOP_EXIT_CODES,
    AgentUnreachable,
    ConfigError,
    ExitCode,
    IncompleteRun,
    RunStopped,
    combined_exit_code,
)
from rollouts.fileio import UnwritablePathError
from rollouts.merge import MergeReport
from rollouts.models import SplitResult
from rollouts.request import (
    RunRequest,
    check_agent_first,
    check_request,
    checked_before_the_flow,
    checked_request,
)
from rollouts.run import (
    ChunkOutcome,
    RunStages,
    check_resume_budget,
    collect_run,
    deadline_outcome,
    must_refresh,
)
from rollouts.settings import RolloutsSettings
from rollouts.status import RunPhase, RunStatus
from rollouts.stopping import STOP_RECORD

pytestmark = pytest.mark.fast

AGENT = "http://127.0.0.1:9"


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, msg: str, /, *args: object) -> None:
        self.lines.append(("info", msg % args))

    def warning(self, msg: str, /, *args: object) -> None:
        self.lines.append(("warning", msg % args))

    def warnings(self) -> list[str]:
        return [line for level, line in self.lines if level == "warning"]


class Reader:
    def __init__(self, run_dir: Path, status: RunStatus) -> None:
        self.run_dir, self.status = run_dir, status

    def read(self) -> RunStatus:
        return self.status


class Progress:
    def figures(self, summary: Any, started_at: float, latency: Any) -> Any:
        return SimpleNamespace(line=lambda: "in 0m00s")

    async def show_final(self, summary: Any, replicas: Any) -> None:
        pass


class Stages(RunStages):
    """Records what the run called; collecting returns ``chunks`` (after asking ``stop_with``
    of the run's stopper), merging ``missing`` rollouts missing of 10."""

    def __init__(
        self, *, state: RunPhase = "running", done: int = 4, chunks: list[ChunkOutcome] | None = None,
        stop_with: str | None = None, missing: int = 0, down: list[str] | None = None,
    ) -> None:  # fmt: skip
        self.state, self.done, self.stop_with, self.missing = state, done, stop_with, missing
        self.chunks = chunks if chunks is not None else [ChunkOutcome(completed=True)]
        self.down = down or []
        self.calls: list[Any] = []
        self.logged = Log()

    @property
    def log(self) -> Log:
        return self.logged

    def status_reader(self, output: str, work_dir: Path | None) -> Reader:
        status = RunStatus(output, "", 10, self.done, 0, phase=self.state, holder="h:1")
        return Reader(Path(output).parent, status)

    async def probe_agents(
        self, agents: Mapping[str, Sequence[str]], timeout_s: float
    ) -> list[str]:
        self.calls.append(("probe", dict(agents)))
        return self.down

    def freeze_heap(self) -> None:
        self.calls.append("freeze")

    async def split(self, config: Any, run_dir: Path, run_id: str) -> SplitResult:
        self.calls.append("split")
        return SplitResult(run_dir=str(run_dir), run_id=run_id, n_tasks=10, chunks=[],
                           agent_names=[])  # fmt: skip

    @contextlib.asynccontextmanager
    async def progress(self, reader: Any, output: Path) -> AsyncIterator[Progress]:
        yield Progress()

    async def collect(self, split: Any, plan: Any, run_dir: Path, stop: Any) -> list[ChunkOutcome]:
        self.calls.append("collect")
        if self.stop_with is not None:
            stop.request(self.stop_with)
        return self.chunks

    async def merge(self, split: Any, plan: Any, paths: Any, refresh: bool) -> MergeReport:
        self.calls.append(("merge", refresh))
        paths.rollouts.write_text("")
        paths.failures.write_text("")
        return MergeReport(expected=10, succeeded=10 - self.missing, failed=0,
                           retryable_failed=0, missing=self.missing)  # fmt: skip

    async def metrics(self, paths: Any, num_repeats: int, expected_by_agent: Any,
                      refresh: bool) -> Any:  # fmt: skip
        self.calls.append(("metrics", refresh))
        paths.metrics.write_text("{}")
        return SimpleNamespace(agents=[])

    async def publish(self, summary: Any, status: Any, failures: Any) -> None:
        self.calls.append("publish")


def request(tmp_path: Path, **params: Any) -> RunRequest:
    params = {"input_jsonl_fpath": str(tmp_path / "in.jsonl"),
              "output_jsonl_fpath": str(tmp_path / "out.jsonl"), "agent_url": AGENT, **params}  # fmt: skip
    return check_request(params)


def run(stages: Stages, req: RunRequest) -> Any:
    return asyncio.run(collect_run(req, RolloutsSettings(), stages))


def test_a_complete_run_collects_merges_measures_and_publishes_in_that_order(
    tmp_path: Path,
) -> None:
    stages = Stages(chunks=[ChunkOutcome(completed=True, cached=True),
                            ChunkOutcome(completed=True)])  # fmt: skip
    summary = run(stages, request(tmp_path))
    assert stages.calls == ["split", ("probe", {AGENT: [AGENT]}), "freeze", "collect",
                            ("merge", True), ("metrics", True), "publish"]  # fmt: skip
    assert (summary.expected, summary.missing, summary.stopped) == (10, 0, None)
    assert (summary.chunks_from_cache, summary.output) == (1, str(tmp_path / "out.jsonl"))
    assert deadline_outcome(summary) is None


def test_cached_steps_run_again_only_when_their_output_files_are_gone(tmp_path: Path) -> None:
    run(Stages(), request(tmp_path))
    again = Stages()
    run(again, request(tmp_path))
    assert ("merge", False) in again.calls and ("metrics", False) in again.calls
    (tmp_path / "out_failures.jsonl").unlink()
    third = Stages()
    run(third, request(tmp_path))
    assert ("merge", True) in third.calls and ("metrics", False) in third.calls
    assert must_refresh(tmp_path / "out.jsonl", tmp_path / "nothing-here")
    assert not must_refresh(tmp_path / "out.jsonl")


def test_a_complete_output_needs_no_agent(tmp_path: Path) -> None:
    stages = Stages(state="complete", done=10)
    run(stages, request(tmp_path))
    assert not [c for c in stages.calls if c[0] == "probe"]


def test_replicas_down_are_warned_of_and_the_run_goes_on(tmp_path: Path) -> None:
    stages = Stages(down=["replica http://b of agent 'x': connection refused"])
    run(stages, request(tmp_path))
    assert stages.logged.warnings() == [
        "replica http://b of agent 'x': connection refused; collecting from the other replicas"
    ]


def test_agents_checked_before_the_flow_run_are_not_probed_again(tmp_path: Path) -> None:
    req = request(tmp_path)
    plan = DispatchPlan.for_run(req.config, [], RolloutsSettings())
    checked = replace(req, plan=plan, agents_down=("replica r: refused",))
    stages = Stages()
    run(stages, checked)
    assert "collect" in stages.calls and not [c for c in stages.calls if c[0] == "probe"]
    assert stages.logged.warnings() == ["replica r: refused; collecting from the other replicas"]
    # A complete output logs nothing of them, as when nobody checked before.
    quiet = Stages(state="complete", done=10)
    run(quiet, checked)
    assert quiet.logged.warnings() == []


def test_a_deadline_stop_merges_what_finished_and_ends_stopped_not_failed(
    tmp_path: Path,
) -> None:
    stages = Stages(stop_with="deadline", missing=6,
                    chunks=[ChunkOutcome(completed=False, error=RunStopped("x", "deadline"))])  # fmt: skip
    summary = run(stages, request(tmp_path))
    assert ("merge", True) in stages.calls and "publish" in stages.calls
    assert summary.stopped == "deadline" and summary.missing == 6
    assert "stopped at deadline, 6 missing, resumable" in (deadline_outcome(summary) or "")
    assert list((tmp_path / ".rollouts").glob(f"*/{STOP_RECORD}"))


@pytest.mark.parametrize("reason", ["SIGINT", "SIGTERM", "cancelled"])
def test_a_signal_or_a_cancellation_ends_the_run_unmerged(tmp_path: Path, reason: str) -> None:
    stages = Stages(stop_with=reason)
    with pytest.raises(RunStopped) as stopped:
        run(stages, request(tmp_path))
    assert stopped.value.exit_code == STOP_EXIT_CODES[reason]
    assert "4 of 10 rollouts written, 0 failed, 6 missing" in str(stopped.value)
    assert stages.calls[-1] == "collect"  # neither merged nor published
    assert list((tmp_path / ".rollouts").glob(f"*/{STOP_RECORD}"))


def test_a_stop_that_left_nothing_missing_changes_nothing(tmp_path: Path) -> None:
    stages = Stages(stop_with="SIGINT", done=10)
    summary = run(stages, request(tmp_path))
    assert summary.stopped is None and "publish" in stages.calls


def test_missing_rollouts_end_the_run_incomplete_naming_the_first_foreign_chunk_error(
    tmp_path: Path,
) -> None:
    stages = Stages(missing=2, chunks=[
        ChunkOutcome(completed=True), ChunkOutcome(completed=False, error=IncompleteRun("x")),
        ChunkOutcome(completed=False, error=ValueError("boom at http://u:secret@h:1")),
        ChunkOutcome(completed=False),  # a stop kept it from starting
    ])  # fmt: skip
    with pytest.raises(IncompleteRun) as incomplete:
        run(stages, request(tmp_path))
    message = str(incomplete.value)
    assert "2 of 10 rollouts are neither written nor failed for good" in message
    assert "3 chunk(s) did not finish (the first ended with ValueError: boom at" in message
    assert "secret" not in message
    assert "publish" in stages.calls  # reported before it ends


def test_a_chunk_error_a_rerun_will_not_fix_ends_the_run_with_its_own_message(
    tmp_path: Path,
) -> None:
    full = UnwritablePathError("cannot write the run state: No space left on device")
    stages = Stages(missing=5, chunks=[ChunkOutcome(completed=False, error=IncompleteRun("x")),
                                       ChunkOutcome(completed=False, error=full)])  # fmt: skip
    with pytest.raises(UnwritablePathError) as raised:
        run(stages, request(tmp_path))
    assert raised.value is full and stages.calls[-1] == "collect"


def test_bad_parameters_and_contradicting_placement_are_refused_with_their_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match=r"num_repeats: .*got 0"):
        request(tmp_path, num_repeats=0)
    monkeypatch.setenv("ROLLOUTS_DASK_ADDRESS", "tcp://h:8786")
    with pytest.raises(ConfigError, match="processes=2 starts a local cluster"):
        request(tmp_path, processes=2)


def test_a_flow_run_takes_the_request_checked_before_it_for_the_same_parameters_only(
    tmp_path: Path,
) -> None:
    req = request(tmp_path)
    assert checked_request(req.params) is not req  # nobody handed it over: checked again
    with checked_before_the_flow(req):
        assert checked_request(dict(req.params)) is req
        # The flow run's parameters: the same, and every other at its default.
        assert checked_request({**req.params, "num_repeats": 1, "chunk_size": 10_000}) is req
        other = checked_request({**req.params, "num_repeats": 2})
        assert other is not req and other.config.num_repeats == 2
        assert checked_request({**req.params, "agent_url": None}) is not req
    assert checked_request(req.params) is not req


def test_the_run_level_agent_is_resolved_and_probed_first_and_rows_agents_later(
    tmp_path: Path,
) -> None:
    settings = RolloutsSettings()
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        url = f"http://127.0.0.1:{listening.getsockname()[1]}"
        checked = asyncio.run(check_agent_first(request(tmp_path, agent_url=url), settings))
    assert checked.plan is not None and checked.plan.agent_url == url
    assert checked.agents_down == ()
    rows = request(tmp_path, agent_url=None)
    assert asyncio.run(check_agent_first(rows, settings)) is rows
    with pytest.raises(AgentUnreachable, match="nothing was sent"):
        asyncio.run(check_agent_first(request(tmp_path, agent_url=url), settings))


def test_exit_codes_are_one_table_and_a_multi_run_combines_them_by_precedence() -> None:
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 130, 143]
    assert {k: int(v) for k, v in STOP_EXIT_CODES.items()} == {
        "deadline": 3, "SIGINT": 130, "SIGTERM": 143, "cancelled": 143,
    }  # fmt: skip
    assert (ConfigError.exit_code, IncompleteRun.exit_code) == (2, 1)
    assert RunStopped("x", "SIGINT").exit_code == 130
    assert combined_exit_code([1, 3, 2]) == 2
    assert combined_exit_code([1, 3]) == 3
    assert combined_exit_code([1, 143]) == 1
    assert combined_exit_code([143]) == 143
    assert combined_exit_code([]) == 1


def test_a_run_that_keeps_crashing_is_not_resumed_past_its_budget() -> None:
    settings = RolloutsSettings(max_auto_resumes=2)
    check_resume_budget(3, settings)
    with pytest.raises(Exception, match="already started 3 times and was resumed 2 times"):
        check_resume_budget(4, settings)
