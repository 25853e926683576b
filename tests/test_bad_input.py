"""Bad input and bad parameters: a clear error naming file, line and field, before anything.

Nothing may be sent to the agent and nothing written: no output files and no chunk committed.
The CLI prints the message and exits 2.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import AgentServer, write_jsonl
from prefect.states import State

from flows.collect import collect_rollouts
from reference_agent.server import generate_tasks
from rollouts.errors import InputError
from rollouts.run_state import OutputPaths, run_dir_for
from rollouts_cli.main import main as cli_main

GOOD = b'{"responses_create_params": {"input": "What is 1 + 2?"}, "expected_answer": "3"}\n'

# case -> (file content or None for a missing file, line named, words in the message)
BAD_FILES: dict[str, tuple[bytes | None, int | None, list[str]]] = {
    "malformed_json": (GOOD * 4 + b'{"responses_create_params": {"input": "a"\n', 5,
                       ["malformed JSON", "column"]),
    "trailing_garbage": (GOOD + b'{"responses_create_params": {}} x\n', 2, ["malformed JSON"]),
    "array_row": (GOOD + b"[1, 2]\n", 2, ["expected a JSON object, got list"]),
    "number_row": (GOOD + b"42\n", 2, ["expected a JSON object, got int"]),
    "null_row": (GOOD + b"null\n", 2, ["expected a JSON object"]),
    "missing_rcp": (GOOD + b'{"question": "1 + 2"}\n', 2,
                    ["missing field 'responses_create_params'"]),
    "rcp_string": (b'{"responses_create_params": "What is 1 + 2?"}\n', 1,
                   ["'responses_create_params' must be an object, got str"]),
    "rcp_list": (GOOD + b'{"responses_create_params": [1]}\n', 2,
                 ["'responses_create_params' must be an object, got list"]),
    "latin1_bytes": (GOOD + b'{"responses_create_params": {"input": "caf\xe9"}}\n', 2,
                     ["not valid UTF-8"]),
    "invalid_utf8_start": (b'\xff\xfe{"responses_create_params": {}}\n', 1, ["not valid UTF-8"]),
    "duplicate_index": (b'{"responses_create_params": {}, "_ng_task_index": 3}\n' + GOOD
                        + b'{"responses_create_params": {}, "_ng_task_index": 3}\n', 3,
                        ["duplicate _ng_task_index 3", "also on line 1"]),
    "duplicate_of_a_position": (GOOD + b'{"responses_create_params": {}, "_ng_task_index": 0}\n',
                                2, ["duplicate _ng_task_index 0", "also on line 1"]),
    "negative_index": (b'{"responses_create_params": {}, "_ng_task_index": -1}\n', 1,
                       ["'_ng_task_index' must be a non-negative integer"]),
    "string_index": (b'{"responses_create_params": {}, "_ng_task_index": "7"}\n', 1,
                     ["'_ng_task_index' must be a non-negative integer"]),
    "bad_agent_ref": (b'{"responses_create_params": {}, "agent_ref": "me"}\n', 1,
                      ["'agent_ref' must be an object"]),
    "empty_file": (b"", None, ["no tasks: the file is empty"]),
    "blank_lines_only": (b"\n  \n\n", None, ["no tasks: the file is empty"]),
    "missing_file": (None, None, ["file not found"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentServer]:
    """One reference agent for the whole module: no case may send it anything at all."""
    log = tmp_path_factory.mktemp("agent") / "requests.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "reference_agent", "--port", "0", "--request-log",
         str(log)], stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    assert "listening on" in line, line
    server = AgentServer(line.rsplit(" ", 1)[-1].strip(), proc, log)
    yield server
    server.stop()


def run_collect(**params: Any) -> State:
    return asyncio.run(collect_rollouts(**params, return_state=True))


def assert_nothing_written(out: Path, agent: AgentServer) -> None:
    assert agent.requests() == [], "a request reached the agent"
    for p in OutputPaths.for_output(out).all():
        assert not p.exists(), f"{p} was written"
    run_dir = run_dir_for(out, None)
    chunk_files = list((run_dir / "chunks").glob("*")) if run_dir.exists() else []
    assert chunk_files == [], f"chunks committed: {chunk_files}"
    staged = list((run_dir / "chunks.staging").glob("*")) if run_dir.exists() else []
    assert staged == [], f"staged chunks left behind: {staged}"


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_input_file_is_refused_naming_file_line_and_field(
    case: str, tmp_path: Path, agent: AgentServer, capsys: pytest.CaptureFixture[str]
) -> None:
    content, line, words = BAD_FILES[case]
    inp = tmp_path / "bad.jsonl"
    if content is not None:
        inp.write_bytes(content)
    out = tmp_path / "out.jsonl"
    # chunk_size 1: valid rows before the bad one would make whole chunks, none committed
    params = {"agent_url": agent.url, "input_jsonl_fpath": str(inp),
              "output_jsonl_fpath": str(out), "chunk_size": 1}  # fmt: skip

    state = run_collect(**params)

    assert state.is_failed()
    assert isinstance(state.result(raise_on_failure=False), InputError)
    where = f"{inp}:{line}:" if line else f"{inp}:"
    assert where in state.message, state.message
    for w in words:
        assert w in state.message, state.message
    assert "Traceback" not in state.message
    assert_nothing_written(out, agent)

    # The CLI says the same and exits 2.
    capsys.readouterr()
    code = cli_main(["collect", f"+agent_url={agent.url}", f"+input_jsonl_fpath={inp}",
                     f"+output_jsonl_fpath={out}", "+chunk_size=1"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert f"rollouts collect: invalid input {inp}" in err and where in err
    assert_nothing_written(out, agent)


def test_a_malformed_line_is_reported_by_its_file_line_not_the_parser_line(
    tmp_path: Path, agent: AgentServer
) -> None:
    inp = tmp_path / "bad.jsonl"
    bad = b'{"responses_create_params": {"input": "x"},}'
    inp.write_bytes(GOOD * 6 + bad + b"\n")
    state = run_collect(agent_url=agent.url, input_jsonl_fpath=str(inp),
                        output_jsonl_fpath=str(tmp_path / "out.jsonl"))  # fmt: skip
    problem = state.message.split(f"{inp}:7: ", 1)[1]
    # the only line number in the message is the file's (orjson alone says "line 1 column 43")
    column = bad.index(b",}") + 1  # 1-based position of the trailing comma
    assert problem == f"malformed JSON at column {column}: trailing comma is not allowed"


def test_every_problem_is_listed_up_to_a_cap(tmp_path: Path, agent: AgentServer) -> None:
    inp = tmp_path / "bad.jsonl"
    inp.write_bytes((GOOD + b"[]\n") * 30)
    state = run_collect(agent_url=agent.url, input_jsonl_fpath=str(inp),
                        output_jsonl_fpath=str(tmp_path / "out.jsonl"))  # fmt: skip
    assert "(30 problems)" in state.message and "... and 10 more" in state.message
    assert f"{inp}:2:" in state.message and f"{inp}:40:" in state.message
    assert agent.requests() == []


BAD_PARAMS: dict[str, tuple[dict[str, Any], list[str], list[str]]] = {
    # case -> (flow parameters, words in the message, the same as CLI arguments)
    "unknown_override": ({"responses_create_params": {"temperatur": 0.2}},
                         ["responses_create_params.temperatur", "not a Responses API"],
                         ["+responses_create_params.temperatur=0.2"]),
    "limit_zero": ({"limit": 0}, ["limit", "got 0"], ["+limit=0"]),
    "limit_negative": ({"limit": -5}, ["limit", "got -5"], ["--limit", "-5"]),
    "repeats_zero": ({"num_repeats": 0}, ["num_repeats", "got 0"], ["+num_repeats=0"]),
    "repeats_negative": ({"num_repeats": -2}, ["num_repeats", "got -2"], ["--num-repeats", "-2"]),
    "chunk_size_zero": ({"chunk_size": 0}, ["chunk_size", "got 0"], ["+chunk_size=0"]),
    "parallel_zero": ({"num_samples_in_parallel": 0}, ["num_samples_in_parallel", "got 0"],
                      ["+num_samples_in_parallel=0"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_bad_parameters_are_refused_before_anything(
    case: str, tmp_path: Path, agent: AgentServer
) -> None:
    params, words, _ = BAD_PARAMS[case]
    inp = write_jsonl(tmp_path / "in.jsonl", list(generate_tasks(5)))
    out = tmp_path / "out.jsonl"

    state = run_collect(agent_url=agent.url, input_jsonl_fpath=str(inp),
                        output_jsonl_fpath=str(out), **params)  # fmt: skip

    assert state.is_failed()
    for w in words:
        assert w in state.message, state.message
    assert_nothing_written(out, agent)
    assert not run_dir_for(out, None).exists()  # refused before any state was created


@pytest.mark.parametrize("case", ["unknown_override", "limit_zero", "repeats_negative"])
def test_cli_exits_2_on_bad_parameters(
    case: str, tmp_path: Path, agent: AgentServer, capsys: pytest.CaptureFixture[str]
) -> None:
    _, words, args = BAD_PARAMS[case]
    inp = write_jsonl(tmp_path / "in.jsonl", list(generate_tasks(5)))
    out = tmp_path / "out.jsonl"
    code = cli_main(["collect", f"+agent_url={agent.url}", f"+input_jsonl_fpath={inp}",
                     f"+output_jsonl_fpath={out}", *args])  # fmt: skip
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert_nothing_written(out, agent)
    assert code == 2


def test_a_refused_input_does_not_pin_the_parameters_of_the_next_run(
    tmp_path: Path, start_agent: Any
) -> None:
    agent = start_agent()
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(GOOD + b"[]\n")
    out = tmp_path / "out.jsonl"
    base = {"agent_url": agent.url, "input_jsonl_fpath": str(inp), "output_jsonl_fpath": str(out)}
    assert run_collect(**base, responses_create_params={"temperature": 0.2}).is_failed()

    # The user fixes the file and, since nothing was collected, also changes the temperature.
    write_jsonl(inp, list(generate_tasks(3)))
    state = run_collect(**base, responses_create_params={"temperature": 0.7}, chunk_size=2)

    assert state.is_completed(), state.message
    assert {q["temperature"] for q in agent.requests()} == {0.7}


def test_cli_subprocess_prints_the_problem_and_exits_2(
    tmp_path: Path, agent: AgentServer, prefect_api: str
) -> None:
    inp = tmp_path / "bad.jsonl"
    inp.write_bytes(GOOD + b'{"responses_create_params": 3}\n')
    out = tmp_path / "out.jsonl"
    res = subprocess.run(
        [sys.executable, "-m", "rollouts_cli", "collect", "--agent-url", agent.url,
         "--input", str(inp), "--output", str(out)],
        env={**os.environ, "PREFECT_API_URL": prefect_api}, cwd=tmp_path, capture_output=True,
        text=True, timeout=120, check=False,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.splitlines()
    (at,) = [i for i, x in enumerate(lines) if x.startswith("rollouts collect:")]
    assert lines[at].startswith(f"rollouts collect: invalid input {inp} (1 problem)")
    assert f"{inp}:2: field 'responses_create_params' must be an object, got int" in lines[at + 1]
    assert_nothing_written(out, agent)


@pytest.mark.parametrize(
    ("hard", "words"),
    [({"responses_create_params": {"temprature": 0.2}},
      "datasets.1 (hard).responses_create_params: Value error, responses_create_params.temprature"
      " is not a Responses API create parameter"),
     ({"output": "hard.jsonl"}, "datasets.1 (hard): Value error, output must differ from input")],
)  # fmt: skip
def test_a_multi_dataset_run_with_one_bad_dataset_is_refused_before_any_dataset_starts(
    hard: dict[str, Any], words: str, tmp_path: Path, agent: AgentServer,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    for name in ("easy", "hard"):
        write_jsonl(tmp_path / f"{name}.jsonl", list(generate_tasks(5)))
    datasets = [{"name": n, "input": f"{n}.jsonl", "output": f"out_{n}.jsonl",
                 "agent_url": agent.url} for n in ("easy", "hard")]  # fmt: skip
    datasets[1].update(hard)
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"datasets": datasets}))

    code = cli_main(["multi", "--config", str(config)])

    assert code == 2
    assert f"rollouts multi: config {config}: {words}" in capsys.readouterr().err
    for d in datasets:
        if d["output"] != d["input"]:
            assert_nothing_written(tmp_path / d["output"], agent)
    assert agent.requests() == []
