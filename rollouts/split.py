"""Split: validate every input row, stamp task indices, write fixed-size chunk files.

Streams the input once and never holds it whole. Every row is checked before anything is
committed, so bad input fails before a single request is sent. Rows already split for this
output are compared byte for byte with what was collected: appended rows are welcome, changed
ones are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from array import array
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from rollouts.chunks import ChunkFiles, write_task_indices
from rollouts.errors import InputError, RunConflict
from rollouts.fileio import dumps_line, fsync_dir
from rollouts.models import ChunkSpec, SplitResult
from rollouts.nemo_gym import AGENT_REF, NG_TASK_INDEX, RESPONSES_CREATE_PARAMS
from rollouts.run_state import how_to_start_over, record_chunks
from rollouts.storage import check_readable, local_or_url, open_lines

# The input: a local path, or a URL of object storage (s3://bucket/tasks.jsonl) as given.
Input = Path | str

MAX_REPORTED_PROBLEMS = 20


def _check_row(obj: Any, require_agent_ref: bool) -> str | None:
    """The problem with one parsed row, or None."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    rcp = obj.get(RESPONSES_CREATE_PARAMS)
    if rcp is None:
        return "missing field 'responses_create_params' (an object of Responses API params)"
    if not isinstance(rcp, dict):
        return f"field 'responses_create_params' must be an object, got {type(rcp).__name__}"
    idx = obj.get(NG_TASK_INDEX)
    if idx is not None and (not isinstance(idx, int) or isinstance(idx, bool) or idx < 0):
        return f"field '_ng_task_index' must be a non-negative integer, got {idx!r}"
    ref = obj.get(AGENT_REF)
    if ref is not None and not (isinstance(ref, dict) and isinstance(ref.get("name"), str)):
        return "field 'agent_ref' must be an object with a string 'name'"
    if require_agent_ref and ref is None:
        return "no agent: the row has no 'agent_ref' and no agent_name/agent_url was given"
    return None


class _ChunkWriter:
    """Stages one chunk and checks it against the version collected before, line by line."""

    def __init__(self, run_dir: Path, index: int, input_path: Input) -> None:
        self.run_dir = run_dir
        self.index = index
        self.input_path = input_path
        self.files = ChunkFiles.of_run(run_dir, index)
        self.path = self.files.tasks
        self.staged = run_dir / "chunks.staging" / self.path.name
        self.staged.parent.mkdir(parents=True, exist_ok=True)
        self.old: IO[bytes] | None = open(self.path, "rb") if self.path.exists() else None
        self.out: IO[bytes] = open(self.staged, "wb")
        self.changed = self.old is None
        self.n = 0
        self.sha = hashlib.sha256()
        self.task_indices = array("q")
        self.rows_per_agent: Counter[str] = Counter()
        self.spec: ChunkSpec | None = None

    def add(self, line: bytes, input_line: int, task_index: int, agent: str | None) -> None:
        if self.old is not None:
            before = self.old.readline()
            if before and before != line:
                raise RunConflict(
                    f"{self.input_path}:{input_line}: this row (_ng_task_index {task_index}) "
                    "differs from the task already collected at that position for this output. "
                    "To resume an interrupted collection, rerun the original command unchanged "
                    "(rollouts already written are skipped; no need to cut the input with "
                    "`tail`). To collect changed data, write to another output or "
                    f"{how_to_start_over(self.run_dir)}."
                )
            if not before:
                self.changed = True  # rows appended past what was split before
        self.out.write(line)
        self.sha.update(line)
        self.n += 1
        self.task_indices.append(task_index)
        if agent is not None:
            self.rows_per_agent[agent] += 1

    def close(self, run_id: str) -> ChunkSpec:
        if self.old is not None:
            if self.old.readline():
                self.changed = True  # fewer rows than before (a smaller limit): keep the prefix
            self.old.close()
        self.out.flush()
        os.fsync(self.out.fileno())
        self.out.close()
        lo, hi = min(self.task_indices), max(self.task_indices)
        self.spec = ChunkSpec(
            index=self.index,
            tasks_path=str(self.path),
            n_tasks=self.n,
            content_sha256=self.sha.hexdigest(),
            run_id=run_id,
            task_min=lo,
            task_max=hi,
            contiguous=hi - lo + 1 == self.n,  # indices are unique: n of them fill the range
            rows_per_agent=dict(sorted(self.rows_per_agent.items())),
        )
        return self.spec

    def commit(self) -> None:
        if self.changed:
            os.replace(self.staged, self.path)
        else:
            self.staged.unlink()
        assert self.spec is not None
        if not self.spec.contiguous:  # after the tasks file it describes; rewritten when stale
            write_task_indices(self.spec, list(self.task_indices))

    def abort(self) -> None:
        if self.old is not None:
            self.old.close()
        self.out.close()
        self.staged.unlink(missing_ok=True)


@contextlib.contextmanager
def _input_lines(input_path: Input) -> Iterator[Iterator[bytes]]:
    """The input's lines: a local file's, or streamed from object storage."""
    if isinstance(input_path, Path):
        with open(input_path, "rb") as f:
            yield f
    else:
        with open_lines(input_path) as lines:
            yield lines


