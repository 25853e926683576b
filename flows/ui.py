"""What the Prefect UI shows of our flows: run names, form titles, artifact keys, run context."""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel, Field

from rollouts.storage import is_url, name_of, parent_of, stem_of


def title(text: str) -> Any:
    """A parameter's title in the deployment form, for ``Annotated[T, title("...")]``.

    Prefect always titles a parameter with its name and ignores a ``Field(title=...)``; it does
    merge ``json_schema_extra`` into the schema, which overrides the title.
    """
    return Field(json_schema_extra={"title": text})


def form_field(model: type[BaseModel], name: str) -> Any:
    """``Annotated[T, form_field(Model, "name")]``: a flow parameter's title and description in
    the deployment form, taken from the model field that declares it (one declaration).

    Prefect merges its own dict into ``json_schema_extra`` (a callable would be dropped), so an
    optional parameter keeps its null option and default here; `make deploy` reshapes the
    deployed form (rollouts_cli/prefect_setup.py, ``rollouts.models.form_schema``)."""
    info = model.model_fields[name]
    return Field(json_schema_extra={"title": info.title or name, "description": info.description})


def rounded(value: Any) -> Any:
    """Floats to 4 decimals for artifact tables: 0.7777777777777778 reads as 0.7778."""
    return round(value, 4) if isinstance(value, float) else value


@cache
def _generated_name_words() -> tuple[frozenset[str], frozenset[str]]:
    import coolname
    from coolname.loader import load_config

    # coolname offers no list of its words: its bundled data and config layout ("an": the
    # adjective and subject lists of a 2-word name) are read (tests/test_library_internals.py).
    # Typed by coolname as a union of every entry's shape; the two read here are known.
    config = cast("dict[str, dict[str, Any]]", load_config(Path(coolname.__file__).parent / "data"))

    def words(key: str) -> frozenset[str]:
        entry = config[key]
        if entry["type"] == "words":
            return frozenset(entry["words"])
        if entry["type"] == "nested":
            return frozenset().union(*(words(k) for k in entry["lists"]))
        return frozenset()

    adjectives, subjects = config["an"]["lists"]
    return words(adjectives), words(subjects)


def is_generated_run_name(name: str | None) -> bool:
    """Whether ``name`` is one the Prefect server made up (``frisky-grouse``), not a user's.

    A run created without a name (a direct call, a deployment run with no `--flow-run-name`)
    gets ``coolname.generate_slug(2)``: an adjective and an animal. Any other name was given.
    """
    if not name:
        return True
    first, _, second = name.partition("-")
    adjectives, subjects = _generated_name_words()
    return first in adjectives and second in subjects


def run_name(wanted: str) -> str:
    """``wanted``, with a name the run was given (a UI form, `--flow-run-name`) kept beside it:
    `out/train (nightly)`. Only a name the Prefect server made up is dropped. A form fills in a
    made-up name of its own (`mu5-asano-n`), which cannot be told from a typed one: kept, it
    also tells one form-started run from another. A run renamed before (a resumed run) keeps
    its name."""
    from prefect.runtime import flow_run

    current = flow_run.name
    if is_generated_run_name(current):
        return wanted
    current = str(current)
    if current == wanted or current.startswith(f"{wanted} ("):
        return current
    return f"{wanted} ({current})"


def output_label(output: str | Path) -> str:
    """An output as the runs list names it: its folder and file stem, `deployed/train_hard`:
    two outputs of the same file name in different folders differ, and nothing is doubled."""
    if isinstance(output, str) and is_url(output):  # s3://b/runs/train.jsonl: runs/train
        return f"{name_of(parent_of(output))}/{stem_of(output)}"
    path = Path(output).resolve()
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


def collect_run_name(output: str | Path, retry_failure_classes: list[str] | None = None) -> str:
    """`out/train`; a retry by failure class: `out/train: retry timeout, http_500`."""
    label = output_label(output)
    if retry_failure_classes:
        return f"{label}: retry {', '.join(retry_failure_classes)}"
    return label


def artifact_key(output: str | Path, kind: str) -> str:
    """``<stem>-<kind>-<hash of the resolved path>``: the UI titles an artifact with its key,
    so it reads as words first; the hash keeps two outputs of the same file name in different
    folders from sharing one history. Prefect keys allow lowercase letters, digits and dashes.
    """
    where = output if isinstance(output, str) and is_url(output) else str(Path(output).resolve())
    stem = re.sub(r"[^a-z0-9-]+", "-", stem_of(where).lower()).strip("-") or "rollouts"
    digest = hashlib.sha256(where.encode()).hexdigest()[:6]
    return f"{stem}-{kind}-{digest}"


@contextlib.contextmanager
def own_run_context() -> Iterator[None]:
    """Make the running flow's artifacts and `get_run_logger()` logs its own.

    A subflow called from inside a task (collect-multi-dataset runs each dataset's subflow in
    its own task, for concurrency) still sees that task's TaskRunContext, and Prefect's
    artifacts and run logger prefer a task run over the flow run: they would land on the
    calling task in the parent run. Hiding it for the flow's body fixes that; the subflow was
    already created as that task's child, so the UI still nests it there.
    """
    from prefect.context import TaskRunContext

    # Prefect has no public way to leave a context: its ContextVar is set directly
    # (tests/test_library_internals.py fails if Prefect moves it).
    token = TaskRunContext.__var__.set(None)  # type: ignore[arg-type]
    try:
        yield
    finally:
        TaskRunContext.__var__.reset(token)
