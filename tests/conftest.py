"""Shared fixtures: one Prefect test harness per session, a PostgreSQL-backed Prefect server for
the tests that need the production setup, real agent servers on loopback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The suite runs its own Prefect API: a server the developer's shell points at, running or not,
# must play no part (subprocesses get the session's URL explicitly).
os.environ.pop("PREFECT_API_URL", None)
# Result storage (the task cache) must be chosen before Prefect reads its settings.
_RESULTS = tempfile.mkdtemp(prefix="rollouts-test-results-")
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = _RESULTS
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import orjson
import pytest
from pg_prefect import PgPrefectServer, pg_prefect_server, postgres_missing
from prefect.testing.utilities import prefect_test_harness
from s3_server import S3Server, s3_server_started
from slurm_cluster import SlurmCluster, slurm_cluster_started

ROOT = Path(__file__).resolve().parents[1]
# What a command run on a Prefect server prints first on stderr: its run's page in the UI.
RUN_PAGE = re.compile(r"Prefect UI: http://127\.0\.0\.1:\d+/runs/flow-run/[0-9a-f-]{36}\n")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fast: the stages alone: no Prefect, no processes (`make test-fast`)"
    )


@pytest.fixture(scope="session", autouse=True)
def prefect_api(request: pytest.FixtureRequest) -> Iterator[str]:
    """One real (temporary) Prefect server for the whole session; yields its API URL. The fast
    tier (`-m fast`) needs none and skips its start-up."""
    if request.config.getoption("markexpr") == "fast":
        yield ""
        return
    from prefect.settings import PREFECT_API_URL

    with prefect_test_harness(server_startup_timeout=60):
        yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="session")
def pg_prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgPrefectServer]:
    """A real `prefect server start` on a PostgreSQL database of its own, started once for the
    session when a test asks for it (deployments, concurrent subflows); the database is dropped
    at the end. Skips those tests where no PostgreSQL runs on 127.0.0.1:5432."""
    reason = postgres_missing()
    if reason:
        pytest.skip(reason)
    with pg_prefect_server(tmp_path_factory.mktemp("pg-prefect")) as server:
        yield server


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """The repository's one-node Slurm (scripts/slurm.sh start: installs and starts what is
    missing), once for the session when a test asks for it; at the end, the daemons that this
    session started are stopped. Skips those tests where Slurm cannot be set up."""
    with slurm_cluster_started(tmp_path_factory.mktemp("slurm") / "started") as cluster:
        yield cluster


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """An S3-compatible server on 127.0.0.1 (moto's), once for the session when a test asks
    for it (tests/s3_server.py); each test makes its own buckets."""
    with s3_server_started(tmp_path_factory.mktemp("s3") / "moto.log") as server:
        yield server


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep backoffs short and settings isolated from the developer's environment and .env."""
    for key in list(os.environ):
        if key.startswith("ROLLOUTS_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray .env is read; relative paths land in tmp
    monkeypatch.setenv("ROLLOUTS_BACKOFF_BASE_S", "0.02")
    monkeypatch.setenv("ROLLOUTS_BACKOFF_MAX_S", "0.2")
    monkeypatch.setenv("ROLLOUTS_CHUNK_RETRY_DELAY_S", "0")
    monkeypatch.setenv("ROLLOUTS_REQUEST_TIMEOUT_S", "10")


@dataclass
class AgentServer:
    url: str
    process: subprocess.Popen[bytes]
    request_log: Path

    def requests(self) -> list[dict[str, Any]]:
        if not self.request_log.exists():
            return []
        return [orjson.loads(line) for line in self.request_log.read_bytes().splitlines() if line]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., AgentServer]]:
    """Start the reference agent (a real process on 127.0.0.1) with the given CLI flags."""
    servers: list[AgentServer] = []

    def start(*flags: str, env: dict[str, str] | None = None) -> AgentServer:
        log = tmp_path / f"agent-requests-{len(servers)}.jsonl"
        proc = subprocess.Popen(
            [sys.executable, "-m", "reference_agent", "--port", "0",
             "--request-log", str(log), *flags],
            stdout=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if "listening on" not in line:
            proc.kill()
            raise RuntimeError(f"reference agent did not start: {line!r}")
        server = AgentServer(line.rsplit(" ", 1)[-1].strip(), proc, log)
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def agent(start_agent: Callable[..., AgentServer]) -> AgentServer:
    return start_agent()


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
