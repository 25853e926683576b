"""Process settings: where agents live, how to talk to them, where state goes.

Settings come from the environment (prefix ``ROLLOUTS_``) and ``.env``. They are never flow
parameters: a flow builds them inside its run, so a secret never lands in a deployment's
parameter schema, a flow-run's parameters or a cached result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from rollouts.errors import ConfigError
from rollouts.slurm import JobShape, walltime_s
from rollouts.storage import is_url
from rollouts.urls import AgentCredentials, redact

# Set by the `rollouts` command to the URL of the temporary Prefect API it started for itself
# (rollouts_cli/temporary_api.py): that URL serves this command and its subprocesses only.
TEMPORARY_API_ENV = "ROLLOUTS_TEMPORARY_PREFECT_API_URL"


class RolloutsSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ROLLOUTS_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    agents: dict[str, str | list[str]] = Field(
        default_factory=dict,
        description='Agent name -> base URL, as JSON: {"my_agent": "http://127.0.0.1:8765"}; '
        'or -> several URLs, replicas of one agent: {"my_agent": ["http://a:8000", '
        '"http://b:8000"]} (requests go to the replica with the fewest in flight). A URL may '
        "carry credentials (http://user:password@host:port, a basic-auth proxy): sent as "
        "basic auth unless agent_api_key is set, shown everywhere as http://user:***@host:port.",
        repr=False,  # the URLs as given: their passwords
    )
    agent_limits: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict,
        description="Agent name -> most requests in flight to it across every run and process "
        'that uses it, as JSON: {"my_agent": 256}. Held in Prefect\'s global concurrency limit '
        "`rollouts-agent:<name>` on the Prefect server the runs share (docs/scaling.md).",
    )
    replica_eject_after: int = Field(
        default=3, ge=1,
        description="A replica is taken out after this many connection errors or timeouts in "
        "a row (and probed back in).",
    )  # fmt: skip
    replica_probe_max_s: float = Field(
        default=30.0, gt=0,
        description="Longest wait between two connection probes of a replica taken out "
        "(they start 1 s apart and double).",
    )  # fmt: skip
    head_server_url: str | None = Field(
        default=None,
        description="NeMo Gym head server; agent names not in `agents` resolve through it.",
    )
    agent_api_key: SecretStr | None = Field(
        default=None, description="Sent as `Authorization: Bearer <key>` to agents. Secret."
    )
    request_timeout_s: float = Field(
        default=600.0, gt=0, description="Hard deadline of one /run request, connect to last byte."
    )
    connect_timeout_s: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=5, ge=1, description="Attempts per rollout, first included.")
    backoff_base_s: float = Field(default=0.5, ge=0, description="First retry delay (doubles).")
    backoff_max_s: float = Field(default=30.0, ge=0, description="Cap of one retry delay.")
    work_dir: Path | None = Field(
        default=None,
        description="Root of run state (chunks, partial outputs, lock). "
        "Default: `.rollouts/` beside each output file; for an output in object storage, "
        "this machine's cache ($XDG_CACHE_HOME/rollouts/runs, else ~/.cache/rollouts/runs).",
    )
    storage_options: SecretStr | None = Field(
        default=None,
        description="Options of the object storage that URL inputs (s3://bucket/tasks.jsonl) "
        "are read from and URL outputs written to, as JSON passed to fsspec: "
        '{"key": ..., "secret": ..., "client_kwargs": '
        '{"endpoint_url": "http://minio:9000"}}. Default: the storage library\'s own settings '
        "(for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE). "
        "Secret: never logged nor stored.",
    )
    result_storage: Path | None = Field(
        default=None,
        description="Prefect result storage (the task cache). Default: Prefect's own "
        "(PREFECT_RESULTS_LOCAL_STORAGE_PATH, else $PREFECT_HOME/storage).",
    )
    chunk_retries: int = Field(
        default=2,
        ge=0,
        description="Prefect retries of a chunk that ends with rollouts still missing "
        "(e.g. the agent was down); each retry resumes the chunk.",
    )
    chunk_retry_delay_s: float = Field(default=10.0, ge=0, description="Delay before them.")
    max_auto_resumes: int = Field(
        default=3,
        ge=0,
        description="How many times a crashed deployed run is resumed automatically "
        "(the automation reschedules it; the flow refuses to start past this bound).",
    )
    dask_address: str | None = Field(
        default=None,
        description="Run chunk tasks on this Dask scheduler (tcp://host:8786) via prefect-dask.",
    )
    dask_local_workers: int | None = Field(
        default=None, ge=1,
        description="The older spelling of the `processes` parameter (--processes): used for "
        "runs that leave it at 1.",
    )  # fmt: skip
    stop_grace_s: float = Field(
        default=10.0, ge=0,
        description="On Ctrl-C, SIGTERM or a Prefect cancellation: how long rollouts in "
        "flight may finish before they are cancelled.",
    )  # fmt: skip
    drain_margin_s: float | None = Field(
        default=None, ge=0,
        description="With max_duration: no rollout starts unless more than this is left "
        "before the deadline. Default: the observed p90 latency of the run's rollouts.",
    )  # fmt: skip
    stall_warn_s: float | None = Field(
        default=None, gt=0,
        description="A request in flight longer than this is listed as stalled (rollouts "
        "status, the Prefect UI) and logged once. Default: 10 x the agent's recent p95 "
        "latency, at least 5 s.",
    )  # fmt: skip
    dask_worker_in_flight: int | None = Field(
        default=None,
        ge=1,
        description="Requests in flight per Dask worker process. Default: the run's "
        "num_samples_in_parallel divided over the workers.",
    )

    slurm_partition: str | None = Field(
        default=None, description="--slurm-jobs: the worker jobs' partition (#SBATCH -p)."
    )
    slurm_account: str | None = Field(
        default=None, description="--slurm-jobs: the account charged (#SBATCH -A)."
    )
    slurm_walltime: str = Field(
        default="01:00:00",
        description="--slurm-jobs: each worker job's time limit (#SBATCH -t). Workers retire "
        "10% of it before (30 s to 10 min) and the cluster submits new jobs while chunks wait.",
    )
    slurm_cores: int = Field(
        default=1, ge=1, description="--slurm-jobs: CPUs per worker job (--cpus-per-task)."
    )
    slurm_memory: str = Field(
        default="2GB", description="--slurm-jobs: memory per worker job (#SBATCH --mem)."
    )
    slurm_processes: int = Field(
        default=1, ge=1,
        description="--slurm-jobs: Dask worker processes per job, each with its own HTTP "
        "client and share of the requests in flight.",
    )  # fmt: skip
    slurm_job_extra: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description='--slurm-jobs: extra #SBATCH lines, one per line or a JSON list '
        '(["--qos=high", "--constraint=cpu"]).',
    )
    slurm_python: str | None = Field(
        default=None,
        description="--slurm-jobs: the workers' Python (with this package installed), as "
        "the compute nodes see it. Default: the one running the flow.",
    )
    slurm_start_timeout_s: float = Field(
        default=600.0, gt=0,
        description="--slurm-jobs: how long the run waits for its first worker job to start "
        "before it gives up (nothing sent by then).",
    )  # fmt: skip

    @field_validator("work_dir", mode="before")
    @classmethod
    def _local_work_dir(cls, value: Any) -> Any:
        # Before pydantic makes it a Path (which folds s3:// into s3:/).
        if isinstance(value, str) and is_url(value):
            raise ConfigError(
                f"ROLLOUTS_WORK_DIR in object storage ({value}) is not supported yet: set it "
                "to a local or shared path"
            )
        return value

    @field_validator("slurm_job_extra", mode="before")
    @classmethod
    def _job_extra_lines(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except ValueError:
                    raise ConfigError(
                        f"ROLLOUTS_SLURM_JOB_EXTRA is not a JSON list: {text}"
                    ) from None
            return [line.strip() for line in text.splitlines() if line.strip()]
        return value

    def slurm_job_shape(self) -> JobShape:
        walltime_s(self.slurm_walltime)  # refused here, before any job is submitted
        return JobShape(
            self.slurm_partition, self.slurm_account, self.slurm_walltime, self.slurm_cores,
            self.slurm_memory, self.slurm_processes, self.slurm_job_extra, self.slurm_python,
        )  # fmt: skip

    @field_validator("agents", mode="before")
    @classmethod
    def _check_agents(cls, value: Any) -> Any:
        # Raised as ConfigError, not ValueError: pydantic would bury the agent's name in its
        # own error format; this way the command reports one line naming it.
        if isinstance(value, str):
            return value  # JSON text: pydantic-settings decodes it first
        if not isinstance(value, dict):
            raise ConfigError(
                'ROLLOUTS_AGENTS must be a JSON object: {"name": "http://host:port"} or '
                '{"name": ["http://a:port", "http://b:port"]}'
            )
        for name, urls in value.items():
            _check_agent_urls(name, urls)
        return value

    @field_validator("agent_limits", mode="before")
    @classmethod
    def _check_agent_limits(cls, value: Any) -> Any:
        # Decoded here (NoDecode), not by pydantic-settings: its JSON error is a traceback.
        return check_agent_limits(value)

    def replicas_of(self, name: str) -> list[str]:
        """The base URLs of agent ``name`` (one, or its replicas in order), without a final /,
        redacted: the only form of an agent's URL the rest of the code ever holds."""
        return [redact(u).rstrip("/") for u in _as_list(self.agents[name])]

    def agent_credentials(self) -> AgentCredentials:
        """The passwords of the agent URLs that carry one, for the HTTP client alone."""
        return AgentCredentials(u for urls in self.agents.values() for u in _as_list(urls))


