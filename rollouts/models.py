"""The data model: run parameters, chunks and their results.

Run parameters are plain pydantic models (never settings), so a deployment's parameter schema
holds no secret and the Prefect UI can render and validate them.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Self

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rollouts.stopping import parse_duration
from rollouts.storage import is_url, password_in
from rollouts.urls import has_credentials, redact

if TYPE_CHECKING:
    from rollouts.mix import MixRequest

# Keys of OpenAI's Responses API `create` params. Real agents validate with extra="forbid",
# so an unknown override would make every request fail with 422: refuse it up front.
RESPONSES_CREATE_PARAMS_KEYS = frozenset(
    {
        "background", "conversation", "include", "input", "instructions", "max_output_tokens",
        "max_tool_calls", "metadata", "model", "parallel_tool_calls", "previous_response_id",
        "prompt", "prompt_cache_key", "reasoning", "safety_identifier", "service_tier", "store",
        "stream", "stream_options", "temperature", "text", "tool_choice", "tools",
        "top_logprobs", "top_p", "truncation", "user",
    }
)  # fmt: skip


def count_or_auto(v: Any) -> int | str:
    """A count of at least 1, or "auto" (from a flag, a `+key` or a form)."""
    if v == "auto":
        return "auto"
    try:
        n = int(v)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or isinstance(v, bool | float):
        raise ValueError(f'must be a whole number of at least 1 or "auto", got {v!r}')
    return n


CountOrAuto = Annotated[int | Literal["auto"], BeforeValidator(count_or_auto)]
"""A count (at least 1), or "auto": found at run time."""


def _parse_max_duration(v: Any) -> str | None:
    if v is None or v == "":
        return None
    if isinstance(v, bool):
        raise ValueError(f"max_duration must be a duration like 2h, 90m, 45s, got {v!r}")
    parse_duration(v)  # refuses what it cannot read
    return str(v)


MaxDuration = Annotated[str | None, BeforeValidator(_parse_max_duration)]
"""A run's time budget: 2h, 90m, 45s, 1h30m, or seconds; None: no deadline."""


def _no_credentials(v: Any) -> Any:
    # A parameter is stored (Prefect's flow run, run.json): a password there would be kept
    # in plain text. Credentials live in the settings, which nothing stores.
    if isinstance(v, str) and has_credentials(v):
        raise ValueError(
            f"{redact(v)} carries credentials, and a parameter is stored in plain text (the "
            'flow run, the run state). Put the URL in ROLLOUTS_AGENTS=\'{"NAME": "URL"}\' and '
            "pass agent_name=NAME instead"
        )
    return v


AgentUrl = Annotated[str | None, BeforeValidator(_no_credentials)]
"""An agent base URL given as a parameter: never with credentials in it."""


def form_schema(schema: dict[str, Any]) -> None:
    """A field's JSON schema as Prefect's parameter form shows it well (``json_schema_extra``).

    The form offers each option of an ``anyOf`` as a toggle labelled with its title (else its
    type: "integer", "null", a class name) and prints `Property is type "None"` under a null
    option. So an optional value is its own type here: left empty, the form sends nothing and
    the default (None) applies; the form itself marks the field "(Optional)". Choices that
    stay (a number or "auto", a model or none) get titles that read as words.
    """
    options = schema.get("anyOf")
    if options:
        kept = [o for o in options if o.get("type") != "null"]
        if len(kept) == 1 and "$ref" not in kept[0]:
            del schema["anyOf"]
            schema.update(kept[0])
        else:
            for o in options:
                o.setdefault("title", _OPTION_TITLES.get(str(o.get("const", o.get("type"))),
                                                         str(o.get("const", "Value"))))  # fmt: skip
    if "default" in schema and schema["default"] is None:
        del schema["default"]


_OPTION_TITLES = {"integer": "Number", "number": "Number", "string": "Text", "null": "None"}


def form_schema_of_properties(schema: dict[str, Any]) -> None:
    """``form_schema`` for every field of a model (its ``json_schema_extra``)."""
    for prop in schema.get("properties", {}).values():
        form_schema(prop)


RolloutKey = tuple[int, int]
"""(_ng_task_index, _ng_rollout_index): the identity of one rollout."""


_PASSWORD_IN_PATH = (
    "{field} holds a password in its URL, which would be stored in plain text (flow "
    "parameters, the run state): give the storage's credentials in ROLLOUTS_STORAGE_OPTIONS or "
    "the storage library's own settings"
)


