"""One chunk's files in the run state, and what split recorded about its tasks.

Layout, under ``<run dir>/chunks/``, for chunk number NNNNN:

- ``NNNNN.tasks.jsonl``: its task rows (split)
- ``NNNNN.task_indices.json``: only when those rows' task indices are not one contiguous
  range: the indices (split), so that merge need not read the tasks file
- ``NNNNN.rollouts.jsonl`` and ``NNNNN.failures.jsonl``: results, appended (collect)
- ``NNNNN.status.json``: which worker took the chunk, and when (collect)
- ``NNNNN.retry.json``: while a retry by failure class runs, the keys it reopened and their
  attempts so far (rollouts/retry.py)
- ``NNNNN.reopened``: how many retries reopened keys of this chunk: part of its cache key, so a
  chunk completed before a retry is collected again afterwards, not answered from the cache

The run's ``run.json`` lists the chunks of its last split (see run_state.record_chunks), so
that status needs no tasks file either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from rollouts.fileio import atomic_writer
from rollouts.models import ChunkSpec

CHUNKS_DIR = "chunks"
_TASKS = ".tasks.jsonl"


@dataclass(frozen=True)
class ChunkFiles:
    index: int
    tasks: Path
    task_indices: Path
    rollouts: Path
    failures: Path
    status: Path
    retry: Path
    reopened: Path
    writer_lock: Path

    @classmethod
    def at(cls, chunks_dir: Path, index: int) -> ChunkFiles:
        """The files of chunk ``index`` in ``chunks_dir`` (a run dir's ``chunks/``)."""
        stem = chunks_dir / f"{index:05d}"
        return cls(
            index=index,
            tasks=stem.with_name(stem.name + _TASKS),
            task_indices=stem.with_name(stem.name + ".task_indices.json"),
            rollouts=stem.with_name(stem.name + ".rollouts.jsonl"),
            failures=stem.with_name(stem.name + ".failures.jsonl"),
            status=stem.with_name(stem.name + ".status.json"),
            retry=stem.with_name(stem.name + ".retry.json"),
            reopened=stem.with_name(stem.name + ".reopened"),
            writer_lock=stem.with_name(stem.name + ".lock"),
        )

    @classmethod
    def of_run(cls, run_dir: Path, index: int) -> ChunkFiles:
        return cls.at(Path(run_dir) / CHUNKS_DIR, index)

    @classmethod
    def of(cls, spec: ChunkSpec) -> ChunkFiles:
        return cls.at(Path(spec.tasks_path).parent, spec.index)

    @property
    def outputs(self) -> tuple[Path, Path]:
        """(rollouts, failures): what merge reads."""
        return self.rollouts, self.failures


def _write_json(path: Path, doc: Any) -> None:
    with atomic_writer(path) as f:
        f.write(orjson.dumps(doc) + b"\n")


def _read_json(path: Path) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None


# -------------------------------------------------- task indices of a non-contiguous chunk


def write_task_indices(spec: ChunkSpec, indices: list[int]) -> None:
    """Record a non-contiguous chunk's task indices (split); rewritten only when stale."""
    doc = {"content_sha256": spec.content_sha256, "task_indices": sorted(indices)}
    path = ChunkFiles.of(spec).task_indices
    if _read_json(path) != doc:
        _write_json(path, doc)


def task_indices(spec: ChunkSpec) -> range | frozenset[int]:
    """The task indices of a chunk without its tasks file: its range, or split's record."""
    if spec.contiguous:
        return range(spec.task_min, spec.task_max + 1)
    path = ChunkFiles.of(spec).task_indices
    doc = _read_json(path)
    if doc is None or doc.get("content_sha256") != spec.content_sha256:
        raise FileNotFoundError(f"{path}: missing or stale; rerun the collection to split again")
    return frozenset(doc["task_indices"])


def tasks_files(run_dir: Path) -> list[ChunkFiles]:
    """The chunks of a run dir by its tasks files (for run dirs split before run.json listed
    them)."""
    found = []
    for p in sorted((Path(run_dir) / CHUNKS_DIR).glob(f"*{_TASKS}")):
        stem = p.name.removesuffix(_TASKS)
        if stem.isdigit():
            found.append(ChunkFiles.at(p.parent, int(stem)))
    return found