# A Prefect concurrency limit's name may hold none of these (prefect.types.names).
_BANNED_IN_LIMIT_NAMES = frozenset("/%&><")
_LIMITS_EXAMPLE = 'ROLLOUTS_AGENT_LIMITS must be a JSON object of agent name -> a whole number >= 1, e.g. {"my_agent": 256}'


def check_agent_limits(value: Any) -> dict[str, int]:
    """ROLLOUTS_AGENT_LIMITS as given (JSON text, or a dict), checked: ConfigError naming
    what is wrong."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as e:
            raise ConfigError(f"{_LIMITS_EXAMPLE}; it is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{_LIMITS_EXAMPLE}; got {value!r}")
    for name, limit in value.items():
        if not name or _BANNED_IN_LIMIT_NAMES & set(name):
            raise ConfigError(
                f"ROLLOUTS_AGENT_LIMITS: {name!r} cannot name an agent's limit (an agent name, "
                "not empty, without / % & > <)"
            )
        # bool is an int to Python; 1.5 or "8" would be a silent guess
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(
                f"ROLLOUTS_AGENT_LIMITS: agent {name!r}: the limit must be a whole number >= 1, "
                f"got {limit!r}"
            )
    return value


def _as_list(urls: str | list[str]) -> list[str]:
    return [urls] if isinstance(urls, str) else urls


def _check_agent_urls(name: str, urls: Any) -> None:
    where = f"ROLLOUTS_AGENTS: agent {name!r}"
    if isinstance(urls, str):
        urls = [urls]
    elif not isinstance(urls, list) or not urls:
        raise ConfigError(redact(
            f"{where}: expected a URL or a non-empty list of URLs, got {urls!r}"))  # fmt: skip
    for url in urls:
        if not isinstance(url, str) or not _looks_like_url(url):
            raise ConfigError(redact(f"{where}: {url!r} is not an http(s)://host:port URL"))
    if len({redact(u).rstrip("/") for u in urls}) < len(urls):
        raise ConfigError(redact(f"{where}: a URL is listed twice in {urls!r}"))


def _looks_like_url(text: str) -> bool:
    scheme, sep, rest = text.partition("://")
    return bool(sep) and scheme in ("http", "https") and bool(rest.split("/")[0])
