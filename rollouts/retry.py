"""Retry by failure class: reopen the rollouts that failed with chosen classes, so that a
collection in retry mode sends them (and only them) again.

Per chunk, ``reopen_failures`` moves the selected keys out of ``NNNNN.failures.jsonl`` into
``NNNNN.retry.json`` (the keys, their class and attempts so far). Order, for crash safety:
retry.json first, then the failures file is rewritten without those keys (atomic rename). Run
again after a crash at any point, it finds the same keys (in the failures file, or carried over
from retry.json) and writes the same files: it is idempotent.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from rollouts.chunks import ChunkFiles, task_indices
from rollouts.fileio import atomic_writer, iter_jsonl, iter_lines, repair_torn_tail
from rollouts.models import ChunkSpec, RolloutKey
from rollouts.nemo_gym import NG_FAILURE_CLASS, key_of


@dataclass(frozen=True)
class RetryEntry:
    failure_class: str
    attempts: int  # requests spent on this rollout before the retry


@dataclass
class ReopenReport:
    classes: list[str]
    by_class: Counter[str] = field(default_factory=Counter)
    chunks: list[int] = field(default_factory=list)  # chunks with reopened keys

    @property
    def total(self) -> int:
        return sum(self.by_class.values())

    def describe(self) -> str:
        """One log line: what the retry sends again, or that nothing matched."""
        if not self.total:
            return (f"no failed rollouts with {', '.join(self.classes)} to retry; "
                    "merging the output as it is")  # fmt: skip
        counts = ", ".join(f"{c} ({n})" for c, n in self.by_class.most_common())
        return f"retrying {self.total} rollouts that failed with {counts}"


def read_retry(files: ChunkFiles) -> dict[RolloutKey, RetryEntry]:
    """The keys a retry reopened in this chunk (empty: none, or no retry going on)."""
    try:
        doc = orjson.loads(files.retry.read_bytes())
    except FileNotFoundError:
        return {}
    return {(t, r): RetryEntry(c, n) for t, r, c, n in doc["keys"]}


def retry_attempts(files: ChunkFiles) -> dict[RolloutKey, int]:
    """Attempts so far of each reopened key of this chunk: its last failure row written since
    the reopen (a chunk retry within the retry run), else what retry.json recorded."""
    entries = read_retry(files)
    attempts = {k: e.attempts for k, e in entries.items()}
    if entries and files.failures.exists():
        for row in iter_jsonl(files.failures):
            if (key := key_of(row)) in attempts:
                attempts[key] = int(row.get("attempts") or 0)
    return attempts


def _last_failures(
    files: ChunkFiles, valid: Any
) -> tuple[set[RolloutKey], dict[RolloutKey, dict[str, Any]]]:
    """(succeeded keys, key -> its last failure row) of one chunk."""
    for path in files.outputs:
        repair_torn_tail(path)
    succeeded = set()
    if files.rollouts.exists():
        succeeded = {k for r in iter_jsonl(files.rollouts) if valid(k := key_of(r))}
    last: dict[RolloutKey, dict[str, Any]] = {}
    if files.failures.exists():
        for row in iter_jsonl(files.failures):
            if valid(key := key_of(row)) and key not in succeeded:
                last[key] = row
    return succeeded, last


def _reopen_chunk(
    spec: ChunkSpec, num_repeats: int, classes: set[str]
) -> dict[RolloutKey, RetryEntry]:
    files = ChunkFiles.of(spec)
    tasks = task_indices(spec)
    succeeded, last = _last_failures(files, lambda k: k[0] in tasks and 0 <= k[1] < num_repeats)
    # Carried over from an earlier retry that did not finish: keys taken out of the failures
    # file and neither written nor failed since. Whatever their class, they are owed a try.
    keys = {k: e for k, e in read_retry(files).items() if k not in succeeded and k not in last}
    for k, row in last.items():
        cls = str(row.get(NG_FAILURE_CLASS))
        if cls in classes:
            keys[k] = RetryEntry(cls, int(row.get("attempts") or 0))
    if not keys:
        files.retry.unlink(missing_ok=True)
        return keys
    with atomic_writer(files.retry) as f:
        f.write(orjson.dumps({
            "classes": sorted(classes),
            "keys": [[t, r, e.failure_class, e.attempts] for (t, r), e in sorted(keys.items())],
        }) + b"\n")  # fmt: skip
    if any(k in keys for k in last):
        _bump_reopened(files.reopened)  # first: a crash before the rewrite only bumps twice
        _drop_rows(files.failures, set(keys))
    return keys


def _drop_rows(path: Path, keys: set[RolloutKey]) -> None:
    """Rewrite ``path`` without the rows of ``keys`` (streaming, atomic)."""
    with atomic_writer(path) as out:
        for _, line in iter_lines(path):
            if key_of(orjson.loads(line)) not in keys:
                out.write(line + b"\n")


def _bump_reopened(path: Path) -> None:
    count = reopen_count(path) + 1
    with atomic_writer(path) as f:
        f.write(f"{count}\n".encode())


def reopen_count(path: Path) -> int:
    """How many retries reopened keys of a chunk (0: never): see ChunkFiles.reopened."""
    try:
        return int(path.read_text().strip() or 0)
    except FileNotFoundError:
        return 0


def reopen_failures(
    run_dir: Path, chunks: list[ChunkSpec], num_repeats: int, classes: list[str]
) -> ReopenReport:
    """Reopen, in every chunk, the rollouts not written whose last failure has one of
    ``classes``, terminal or not. Call under the run's lock, after split, before collecting."""
    report = ReopenReport(classes=list(classes))
    wanted = set(classes)
    for spec in chunks:
        keys = _reopen_chunk(spec, num_repeats, wanted)
        if keys:
            report.chunks.append(spec.index)
            report.by_class.update(e.failure_class for e in keys.values())
    return report


def clear_retry(run_dir: Path, chunks: list[ChunkSpec]) -> None:
    """After the retry's collection: the reopened keys are written, or failed again (with a
    failure row), or missing like any other; none needs its retry.json any more."""
    for spec in chunks:
        ChunkFiles.of(spec).retry.unlink(missing_ok=True)