class CollectionParameters(BaseModel):
    """What one collection is asked to do, but where its files are: the one declaration of
    these parameters (field, default, title, description, checks). `CollectConfig` (the
    collect-rollouts flow, the CLI's flags and `+key`s) and `DatasetConfig` (a dataset of a
    multi-dataset run) both extend it, each naming its own input and output fields.

    The flow's signature mirrors `CollectConfig` (tests/test_parameters.py holds them together);
    the CLI's flags and docs/parameters.md are generated from the fields.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra=form_schema_of_properties)

    # The fields naming the input and output files, in the model that declares them: the check
    # that they differ is shared, their names are not (a dataset's are `input` and `output`).
    files: ClassVar[tuple[str, str]]

    agent_name: str | None = Field(
        default=None, title="Agent name",
        description="Agent to resolve through ROLLOUTS_AGENTS or the head "
        "server; empty: each row's agent_ref names its agent.",
    )  # fmt: skip
    agent_url: AgentUrl = Field(
        default=None, title="Agent URL",
        description="Agent base URL, used as is (no name resolution).",
    )  # fmt: skip
    # The form checks the bounds too (json_schema_extra); the validators below say it in words.
    limit: int | None = Field(
        default=None, title="Row limit",
        description="Collect only the first N input rows; empty: all rows.",
        json_schema_extra={"exclusiveMinimum": 0},
    )  # fmt: skip
    num_repeats: int = Field(
        default=1, title="Rollouts per task", description="Rollouts per task.",
        json_schema_extra={"minimum": 1},
    )  # fmt: skip
    num_samples_in_parallel: CountOrAuto = Field(
        default=64, title="Requests in flight",
        description='Requests in flight at once, for the whole run; "auto": as many as the '
        "agent serves without queueing them, found and followed while the run goes (at most "
        "max_in_flight).",
    )  # fmt: skip
    max_in_flight: int = Field(
        default=1024, title="Most requests in flight (auto)",
        description='The ceiling of num_samples_in_parallel="auto", for the whole run.',
        json_schema_extra={"minimum": 1},
    )  # fmt: skip
    responses_create_params: dict[str, Any] = Field(
        default_factory=dict, title="Sampling overrides (Responses API)",
        description="Shallow overrides of each request's Responses API "
        'create parameters, e.g. {"temperature": 0.2}.',
    )  # fmt: skip
    num_repeats_add_seed: bool = Field(
        default=False, title="Seed each repeat",
        description='Put {"seed": rollout_index} into metadata.extra_body of each request, so '
        "repeats differ reproducibly.",
    )  # fmt: skip
    chunk_size: int = Field(
        default=10_000, title="Tasks per chunk",
        description="Tasks per chunk; a chunk is one cached, resumable task run.",
        json_schema_extra={"minimum": 1},
    )  # fmt: skip
    max_parallel_chunks: int = Field(
        default=4, title="Chunks at once", description="Chunks dispatching requests at once.",
        json_schema_extra={"minimum": 1},
    )  # fmt: skip
    processes: CountOrAuto = Field(
        default=1, title="Processes",
        description='Local processes collecting chunks (a local Dask cluster; the [dask] '
        'extra), each with its own HTTP client and a share of the requests in flight; "auto": '
        "one per core.",
    )  # fmt: skip
    slurm_jobs: int | None = Field(
        default=None, title="Slurm worker jobs",
        description="Collect chunks on Dask workers that are Slurm jobs (the [slurm] extra), "
        "scaled between 1 and this many jobs as chunks wait; job shape from ROLLOUTS_SLURM_* "
        "settings (docs/slurm.md).",
        json_schema_extra={"minimum": 1},
    )  # fmt: skip
    max_duration: MaxDuration = Field(
        default=None, title="Max duration",
        description="End the run on time: 2h, 90m, 45s or seconds from its "
        "start. No rollout starts too close to the deadline, those in flight at it are "
        "cancelled, what finished is merged; the run ends StoppedAtDeadline and a rerun "
        "continues.",
    )  # fmt: skip

    @field_validator("limit")
    @classmethod
    def _limit_positive(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"limit must be a positive number of rows, got {v}")
        return v

    @field_validator(
        "num_repeats", "max_in_flight", "chunk_size", "max_parallel_chunks", "slurm_jobs"
    )
    @classmethod
    def _at_least_one(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"{info.field_name} must be at least 1, got {v}")
        return v

    @field_validator("responses_create_params")
    @classmethod
    def _known_override_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - RESPONSES_CREATE_PARAMS_KEYS)
        if unknown:
            raise ValueError(
                f"responses_create_params.{unknown[0]} is not a Responses API create parameter "
                f"(agents would answer 422); known: {', '.join(sorted(RESPONSES_CREATE_PARAMS_KEYS))}"
            )
        return v

    @model_validator(mode="after")
    def _paths_differ(self) -> Self:
        input_field, output_field = self.files
        for name in self.files:
            if password_in(getattr(self, name)):
                raise ValueError(_PASSWORD_IN_PATH.format(field=name))
        paths = [as_given_or_absolute(getattr(self, name)) for name in self.files]
        if paths[0] == paths[1]:
            raise ValueError(f"{output_field} must differ from {input_field}")
        return self


class _CollectFiles(BaseModel):
    """`CollectConfig`'s files, in a base of their own so that they come first (pydantic
    orders fields base class first): in the flow's form, run.json and docs/parameters.md."""

    input_jsonl_fpath: str = Field(
        title="Input tasks (JSONL)", description="Input tasks, one JSON object per line."
    )
    output_jsonl_fpath: str = Field(
        title="Output rollouts (JSONL)",
        description="Rollouts JSONL to write (sorted, written atomically; a path, or a URL "
        "such as s3://bucket/runs/rollouts.jsonl); the failures and metrics files are written "
        "next to it.",
    )


