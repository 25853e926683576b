"""File primitives every stage shares: JSONL reading, durable appends, atomic replacement."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from rollouts.errors import RolloutsError

# Errors of a write itself (as opposed to reading a source inside an atomic_writer block).
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


class UnwritablePathError(RolloutsError):
    """A file or directory we must write cannot be (not a directory, read-only, disk full)."""


def _unwritable(paths: list[Path], e: OSError) -> UnwritablePathError:
    names = ", ".join(str(p) for p in paths)
    where = f" ({e.filename})" if e.filename and str(e.filename) not in names else ""
    return UnwritablePathError(f"cannot write {names}: {e.strerror or e}{where}")


def ensure_writable_dir(path: Path, what: str) -> None:
    """Create ``path`` if needed and prove a file can be created in it, before any work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        if isinstance(e, FileExistsError):
            reason = "a file is in the way"
        else:
            where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
            reason = f"{e.strerror or e}{where}"
        raise UnwritablePathError(
            f"cannot write {what}: {path} is not a writable directory ({reason})"
        ) from e


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
    An OSError of the writing itself (no such directory, the target is a directory, disk full)
    becomes an UnwritablePathError naming ``path``; other errors of the block pass unchanged.
    """
    with atomic_writers([path], mode) as (f,):
        yield f


@contextlib.contextmanager
def atomic_writers(paths: list[Path], mode: str = "wb") -> Iterator[list[IO[Any]]]:
    """``atomic_writer`` for files that belong together (rollouts and failures): every one is
    written and fsynced before the first is renamed, so a failed write (a full disk) leaves
    all the old files, never a new one beside an old one."""
    paths = [Path(p) for p in paths]
    staged: list[tuple[Path, Path, IO[Any]]] = []  # (path, temp, file)
    blame: list[Path] = []  # what an OSError is about
    in_block = False
    try:
        for path in paths:
            blame = [path]
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            f = os.fdopen(fd, mode)
            staged.append((path, Path(tmp_name), f))
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide outputs from other readers
        blame, in_block = paths, True
        yield [f for _, _, f in staged]
        in_block = False
        for path, _, f in staged:
            blame = [path]
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for path, tmp, _ in staged:
            blame = [path]
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except BaseException as e:
        for _, tmp, f in staged:
            with contextlib.suppress(OSError):
                f.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if isinstance(e, OSError) and (not in_block or e.errno in _WRITE_ERRNOS):
            raise _unwritable(blame, e) from e
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_writer(path) as f:
        f.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")


def replace_file_quietly(path: Path, data: bytes) -> None:
    """Replace ``path`` whole with ``data`` (temp file and rename; no fsync), for figures shown
    live (replica counts, health): a failed write is skipped, never worth stopping a
    collection for, and a reader never sees a half-written file."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
