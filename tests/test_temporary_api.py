"""Without a Prefect server: the command's temporary Prefect API, as a new user meets it.

A fresh PREFECT_HOME (the temporary API builds its database first: the slowest start there is),
no PREFECT_API_URL, and both cores busy with other work, as on a shared CI runner: `rollouts
collect` and `rollouts multi` must succeed. A start that does not finish in time is one message
and exit 2; the server never outlives its command, even after kill -9.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from conftest import AgentServer, read_jsonl

from reference_agent.server import write_tasks


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """A new user's shell: none of the session's PREFECT_* or ROLLOUTS_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ROLLOUTS_"))}
    return {**env, "PREFECT_HOME": str(home), **extra}


@contextlib.contextmanager
def cpu_burners(n: int = 2) -> Iterator[None]:
    """`n` processes spinning on the CPU: both cores of this machine stay busy."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def temporary_api_pids(home: Path) -> list[int]:
    """Live temporary API servers whose PREFECT_HOME is `home`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"rollouts_cli.temporary_api" in cmdline and f"PREFECT_HOME={home}".encode() in environ:
            pids.append(int(proc.name))
    return pids


def rollouts(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rollouts_cli", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip


def test_collect_and_multi_on_a_fresh_home_with_both_cores_busy(
    tmp_path: Path, agent: AgentServer
) -> None:
    write_tasks(tmp_path / "a.jsonl", 12)
    write_tasks(tmp_path / "b.jsonl", 8, seed=1)
    config = {
        "datasets": [
            {"name": "a", "input": "a.jsonl", "output": "out/a.jsonl", "agent_name": "ref",
             "num_repeats": 2, "responses_create_params": {"temperature": 0.3}},
            {"name": "b", "input": "b.jsonl", "output": "out/b.jsonl", "agent_name": "ref"},
        ],
        "mix": {"output": "out/mixed.jsonl", "total": 10, "proportions": {"a": 0.6, "b": 0.4}},
    }  # fmt: skip
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(config))
    agents = f'{{"ref": "{agent.url}"}}'

    with cpu_burners(2):
        collected = rollouts(
            clean_env(tmp_path / "home-collect"), tmp_path, "collect", f"+agent_url={agent.url}",
            "+input_jsonl_fpath=a.jsonl", "+output_jsonl_fpath=out/collect.jsonl",
            "+num_repeats=2",
        )  # fmt: skip
        multi = rollouts(
            clean_env(tmp_path / "home-multi", ROLLOUTS_AGENTS=agents), tmp_path, "multi",
            "--config", "mix.yaml",
        )  # fmt: skip

    for res in (collected, multi):
        assert res.returncode == 0, res.stdout + res.stderr
        assert "Traceback" not in res.stdout + res.stderr
    keys = [(r["_ng_task_index"], r["_ng_rollout_index"])
            for r in read_jsonl(tmp_path / "out/collect.jsonl")]  # fmt: skip
    assert keys == [(t, r) for t in range(12) for r in range(2)]
    assert len(read_jsonl(tmp_path / "out/a.jsonl")) == 24
    assert len(read_jsonl(tmp_path / "out/b.jsonl")) == 8
    assert len(read_jsonl(tmp_path / "out/mixed.jsonl")) == 10
    # Each command stopped its server; nothing of it is left in /tmp.
    assert temporary_api_pids(tmp_path / "home-collect") == []
    assert temporary_api_pids(tmp_path / "home-multi") == []


def test_a_start_past_the_limit_is_one_message_and_exit_2(
    tmp_path: Path, agent: AgentServer
) -> None:
    write_tasks(tmp_path / "in.jsonl", 3)
    env = clean_env(tmp_path / "home", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    res = rollouts(env, tmp_path, "collect", f"+agent_url={agent.url}",
                   "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl")  # fmt: skip

    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert res.stderr.count("\n") == 1, res.stderr
    message = res.stderr
    assert message.startswith("rollouts collect: the temporary Prefect API did not answer "
                              "within 1 s")  # fmt: skip
    assert "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in message
    assert "`make server`" in message
    assert agent.requests() == []
    assert temporary_api_pids(tmp_path / "home") == []


def test_the_server_does_not_outlive_a_killed_command(
    tmp_path: Path, start_agent: Callable[..., AgentServer]
) -> None:
    agent = start_agent("--latency-ms", "2000")
    write_tasks(tmp_path / "in.jsonl", 4)
    home = tmp_path / "home"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollouts_cli", "collect", f"+agent_url={agent.url}",
         "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl"],
        env=clean_env(home), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not agent.requests():  # the server answered: the flow is running
            assert proc.poll() is None, "the command ended before its first request"
            assert time.monotonic() < deadline, "no request reached the agent in 120 s"
            time.sleep(0.2)
        assert len(temporary_api_pids(home)) == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while temporary_api_pids(home):
            if time.monotonic() > deadline:
                pytest.fail(f"the temporary API lives on: {temporary_api_pids(home)}")
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_sigterm_to_every_process_of_the_command_stops_it_gracefully(
    tmp_path: Path, start_agent: Callable[..., AgentServer]
) -> None:
    """As Slurm ends or requeues a job (and systemd stops a unit): the command and its
    temporary API get SIGTERM at once. The API stays up until the command has written its
    run's final state through it; the command exits 143 at once, with no error."""
    agent = start_agent("--latency-ms", "50")
    write_tasks(tmp_path / "in.jsonl", 2000)
    home = tmp_path / "home"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollouts_cli", "collect", f"+agent_url={agent.url}",
         "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl"],
        env=clean_env(home), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(agent.requests()) < 50:
            assert proc.poll() is None, "the command ended before it could be stopped"
            assert time.monotonic() < deadline, "no requests reached the agent in 120 s"
            time.sleep(0.1)
        (api_pid,) = temporary_api_pids(home)
        stopped_at = time.monotonic()
        for pid in (proc.pid, api_pid):
            os.kill(pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        took_s = time.monotonic() - stopped_at
    finally:
        if proc.poll() is None:
            proc.kill()
    console = stderr.decode()
    assert proc.returncode == 143, console[-3000:]
    assert "stopped by SIGTERM" in console
    assert "ERROR" not in console and "Unable to connect" not in console, console[-3000:]
    assert took_s < 20, f"{took_s:.1f} s from SIGTERM to exit"  # without it: over 60 s, retrying the gone API
    assert temporary_api_pids(home) == []