class CollectConfig(CollectionParameters, _CollectFiles):
    """One collection: a dataset, an agent, sampling settings. Names follow NeMo Gym's `+key`s."""

    # (The docstring is the form's description of the model.) The collect-rollouts flow's
    # parameters: its files, `CollectionParameters`, and the one-offs of a single run, never
    # a dataset's standing config.
    model_config = ConfigDict(title="Collection")
    files: ClassVar[tuple[str, str]] = ("input_jsonl_fpath", "output_jsonl_fpath")

    fresh: bool = Field(
        default=False, title="Start fresh",
        description="Discard the previous run state of this output and start over.",
    )  # fmt: skip
    retry_failure_classes: list[str] = Field(
        default_factory=list, title="Retry failure classes",
        description="Retry by failure class: send again only the "
        "rollouts of the failures file whose last failure has one of these classes (e.g. "
        "timeout, http_500), whether final or given up, and merge; what succeeds moves to the "
        "rollouts file. Give the run's own parameters (`rollouts retry` reads them).",
    )  # fmt: skip

    @field_validator("retry_failure_classes")
    @classmethod
    def _classes_named(cls, v: list[str]) -> list[str]:
        if any(not c.strip() for c in v):
            raise ValueError("retry_failure_classes: a failure class cannot be empty")
        return list(dict.fromkeys(v))  # each once, in the order given

    def stored_params(self) -> dict[str, Any]:
        """The parameters a later `rollouts retry` reruns with (run.json): all but the
        one-offs, with absolute paths so that it may run from any directory."""
        params = self.model_dump(mode="json", exclude={"fresh", "retry_failure_classes"})
        for k in ("input_jsonl_fpath", "output_jsonl_fpath"):
            params[k] = as_given_or_absolute(params[k])
        return params

    def process_count(self) -> int:
        """Processes to collect in: "auto" is this machine's cores; never more processes than
        requests in flight (each needs at least one)."""
        wanted = usable_cores() if self.processes == "auto" else int(self.processes)
        return max(1, min(wanted, self.in_flight_ceiling))

    @property
    def adaptive(self) -> bool:
        """Requests in flight found at run time (num_samples_in_parallel="auto")."""
        return self.num_samples_in_parallel == "auto"

    @property
    def in_flight_ceiling(self) -> int:
        """The run's requests in flight: the fixed number, or the most "auto" may reach."""
        return self.max_in_flight if self.adaptive else int(self.num_samples_in_parallel)

    def max_duration_s(self) -> float | None:
        return parse_duration(self.max_duration) if self.max_duration is not None else None

    @property
    def agent_identity(self) -> str | None:
        return self.agent_name or self.agent_url

    def result_fingerprint(self) -> str:
        """Hash of the parameters that change what a rollout is (never paths or concurrency)."""
        return fingerprint(self.result_params())

    def result_params(self) -> dict[str, Any]:
        return {
            "agent": self.agent_identity,
            "num_repeats": self.num_repeats,
            "responses_create_params": self.responses_create_params,
            "num_repeats_add_seed": self.num_repeats_add_seed,
        }


