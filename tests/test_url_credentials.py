"""Agent URLs with credentials (a basic-auth proxy), and exceptions nothing classifies.

Real `rollouts collect` runs, as a user runs them (tests/test_cli_console.py's environment),
against the reference agent requiring basic auth: the agent sees basic auth on every request,
the console shows exactly the summary, and the password is in no file, log, artifact or Prefect
record; where a URL is shown (status, health and replica files, artifacts) it reads
`http://alice:***@host:port`. And a real misconfiguration that makes the transport raise
(an API key with a carriage return, as `$(cat key.txt)` leaves from a Windows file): one
classified failure per rollout, one console line, `rollouts failures` naming the class.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import RUN_PAGE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL
from pydantic import ValidationError
from test_cli_console import assert_one_message, free_port, user_env

from reference_agent.server import BASIC_AUTH_ENV, write_tasks
from rollouts.errors import ConfigError
from rollouts.models import CollectConfig, MultiDatasetConfig
from rollouts.run_state import run_dir_for
from rollouts.settings import RolloutsSettings
from rollouts.urls import redact


def test_redact_hides_every_password_and_keeps_the_rest() -> None:
    assert redact("http://alice:s3cret@h:8000/run") == "http://alice:***@h:8000/run"
    assert redact("https://tok3n@h/x") == "https://***@h/x"  # a user alone may be a token
    assert redact("http://h:8000/run") == "http://h:8000/run"
    assert redact("see mail@example.org") == "see mail@example.org"  # no URL: untouched
    text = "'http://a:p%40ss@h1:1', 'http://b:x@y@h2:2' and http://h3:3"
    assert redact(text) == "'http://a:***@h1:1', 'http://b:***@h2:2' and http://h3:3"
    assert redact(redact(text)) == redact(text)


def test_settings_hold_agent_urls_redacted_and_name_bad_ones_redacted() -> None:
    settings = RolloutsSettings(agents={"a": ["http://alice:pw@h:1/", "http://h:2"]})
    assert settings.replicas_of("a") == ["http://alice:***@h:1", "http://h:2"]
    assert "pw" not in repr(settings)
    with pytest.raises(ConfigError, match=r"'ftp://alice:\*\*\*@h:1' is not an http") as info:
        RolloutsSettings(agents={"a": "ftp://alice:pw@h:1"})
    assert "pw" not in str(info.value)


def test_a_parameter_never_carries_credentials() -> None:
    """A flow parameter and run.json are stored in plain text: the URL belongs in the settings."""
    for make in (
        lambda: CollectConfig(input_jsonl_fpath="i", output_jsonl_fpath="o",
                              agent_url="http://alice:pw@h:1"),
        lambda: MultiDatasetConfig(datasets=[{"name": "d", "input": "i", "output": "o",
                                              "agent_url": "http://alice:pw@h:1"}]),
    ):  # fmt: skip
        with pytest.raises(ValidationError, match=r"http://alice:\*\*\*@h:1 carries credentials"):
            make()


def collect(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rollouts_cli", "collect", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def rollouts(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rollouts_cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip


async def prefect_records(output: Path) -> tuple[list[Any], list[str]]:
    """The flow runs that wrote ``output``, and everything Prefect stored about them (task
    runs, logs, artifacts), as JSON texts."""
    async with get_client() as client:
        runs = [r for r in await client.read_flow_runs()
                if r.parameters.get("output_jsonl_fpath") == str(output)]  # fmt: skip
        ids = [r.id for r in runs]
        texts = [r.model_dump_json() for r in runs]
        texts += [t.model_dump_json() for t in await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))]  # fmt: skip
        texts += [log.model_dump_json() for log in await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))]  # fmt: skip
        texts += [a.model_dump_json() for a in await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))]  # fmt: skip
        return runs, texts


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def start_agent_process(start_agent: Any, password: str) -> Any:
    return start_agent("--latency-ms", "150", env={BASIC_AUTH_ENV: f"alice:{password}"})


def test_credentials_in_agent_urls_are_basic_auth_redacted_everywhere_stored_nowhere(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    password = f"pw-{secrets.token_hex(12)}"
    replicas = [start_agent_process(start_agent, password) for _ in range(2)]
    urls = [r.url.replace("http://", f"http://alice:{password}@") for r in replicas]
    shown = [r.url.replace("http://", "http://alice:***@") for r in replicas]
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 40, seed=3)
    out = tmp_path / "out.jsonl"
    env = user_env(
        prefect_api, tmp_path / "home", ROLLOUTS_AGENTS=orjson.dumps({"a": urls}).decode()
    )
    run_dir = run_dir_for(out, None)

    proc = subprocess.Popen(
        [sys.executable, "-m", "rollouts_cli", "collect", "--agent-name", "a", "--input",
         str(inp), "--output", str(out), "--num-repeats", "2", "--num-samples-in-parallel", "4"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    health: dict[str, bytes] = {}  # what the live health files held while it collected
    while proc.poll() is None:
        for p in run_dir.glob("health.*.json") if run_dir.exists() else ():
            with contextlib.suppress(FileNotFoundError):  # replaced by a rename: never missing
                health[f"{p} #{len(health)}"] = p.read_bytes()
        time.sleep(0.05)
    stdout, stderr = proc.communicate()

    assert proc.returncode == 0 and RUN_PAGE.fullmatch(stderr), stderr  # the run's page only
    assert stdout == "\n".join([
        " " * 36 + "rollouts" + " " * 37,
        "┏━━━━━━━━━━━━━━┳━━━━━━━━━━┳━━━━━━━━━┳━━━━━━━━┳━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━━━┓",
        "┃ agent        ┃ expected ┃ written ┃ failed ┃ mean reward ┃ pass@k             ┃",
        "┡━━━━━━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━╇━━━━━━━━╇━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━━━┩",
        "│ a            │       80 │      80 │      0 │      0.5500 │ @1 0.550  @2 0.825 │",
        "└──────────────┴──────────┴─────────┴────────┴─────────────┴────────────────────┘",
        "80/80 written, 0 failed, 0 missing; 0/1 chunks from cache",
        f"rollouts: {out}",
        f"failures: {tmp_path / 'out_failures.jsonl'}",
        f"metrics:  {tmp_path / 'out_aggregate_metrics.json'}",
        "",
    ])  # fmt: skip
    # Each replica got its share, every request with basic auth, and accepted it.
    sent = [q for r in replicas for q in r.requests()]
    assert len(sent) == 80 and all(r.requests() for r in replicas)
    assert {(q["auth"], q["authorized"]) for q in sent} == {("Basic alice", True)}

    # Where a URL is shown, it is redacted.
    status = rollouts(env, tmp_path, "status", str(out)).stdout
    assert all(f"a {u}" in status for u in shown), status
    assert health and all(any(u.encode() in doc for u in shown) for doc in health.values())
    stats = files_under(run_dir)
    assert any(shown[0].encode() in data for p, data in stats.items() if "health." in p)
    runs, records = asyncio.run(prefect_records(out))
    assert len(runs) == 1 and any(shown[0] in text for text in records)  # the artifacts

    # The password is nowhere: console, files under the test's directory (outputs, run state,
    # PREFECT_HOME with the result storage, the agents' request logs), the Prefect database.
    places = {"stdout": stdout.encode(), "stderr": stderr.encode(),
              "status": status.encode(), "Prefect records": "\n".join(records).encode(),
              **health, **files_under(tmp_path)}  # fmt: skip
    database = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1]).parent
    places |= files_under(database)
    assert len(places) > 20
    secret_forms = [password.encode(), base64.b64encode(f"alice:{password}".encode())]
    leaks = [where for where, data in places.items() if any(s in data for s in secret_forms)]
    assert leaks == [], f"the password leaked into: {leaks}"


def test_credentials_are_refused_as_a_parameter_and_redacted_in_messages(
    tmp_path: Path, prefect_api: str
) -> None:
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 5)
    port = free_port()  # nothing listens there
    password = f"pw-{secrets.token_hex(8)}"
    url = f"http://alice:{password}@127.0.0.1:{port}"
    env = user_env(prefect_api, tmp_path / "home", ROLLOUTS_AGENTS=f'{{"a": "{url}"}}')

    res = collect(env, tmp_path, f"+agent_url={url}", f"+input_jsonl_fpath={inp}",
                  "+output_jsonl_fpath=out.jsonl")  # fmt: skip
    assert assert_one_message(res, 2) == (
        f"rollouts collect: agent_url: Value error, http://alice:***@127.0.0.1:{port} carries "
        "credentials, and a parameter is stored in plain text (the flow run, the run state). "
        'Put the URL in ROLLOUTS_AGENTS=\'{"NAME": "URL"}\' and pass agent_name=NAME instead\n'
    )

    res = collect(env, tmp_path, "+agent_name=a", f"+input_jsonl_fpath={inp}",
                  "+output_jsonl_fpath=out.jsonl")  # fmt: skip
    message = assert_one_message(res, 1)
    assert f"agent 'a' at http://alice:***@127.0.0.1:{port}: connection refused" in message
    assert password not in message
    assert list(tmp_path.iterdir()) == [inp]  # nothing written, no state


def test_an_unexpected_exception_in_the_transport_is_one_classified_failure_per_rollout(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    """A key read with `$(cat key.txt)` from a file with Windows line endings keeps its `\\r`:
    aiohttp refuses the header with a ValueError, in the transport, on every request."""
    agent = start_agent()
    key = f"sk-{secrets.token_hex(12)}"
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 50)
    out = tmp_path / "out.jsonl"
    env = user_env(prefect_api, tmp_path / "home", ROLLOUTS_AGENT_API_KEY=key + "\r",
                   ROLLOUTS_AGENTS=f'{{"a": "{agent.url}"}}')  # fmt: skip

    res = collect(env, tmp_path, "--agent-name", "a", "--input", str(inp), "--output", str(out),
                  "--num-repeats", "2", "--chunk-size", "15")  # fmt: skip

    assert res.returncode == 0, res.stderr
    error = ("ValueError: Forbidden control character detected in headers. Potential header "
             "injection attack.")  # fmt: skip
    (line,) = RUN_PAGE.sub("", res.stderr).splitlines()  # one line for 100 failed rollouts in 4 chunks
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} \| WARNING \| Flow run '[^']+' - (.*)", line)
    assert line.split(" - ", 1)[1] == (
        "100 rollout(s) failed with unexpected_error, final and not retried: an exception in "
        "the request path that no failure class covers, a bug or a misconfiguration. "
        f"`rollouts failures {out}` lists them; once the cause is fixed, `rollouts retry {out} "
        f"--failure-class unexpected_error` sends them again. First error: {error}"
    )
    assert res.stdout == "\n".join([
        " " * 30 + "rollouts" + " " * 31,
        "┏━━━━━━━━━━━━━━┳━━━━━━━━━━┳━━━━━━━━━┳━━━━━━━━┳━━━━━━━━━━━━━┳━━━━━━━━┓",
        "┃ agent        ┃ expected ┃ written ┃ failed ┃ mean reward ┃ pass@k ┃",
        "┡━━━━━━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━╇━━━━━━━━╇━━━━━━━━━━━━━╇━━━━━━━━┩",
        "│ a            │      100 │       0 │    100 │           - │ -      │",
        "└──────────────┴──────────┴─────────┴────────┴─────────────┴────────┘",
        "0/100 written, 100 failed, 0 missing; 0/4 chunks from cache",
        f"rollouts: {out}",
        f"failures: {tmp_path / 'out_failures.jsonl'}",
        f"metrics:  {tmp_path / 'out_aggregate_metrics.json'}",
        "",
    ])  # fmt: skip
    assert agent.requests() == []  # it never left the process

    failures = [
        orjson.loads(x) for x in (tmp_path / "out_failures.jsonl").read_bytes().splitlines()
    ]
    assert len(failures) == 100
    assert {(f["_ng_failure_class"], f["_ng_failure_terminal"], f["attempts"], f["error"])
            for f in failures} == {("unexpected_error", True, 1, error)}  # fmt: skip
    assert {(f["_ng_task_index"], f["_ng_rollout_index"]) for f in failures} == {
        (t, r) for t in range(50) for r in range(2)
    }

    triage = rollouts(env, tmp_path, "failures", str(out)).stdout
    assert re.search(r"│ unexpected_error │ +100 │ +100 │ +0 │", triage), triage
    assert f"unexpected_error: {error}" in triage

    # A rerun sends nothing: the class is final.
    again = collect(env, tmp_path, "--agent-name", "a", "--input", str(inp), "--output",
                    str(out), "--num-repeats", "2", "--chunk-size", "15")  # fmt: skip
    assert again.returncode == 0 and agent.requests() == []
    _, records = asyncio.run(prefect_records(out))
    places = {"stdout": res.stdout + again.stdout, "stderr": res.stderr + again.stderr,
              "records": "\n".join(records), **{k: v.decode(errors="replace")
                                               for k, v in files_under(tmp_path).items()}}  # fmt: skip
    assert [where for where, text in places.items() if key in text] == []
    assert os.environ.get("ROLLOUTS_AGENT_API_KEY") is None  # the test process never had it
