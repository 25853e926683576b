"""File primitives every stage shares: JSONL reading, durable appends, atomic replacement."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson


def dumps_line(obj: Any) -> bytes:
    """One compact JSON line, newline included (NeMo Gym writes compact JSONL)."""
    return orjson.dumps(obj) + b"\n"


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based line number, raw line without newline), streaming. Blank lines are skipped."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.rstrip(b"\r\n")
            if line.strip():
                yield number, line


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Stream the objects of a JSONL file we wrote ourselves (trusted: no per-line diagnostics)."""
    for _, line in iter_lines(path):
        yield orjson.loads(line)


def repair_torn_tail(path: Path) -> int:
    """Cut a last line that a crash left without its newline; return the bytes removed.

    Appends are whole lines, so only the final line can be incomplete.
    """
    if not path.exists():
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Walk back to the last newline in blocks.
        pos = size
        keep = 0
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step)
            idx = block.rfind(b"\n")
            if idx >= 0:
                keep = pos + idx + 1
                break
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write ``path`` as a whole or not at all: temp file in the same directory, fsync, rename.

    A crash (or an exception in the block) leaves the previous file untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide outputs from other readers
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_writer(path) as f:
        f.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")