def as_given_or_absolute(path: str) -> str:
    """A URL of object storage as given; a local path made absolute."""
    return path if is_url(path) else str(Path(path).resolve())


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a Slurm allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


class RecordedChunk(BaseModel):
    """A chunk as ``run.json`` lists it: its ``ChunkSpec`` without the paths and the run id,
    which follow from where the run state is."""

    index: int
    n_tasks: int
    content_sha256: str
    task_min: int
    task_max: int
    contiguous: bool  # every index in task_min..task_max, each once
    rows_per_agent: dict[str, int] = Field(default_factory=dict)  # by the row's agent_ref name

    @classmethod
    def of(cls, spec: ChunkSpec) -> RecordedChunk:
        return cls(**spec.model_dump(include=set(cls.model_fields)))

    def spec(self, tasks_path: str, run_id: str) -> ChunkSpec:
        return ChunkSpec(**self.model_dump(), tasks_path=tasks_path, run_id=run_id)


class ChunkSpec(RecordedChunk):
    """One chunk of tasks, as split wrote it. The cache key is built from `cache_identity`.

    Split also records what later stages would otherwise re-read the tasks file for: the
    task-index range, whether it is contiguous (else split records the indices in a file beside it,
    see rollouts.chunks), and the rows per ``agent_ref`` name (rows without one are the rest).
    All of it follows from the content, so the cache identity stays content + run + size.
    """

    tasks_path: str
    run_id: str

    def cache_identity(self) -> dict[str, Any]:
        # Content, not paths: the same tasks under the same run state are the same work.
        return {"content": self.content_sha256, "run_id": self.run_id, "n": self.n_tasks}

    def expected(self, num_repeats: int) -> int:
        """Rollouts this chunk should end with."""
        return self.n_tasks * num_repeats

    def expected_by_agent(
        self, num_repeats: int, agent_of: Callable[[str | None], str]
    ) -> Counter[str]:
        """Rollouts expected per agent; ``agent_of`` maps a row's agent_ref name (None: the
        row has none) to the agent that answers it."""
        by_agent: Counter[str] = Counter()
        for name, rows in self.rows_per_agent.items():
            by_agent[agent_of(name)] += rows * num_repeats
        rest = self.n_tasks - sum(self.rows_per_agent.values())
        if rest:
            by_agent[agent_of(None)] += rest * num_repeats
        return by_agent


class SplitResult(BaseModel):
    run_dir: str
    run_id: str
    n_tasks: int
    chunks: list[ChunkSpec]
    agent_names: list[str]


class ChunkResult(BaseModel):
    """What one chunk's collection produced. Holds counts and paths, never rollout bodies."""

    index: int
    n_tasks: int
    expected: int
    succeeded: int
    failed: int  # terminal failures (in the failures file)
    missing: int  # neither written nor terminally failed (retried on the next run)
    rollouts_path: str
    failures_path: str
    worker: str
    attempts: int = 0  # /run requests sent by this chunk's run
    stopped: str | None = None  # why dispatching stopped early (rollouts/stopping.py), if it did
    in_flight_limit: int | None = None  # num_samples_in_parallel="auto": the limit at its end

    @property
    def complete(self) -> bool:
        return self.missing == 0


class _DatasetFiles(BaseModel):
    """A dataset's name and files, first in its form (see `_CollectFiles`)."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]+$",
        title="Name",
        description="Names the dataset's subflow run and its share in the mix's proportions.",
    )
    input: str = Field(title="Input tasks (JSONL)", description="Input tasks, JSONL.")
    output: str = Field(
        title="Output rollouts (JSONL)", description="This dataset's rollouts JSONL."
    )


class DatasetConfig(CollectionParameters, _DatasetFiles):
    """One dataset of a multi-dataset run, with its own sampling settings."""

    # Every parameter of a collection (`CollectionParameters`) but the one-offs `fresh` and
    # `retry_failure_classes`.
    model_config = ConfigDict(title="Dataset")
    files: ClassVar[tuple[str, str]] = ("input", "output")

    def collect_parameters(self) -> dict[str, Any]:
        """The collect-rollouts flow's parameters for this dataset: its `CollectionParameters`
        and its files under the flow's names."""
        renamed = dict(zip(self.files, CollectConfig.files, strict=True))
        return {
            renamed.get(name, name): value
            for name, value in self.model_dump().items()
            if name != "name"
        }

    def run_label(self) -> str:
        """e.g. `hard-T0.4-x3`: what the UI shows for this dataset's subflow."""
        t = self.responses_create_params.get("temperature")
        return f"{self.name}" + (f"-T{t}" if t is not None else "") + f"-x{self.num_repeats}"


