"""Disk safety: whole files or the old ones, never a torn output, never a stray temp file."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import AgentServer, read_jsonl, write_jsonl
from prefect.states import State

from flows.collect import collect_rollouts
from reference_agent.server import generate_tasks
from rollouts.chunks import ChunkFiles
from rollouts.fileio import UnwritablePathError, atomic_writer, write_json_atomic
from rollouts.merge import merge_chunks
from rollouts.run_state import OutputPaths, read_run_state, run_dir_for
from rollouts.split import split_input
from rollouts_cli.main import main as cli_main


def run_collect(**params: Any) -> State:
    return asyncio.run(collect_rollouts(**params, return_state=True))


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file directly in ``directory`` (temp files included) and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------- atomic_writer


@pytest.mark.parametrize("interruption", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_exception_mid_write_keeps_the_old_file_and_no_temp_file(
    tmp_path: Path, interruption: BaseException
) -> None:
    target = tmp_path / "out.jsonl"
    target.write_bytes(b'{"old": 1}\n')
    before = snapshot(tmp_path)

    with pytest.raises(type(interruption)), atomic_writer(target) as f:
        f.write(b'{"new": 1}\n' * 10_000)  # past the buffer: bytes are on disk in the temp file
        f.flush()
        raise interruption

    assert snapshot(tmp_path) == before


def test_an_unserializable_manifest_keeps_the_old_one(tmp_path: Path) -> None:
    manifest = tmp_path / "mix_manifest.json"
    write_json_atomic(manifest, {"seed": 0})
    before = snapshot(tmp_path)
    with pytest.raises(TypeError):
        write_json_atomic(manifest, {"seed": object()})
    assert snapshot(tmp_path) == before


def test_a_target_that_cannot_be_replaced_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "out.jsonl").mkdir()  # something is in the way of the rename
    with pytest.raises(UnwritablePathError, match=r"cannot write .*out\.jsonl: Is a directory"):
        write_json_atomic(tmp_path / "out.jsonl", {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left


# ------------------------------------------------------------------ merge with a bad source


def test_a_merge_whose_source_is_unreadable_keeps_the_old_outputs(
    tmp_path: Path, agent: AgentServer
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", list(generate_tasks(15)))
    out = tmp_path / "out.jsonl"
    state = run_collect(agent_url=agent.url, input_jsonl_fpath=str(inp),
                        output_jsonl_fpath=str(out), chunk_size=5)  # fmt: skip
    assert state.is_completed(), state.message
    before = snapshot(tmp_path)
    run_dir = run_dir_for(out, None)
    split = split_input(inp, run_dir, run_id=read_run_state(run_dir).run_id, chunk_size=5)
    paths = OutputPaths.for_output(out)

    def merge() -> None:
        merge_chunks(split.chunks, num_repeats=1,
                     agent_of=lambda _: agent.url, output_path=paths.rollouts,
                     failures_path=paths.failures)  # fmt: skip

    # a source that cannot be read at all: a directory where a chunk's rollouts should be
    source = ChunkFiles.of(split.chunks[1]).rollouts
    kept = source.read_bytes()
    source.unlink()
    source.mkdir()
    with pytest.raises(IsADirectoryError):
        merge()
    assert snapshot(tmp_path) == before

    # a source with a corrupt line in the middle
    source.rmdir()
    source.write_bytes(kept[:40] + b"\n" + kept)
    with pytest.raises(orjson.JSONDecodeError):
        merge()
    assert snapshot(tmp_path) == before
    assert len(read_jsonl(out)) == 15


# ------------------------------------------------------------ unwritable output directories


@pytest.mark.parametrize("where", ["output", "work_dir"])
def test_an_unwritable_directory_is_a_clear_error_before_anything_is_sent(
    where: str, tmp_path: Path, agent: AgentServer, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    # chmod does not stop root; a regular file in the path stops everyone.
    afile = tmp_path / "afile"
    afile.write_bytes(b"not a directory\n")
    inp = write_jsonl(tmp_path / "in.jsonl", list(generate_tasks(4)))
    if where == "output":
        out, blocked = afile / "out.jsonl", afile
    else:
        out, blocked = tmp_path / "out.jsonl", afile / "state"
        monkeypatch.setenv("ROLLOUTS_WORK_DIR", str(blocked))

    state = run_collect(agent_url=agent.url, input_jsonl_fpath=str(inp),
                        output_jsonl_fpath=str(out))  # fmt: skip

    assert state.is_failed()
    assert isinstance(state.result(raise_on_failure=False), UnwritablePathError)
    assert f"cannot write the {'output' if where == 'output' else 'run state of'} {out}" in (
        state.message
    )
    assert str(blocked) in state.message and "not a writable directory" in state.message
    assert "Traceback" not in state.message and "Errno" not in state.message
    assert agent.requests() == [] and afile.read_bytes() == b"not a directory\n"

    capsys.readouterr()
    code = cli_main(["collect", f"+agent_url={agent.url}", f"+input_jsonl_fpath={inp}",
                     f"+output_jsonl_fpath={out}"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2
    assert "rollouts collect: cannot write the" in captured.err
    assert "Traceback" not in captured.err + captured.out


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 KiB tmpfs: a real disk that fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)],
                          capture_output=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_at_merge_keeps_the_old_outputs_and_loses_no_rollout(
    tmp_path: Path, tiny_disk: Path, start_agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROLLOUTS_WORK_DIR", str(tmp_path / "state"))  # state on a big disk
    agent = start_agent("--fail-400-tasks", "150")  # the new failures file differs from the old
    tasks = list(generate_tasks(200))
    inp = write_jsonl(tmp_path / "in.jsonl", tasks[:10])
    out = tiny_disk / "out.jsonl"
    params = {"agent_url": agent.url, "input_jsonl_fpath": str(inp),
              "output_jsonl_fpath": str(out), "chunk_size": 50}  # fmt: skip
    assert run_collect(**params).is_completed()
    before = snapshot(tiny_disk)
    assert len(read_jsonl(out)) == 10

    write_jsonl(inp, tasks)  # 190 more rows: ~200 KB of rollouts for a 48 KiB disk
    state = run_collect(**params)

    assert state.is_failed()
    assert isinstance(state.result(raise_on_failure=False), UnwritablePathError)
    assert f"cannot write {out}" in state.message and "No space left on device" in state.message
    # the old rollouts and the old failures, whole (never a new one beside an old one); no temp
    assert snapshot(tiny_disk) == before
    assert len(agent.requests()) == 200  # everything was collected, into the run state

    # Space is freed; the same command finishes from the run state without the agent.
    subprocess.run(["mount", "-o", "remount,size=4m", str(tiny_disk)], check=True)
    state = run_collect(**params)
    assert state.is_completed(), state.message
    assert len(agent.requests()) == 200
    rows = read_jsonl(out)
    assert [r["_ng_task_index"] for r in rows] == [t for t in range(200) if t != 150]
    assert [f["_ng_task_index"] for f in read_jsonl(tiny_disk / "out_failures.jsonl")] == [150]
    assert rows[:10] == [orjson.loads(x) for x in before["out.jsonl"].splitlines()]
    assert sorted(p.name for p in tiny_disk.iterdir()) == sorted(before)


def test_temp_files_never_outlive_a_successful_collection(
    tmp_path: Path, agent: AgentServer
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", list(generate_tasks(30)))
    out = tmp_path / "out.jsonl"
    state = run_collect(agent_url=agent.url, input_jsonl_fpath=str(inp),
                        output_jsonl_fpath=str(out), chunk_size=7)  # fmt: skip
    assert state.is_completed(), state.message
    stray = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert stray == []
    assert not (run_dir_for(out, None) / "chunks.staging").exists()


def test_a_disk_that_fills_during_collection_loses_nothing_already_written(
    tmp_path: Path, tiny_disk: Path, agent: AgentServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROLLOUTS_CHUNK_RETRIES", "0")
    inp = write_jsonl(tmp_path / "in.jsonl", list(generate_tasks(120)))
    out = tiny_disk / "out.jsonl"  # the run state (chunk outputs) is on the tiny disk too
    params = {"agent_url": agent.url, "input_jsonl_fpath": str(inp),
              "output_jsonl_fpath": str(out), "chunk_size": 40,
              "num_samples_in_parallel": 4}  # fmt: skip

    state = run_collect(**params)

    # The disk filled while rollouts were being appended: the run says so and names the file.
    assert state.is_failed()
    assert f"cannot write {out}" in state.message and "No space left" in state.message
    assert not out.exists()
    sent = len(agent.requests())
    run_dir = run_dir_for(out, None)
    kept = {}  # what reached the disk in whole lines: the run state cannot take it back
    for p in (run_dir / "chunks").glob("*.rollouts.jsonl"):
        data = p.read_bytes()
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            row = orjson.loads(line)
            kept[row["_ng_task_index"]] = line

    subprocess.run(["mount", "-o", "remount,size=4m", str(tiny_disk)], check=True)
    state = run_collect(**params)

    assert state.is_completed(), state.message
    rows = out.read_bytes().splitlines()
    assert [orjson.loads(r)["_ng_task_index"] for r in rows] == list(range(120))
    assert all(rows[t] == line for t, line in kept.items())  # kept byte for byte
    resent = {q["_ng_task_index"] for q in agent.requests()[sent:]}
    assert resent == set(range(120)) - set(kept)  # only what had not reached the disk
    print(f"disk full during collection: {len(kept)} rollouts on disk, {len(resent)} resent")
