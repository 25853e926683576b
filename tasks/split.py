"""Split stage as a Prefect task. Cached on the input file's identity and the run state."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from rollouts.models import SplitResult
from rollouts.split import split_input
from rollouts.storage import is_url, object_identity
from tasks.cache_policies import cached_stage


def file_identity(path: str | Path) -> tuple[str, int, int, int] | tuple[str, int, str] | None:
    """(path, size, mtime_ns, inode), or None when absent: a change means re-read the file.
    An object in storage: (url, size, its ETag or last modification), or None when it cannot
    be read."""
    if is_url(path):
        return object_identity(str(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def _split_identity(inputs: dict[str, Any]) -> Any:
    ident = file_identity(inputs["input_path"])
    if ident is None:
        return None  # let the task run and report the missing file
    return {
        "input": ident,
        "run_id": inputs["run_id"],
        "chunk_size": inputs["chunk_size"],
        "limit": inputs["limit"],
        "require_agent_ref": inputs["require_agent_ref"],
        # ChunkSpec's fields: a SplitResult cached before task ranges and rows per agent were
        # recorded would lack them (and its run dir the chunks' meta files).
        "spec": 2,
    }


# No retries: bad input does not get better by retrying.
@cached_stage("split", _split_identity, retries=0)
async def split_task(
    input_path: str,
    run_dir: str,
    run_id: str,
    chunk_size: int,
    limit: int | None,
    require_agent_ref: bool,
) -> SplitResult:
    return await asyncio.to_thread(
        split_input,
        input_path,  # a local path or a URL: split_input tells them apart
        Path(run_dir),
        run_id=run_id,
        chunk_size=chunk_size,
        limit=limit,
        require_agent_ref=require_agent_ref,
    )