class MixConfig(BaseModel):
    """How the datasets' rollouts are mixed into one training set."""

    model_config = ConfigDict(
        extra="forbid", title="Mix", json_schema_extra=form_schema_of_properties
    )

    output: str = Field(
        title="Mix output (JSONL)",
        description="The mixed rollouts JSONL; its manifest is written next to it.",
    )
    total: int = Field(gt=0, title="Total rollouts", description="Rollouts in the mix.")
    seed: int = Field(
        default=0, title="Seed", description="Random seed: the same seed gives the same mix."
    )
    proportions: dict[str, float] = Field(
        title="Proportions",
        description='Target share per dataset name, e.g. {"hard": 0.1}; normalized to 1.',
    )
    keep_groups: bool | None = Field(
        default=None,
        title="Keep repeat groups",
        description="Select all rollouts of a task together; "
        "default: true when any dataset has num_repeats > 1.",
    )
    shortfall: Literal["error", "redistribute", "allow_short"] = Field(
        default="error",
        title="When a dataset is short",
        description="error: fail; redistribute: fill from the other datasets; "
        "allow_short: write a smaller mix.",
    )

    @field_validator("output")
    @classmethod
    def _no_password(cls, v: str) -> str:
        if password_in(v):
            raise ValueError(_PASSWORD_IN_PATH.format(field="output"))
        return v

    @field_validator("proportions")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, p in v.items() if p <= 0]
        if bad:
            raise ValueError(f"proportions must be positive; {bad[0]} is {v[bad[0]]}")
        return v


def _mix_or_none(schema: dict[str, Any]) -> None:
    """The form's toggle between a mix and none, in words (not `MixConfig` and `null`)."""
    for option in schema.get("anyOf", []):
        option["title"] = "No mix" if option.get("type") == "null" else "Mix"


class MultiDatasetConfig(BaseModel):
    """Several datasets collected concurrently, then mixed by target proportions."""

    model_config = ConfigDict(
        extra="forbid", title="Datasets and mix", json_schema_extra=form_schema_of_properties
    )

    datasets: list[DatasetConfig] = Field(
        min_length=1,
        title="Datasets",
        description="Datasets to collect concurrently, each in its own subflow run.",
    )
    mix: MixConfig | None = Field(
        default=None,
        title="Mix",
        json_schema_extra=_mix_or_none,
        description="How to mix the datasets' rollouts into one training set, or no mix.",
    )

    def mix_request(self) -> MixRequest:
        """The mix over the datasets' outputs. keep_groups defaults to true when any dataset
        has repeats (GRPO needs every sample of a prompt)."""
        from rollouts.mix import MixRequest, MixSource

        assert self.mix is not None
        outputs = {d.name: d.output for d in self.datasets}
        keep_groups = self.mix.keep_groups
        if keep_groups is None:
            keep_groups = any(d.num_repeats > 1 for d in self.datasets)
        return MixRequest(
            sources=[MixSource(name=n, path=outputs[n], proportion=p)
                     for n, p in self.mix.proportions.items()],
            output=self.mix.output, total=self.mix.total, seed=self.mix.seed,
            keep_groups=keep_groups, shortfall=self.mix.shortfall,
        )  # fmt: skip

    @model_validator(mode="after")
    def _consistent(self) -> MultiDatasetConfig:
        names = [d.name for d in self.datasets]
        for label, values in (("name", names), ("output", [d.output for d in self.datasets])):
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"datasets must have distinct {label}s; repeated: {dupes[0]}")
        if self.mix is not None:
            unknown = sorted(set(self.mix.proportions) - set(names))
            if unknown:
                raise ValueError(
                    f"mix.proportions names {unknown[0]!r}, which is not a dataset "
                    f"(datasets: {', '.join(names)})"
                )
        return self