def _parsed_rows(
    input_path: Input, limit: int | None, require_agent_ref: bool
) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, row or None, problem or None) for the first ``limit`` rows."""
    rows = 0
    with _input_lines(input_path) as f:
        for number, raw in enumerate(f, start=1):
            if limit is not None and rows >= limit:
                return
            if not raw.strip():
                continue
            rows += 1
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as ue:
                    yield number, None, f"not valid UTF-8 (byte {ue.start} of the line)"
                    continue
                # orjson's own "line 1 column 8" would contradict the file line we report
                yield number, None, f"malformed JSON at column {e.colno}: {e.msg}"
                continue
            problem = _check_row(obj, require_agent_ref)
            yield number, (obj if problem is None else None), problem


def _first_line_with_index(input_path: Input, task_index: int, limit: int | None) -> int | None:
    """Only on the error path: find where a duplicated task index first appeared."""
    for position, (number, row, _) in enumerate(_parsed_rows(input_path, limit, False)):
        if row is not None and row.get(NG_TASK_INDEX, position) == task_index:
            return number
    return None


def _check_input_file(input_path: Input) -> None:
    if not isinstance(input_path, Path):
        check_readable(input_path)  # a one-line error naming the URL
        return
    if not input_path.exists():
        raise InputError(input_path, [(None, "file not found")])
    if input_path.is_dir():
        raise InputError(input_path, [(None, "is a directory, expected a JSONL file")])


def _valid_rows(
    input_path: Input, limit: int | None, require_agent_ref: bool
) -> Iterator[tuple[int, dict[str, Any], int]]:
    """(line number, row, task index) of each row while every row so far is valid.

    Validates the whole input: after the first bad row it yields nothing more but keeps
    checking, then raises InputError (file, line, problem) listing the problems. Also raises
    when there is no row at all. Writes nothing.

    Task index: the row's own ``_ng_task_index`` when present, else its 0-based row position.
    """
    problems: list[tuple[int | None, str]] = []
    n_problems = 0
    seen: set[int] = set()  # task indices, to refuse duplicates (a set: ~60 MB at 1M rows)
    position = 0
    for number, row, parse_problem in _parsed_rows(input_path, limit, require_agent_ref):
        problem = parse_problem
        if row is not None:
            task_index = row.get(NG_TASK_INDEX, position)
            if task_index in seen:
                first = (  # a rescan, so only for the problems we report
                    _first_line_with_index(input_path, task_index, limit)
                    if len(problems) < MAX_REPORTED_PROBLEMS
                    else "?"
                )
                problem = f"duplicate _ng_task_index {task_index} (also on line {first})"
            seen.add(task_index)
        position += 1
        if problem is not None:
            n_problems += 1
            if len(problems) < MAX_REPORTED_PROBLEMS:
                problems.append((number, problem))
            continue
        if n_problems:
            continue  # keep validating, but yield nothing more
        assert row is not None
        yield number, row, task_index
    if n_problems:
        raise InputError(input_path, problems, n_problems)
    if position == 0:
        raise InputError(input_path, [(None, "no tasks: the file is empty")])


def split_input(
    input_path: Input,
    run_dir: Path,
    *,
    run_id: str,
    chunk_size: int,
    limit: int | None = None,
    require_agent_ref: bool = False,
) -> SplitResult:
    """Validate ``input_path`` (a local path, or a URL streamed from object storage) and write
    its chunks under ``run_dir/chunks``.

    Task index: the row's own ``_ng_task_index`` when present, else its 0-based row position.
    Raises InputError (file, line, problem) before committing anything when any row is bad.
    """
    input_path = local_or_url(input_path)
    _check_input_file(input_path)
    (run_dir / "chunks").mkdir(parents=True, exist_ok=True)

    agent_names: set[str] = set()
    specs: list[ChunkSpec] = []
    closed: list[_ChunkWriter] = []  # committed only once the whole input is valid
    writer: _ChunkWriter | None = None
    try:
        for number, row, task_index in _valid_rows(input_path, limit, require_agent_ref):
            if NG_TASK_INDEX not in row:
                row[NG_TASK_INDEX] = task_index
            agent = row[AGENT_REF]["name"] if AGENT_REF in row else None
            if agent is not None:
                agent_names.add(agent)
            if writer is None:
                writer = _ChunkWriter(run_dir, len(specs), input_path)
            writer.add(dumps_line(row), number, task_index, agent)
            if writer.n == chunk_size:
                specs.append(writer.close(run_id))
                closed.append(writer)
                writer = None
        if writer is not None:
            specs.append(writer.close(run_id))
            closed.append(writer)
            writer = None
    except BaseException:
        for w in [*closed, *([writer] if writer else [])]:
            w.abort()
        shutil.rmtree(run_dir / "chunks.staging", ignore_errors=True)
        raise
    for w in closed:
        w.commit()
    fsync_dir(run_dir / "chunks")
    record_chunks(run_dir, specs)
    shutil.rmtree(run_dir / "chunks.staging", ignore_errors=True)
    return SplitResult(
        run_dir=str(run_dir),
        run_id=run_id,
        n_tasks=sum(s.n_tasks for s in specs),
        chunks=specs,
        agent_names=sorted(agent_names),
    )


def validate_input(input_path: Input, *, limit: int | None, require_agent_ref: bool) -> None:
    """Check every row, writing nothing (raises InputError exactly like split_input).

    Used before `--fresh` discards what was collected: bad input must not cost the old output.
    """
    input_path = local_or_url(input_path)
    _check_input_file(input_path)
    for _ in _valid_rows(input_path, limit, require_agent_ref):
        pass
