"""Merge: chunk outputs -> one sorted, de-duplicated output file, written atomically (a local
file: temp file and rename; an object in a bucket: a multipart upload completed at the end,
rollouts/storage.py).

Bodies are never all in memory: each chunk's file is indexed by (key, byte offset, length),
sorted, and copied. When chunks cover disjoint task-index ranges (the usual case), only one
chunk's index is held at a time; otherwise the chunk indices are merged with a heap.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from rollouts.chunks import ChunkFiles, task_indices
from rollouts.models import ChunkSpec, RolloutKey
from rollouts.nemo_gym import AGENT_REF, NG_FAILURE_CLASS, NG_FAILURE_TERMINAL, key_of
from rollouts.storage import Location, Writer, output_writers

Entry = tuple[RolloutKey, int, int]  # (key, byte offset, length incl. newline)
MAX_MISSING_EXAMPLES = 10


@dataclass
class MergeReport:
    expected: int
    succeeded: int
    failed: int  # terminal failures
    retryable_failed: int  # budget exhausted; retried on the next run
    missing: int  # neither written nor terminally failed
    missing_examples: list[RolloutKey] = field(default_factory=list)
    expected_by_agent: dict[str, int] = field(default_factory=dict)
    retryable_classes: dict[str, int] = field(default_factory=dict)  # why the missing failed
    # One example per retryable class: (agent name, error), so a message can say who and how.
    retryable_samples: dict[str, tuple[str, str]] = field(default_factory=dict)


def _index_file(
    path: Path, valid: Callable[[RolloutKey], bool], keep_last: bool
) -> dict[RolloutKey, tuple[int, int, dict[str, Any] | None]]:
    """key -> (offset, length) of its first (or last) complete line in ``path``."""
    index: dict[RolloutKey, tuple[int, int, dict[str, Any] | None]] = {}
    if not path.exists():
        return index
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            length = len(line)
            if line.endswith(b"\n") and line.strip():
                row = orjson.loads(line)
                key = key_of(row)
                if valid(key) and (keep_last or key not in index):
                    index[key] = (offset, length, row if keep_last else None)
            offset += length
    return index


@dataclass
class _ChunkIndex:
    rollouts: list[Entry]
    failures: list[Entry]
    rollouts_path: Path
    failures_path: Path
    failure_rows: list[dict[str, Any]]


def _chunk_index(
    tasks: Container[int], repeats: int, rollouts_path: Path, failures_path: Path
) -> _ChunkIndex:
    def valid(key: RolloutKey) -> bool:
        return key[0] in tasks and 0 <= key[1] < repeats

    ok = _index_file(rollouts_path, valid, keep_last=False)
    fails = _index_file(failures_path, lambda k: valid(k) and k not in ok, keep_last=True)
    return _ChunkIndex(
        rollouts=sorted((k, o, n) for k, (o, n, _) in ok.items()),
        failures=sorted((k, o, n) for k, (o, n, _) in fails.items()),
        rollouts_path=rollouts_path,
        failures_path=failures_path,
        failure_rows=[
            {
                "key": k,
                "terminal": r.get(NG_FAILURE_TERMINAL) is True,
                "class": str(r.get(NG_FAILURE_CLASS)),
                "agent": str((r.get(AGENT_REF) or {}).get("name", "")),
                "error": str(r.get("error", "")),
            }
            for k, (_, _, r) in fails.items()
            if r is not None
        ],
    )


def _copy(entries: Iterator[tuple[Entry, Path]], out: Writer) -> None:
    handles: dict[Path, IO[bytes]] = {}
    try:
        for (_, offset, length), path in entries:
            f = handles.get(path)
            if f is None:
                f = handles[path] = open(path, "rb")
            f.seek(offset)
            out.write(f.read(length))
    finally:
        for f in handles.values():
            f.close()


def merge_chunks(
    chunks: list[ChunkSpec],
    *,
    num_repeats: int,
    agent_of: Callable[[str | None], str],
    output_path: Location,
    failures_path: Location,
) -> MergeReport:
    """Write ``output_path`` (rollouts) and ``failures_path`` sorted by (task, rollout) index.

    The failures file holds one row per rollout that did not succeed (its last failure).
    ``agent_of`` maps a task row's agent_ref name (None: it has none) to its agent's label.
    Reads the chunks' results, never their tasks files: split recorded what merge needs.
    """
    expected_by_agent: Counter[str] = Counter()
    for spec in chunks:
        expected_by_agent.update(spec.expected_by_agent(num_repeats, agent_of))
    expected = sum(spec.expected(num_repeats) for spec in chunks)

    succeeded = terminal = retryable = 0
    retry_classes: Counter[str] = Counter()
    retry_samples: dict[str, tuple[str, str]] = {}
    missing_examples: list[RolloutKey] = []

    def visit(spec: ChunkSpec) -> _ChunkIndex:
        nonlocal succeeded, terminal, retryable
        tasks = task_indices(spec)
        idx = _chunk_index(tasks, num_repeats, *ChunkFiles.of(spec).outputs)
        succeeded += len(idx.rollouts)
        done = {k for k, _, _ in idx.rollouts}
        for f in idx.failure_rows:
            if f["terminal"]:
                terminal += 1
                done.add(f["key"])
            else:
                retry_classes[f["class"]] += 1
                retry_samples.setdefault(f["class"], (f["agent"], f["error"]))
                retryable += 1
        if len(missing_examples) < MAX_MISSING_EXAMPLES:
            for t in tasks if isinstance(tasks, range) else sorted(tasks):
                for r in range(num_repeats):
                    if (t, r) not in done and len(missing_examples) < MAX_MISSING_EXAMPLES:
                        missing_examples.append((t, r))
        return idx

    with output_writers([output_path, failures_path]) as (out, fout):
        if _disjoint_ranges(chunks):
            for spec in sorted(chunks, key=lambda s: s.task_min):
                idx = visit(spec)
                _copy(((e, idx.rollouts_path) for e in idx.rollouts), out)
                _copy(((e, idx.failures_path) for e in idx.failures), fout)
        else:
            indices = [visit(spec) for spec in chunks]
            _copy(heapq.merge(*(((e, i.rollouts_path) for e in i.rollouts) for i in indices)), out)
            _copy(heapq.merge(*(((e, i.failures_path) for e in i.failures) for i in indices)), fout)

    return MergeReport(
        expected=expected,
        succeeded=succeeded,
        failed=terminal,
        retryable_failed=retryable,
        missing=expected - succeeded - terminal,
        missing_examples=missing_examples,
        expected_by_agent=dict(expected_by_agent),
        retryable_classes=dict(retry_classes),
        retryable_samples=retry_samples,
    )


def _disjoint_ranges(chunks: list[ChunkSpec]) -> bool:
    ranges = sorted((s.task_min, s.task_max) for s in chunks)
    return all(a[1] < b[0] for a, b in itertools.pairwise(ranges))
