"""The collect-multi-dataset flow: per-dataset settings reach the agent; resume after a kill.

Both run on the production setup, a Prefect server on PostgreSQL (the `pg_prefect` fixture):
concurrent subflows are what SQLite serializes behind its database lock."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from conftest import AgentServer, read_jsonl
from pg_prefect import PgPrefectServer
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.multi import MultiSummary, collect_multi_dataset, dataset_run_name
from reference_agent.server import write_tasks
from rollouts.models import MultiDatasetConfig
from rollouts.run_state import run_dir_for

TEMPERATURES = {"high_quality": 0.2, "exploration": 0.6, "hard": 0.4}
REPEATS = {"high_quality": 1, "exploration": 1, "hard": 3}


def lines(chunks_dir: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in chunks_dir.glob("*.rollouts.jsonl"))


def written_keys(chunks_dir: Path) -> set[tuple[int, int]]:
    keys = set()
    for p in chunks_dir.glob("*.rollouts.jsonl"):
        data = p.read_bytes()
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            row = orjson.loads(line)
            keys.add((row["_ng_task_index"], row["_ng_rollout_index"]))
    return keys


def pattern_6_4(tmp_path: Path, sizes: dict[str, int], total: int, **ds: Any) -> dict[str, Any]:
    datasets = []
    for name, n in sizes.items():
        inp = tmp_path / f"{name}_tasks.jsonl"
        write_tasks(inp, n, seed=len(name))
        datasets.append({
            "name": name, "input": str(inp), "output": str(tmp_path / f"train_{name}.jsonl"),
            "agent_name": "sim", "responses_create_params": {"temperature": TEMPERATURES[name]},
            "num_repeats": REPEATS[name], **ds,
        })  # fmt: skip
    return {
        "datasets": datasets,
        "mix": {"output": str(tmp_path / "train_mixed.jsonl"), "total": total, "seed": 0,
                "proportions": {"high_quality": 0.6, "exploration": 0.3, "hard": 0.1}},
    }  # fmt: skip


def test_each_dataset_reaches_the_agent_with_its_own_temperature_and_repeats(
    tmp_path: Path, agent: AgentServer, monkeypatch: pytest.MonkeyPatch,
    pg_prefect: PgPrefectServer,
) -> None:  # fmt: skip
    monkeypatch.setenv("ROLLOUTS_AGENTS", orjson.dumps({"sim": agent.url}).decode())
    sizes = {"high_quality": 120, "exploration": 80, "hard": 30}
    config = MultiDatasetConfig.model_validate(pattern_6_4(tmp_path, sizes, total=150))

    with temporary_settings({PREFECT_API_URL: pg_prefect.api_url}):
        state = asyncio.run(collect_multi_dataset(config=config, return_state=True))

    assert state.is_completed(), state.message
    # one completed subflow per dataset, read from the server's PostgreSQL database itself
    subflows = pg_prefect.query(
        "SELECT sub.name, sub.state_type FROM flow_run sub JOIN task_run t"
        " ON sub.parent_task_run_id = t.id WHERE t.flow_run_id = $1::uuid ORDER BY sub.name",
        state.state_details.flow_run_id,
    )
    assert subflows == sorted((dataset_run_name(d), "COMPLETED") for d in config.datasets)
    summary = state.result()
    assert isinstance(summary, MultiSummary)
    by_temperature: dict[float, Counter[int]] = {}
    for q in agent.requests():
        by_temperature.setdefault(q["temperature"], Counter())[q["_ng_rollout_index"]] += 1
    for name, n in sizes.items():
        seen = by_temperature[TEMPERATURES[name]]
        assert seen == dict.fromkeys(range(REPEATS[name]), n), name
    mixed = read_jsonl(tmp_path / "train_mixed.jsonl")
    counts = Counter(r["_mix_source"] for r in mixed)
    assert counts == {"high_quality": 90, "exploration": 45, "hard": 15}  # groups of 3 fit 15
    hard_groups = Counter(r["_ng_task_index"] for r in mixed if r["_mix_source"] == "hard")
    assert set(hard_groups.values()) == {3}  # keep_groups defaulted on (hard has repeats)
    assert summary.mix_rows == 150


def test_killed_multi_dataset_run_resumes_without_redoing_finished_work(
    tmp_path: Path, start_agent: Any, pg_prefect: PgPrefectServer
) -> None:
    agent = start_agent("--latency-ms", "25")
    config = pattern_6_4(
        tmp_path, {"high_quality": 40, "exploration": 1500, "hard": 20}, total=60,
        chunk_size=100, num_samples_in_parallel=4,
    )  # fmt: skip
    config_path = tmp_path / "mix.yaml"
    config_path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "rollouts_cli", "multi", "--config", str(config_path)]
    env = {**os.environ, "PREFECT_API_URL": pg_prefect.api_url,
           "ROLLOUTS_AGENTS": orjson.dumps({"sim": agent.url}).decode()}  # fmt: skip
    outputs = {n: tmp_path / f"train_{n}.jsonl" for n in TEMPERATURES}
    chunk_dirs = {n: run_dir_for(p, None) / "chunks" for n, p in outputs.items()}

    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    # kill while exploration (6 s of work at least) is partway through
    while lines(chunk_dirs["exploration"]) < 300:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not outputs["exploration"].exists()
    finished = {n for n, p in outputs.items() if p.exists()}
    written = {n: written_keys(d) for n, d in chunk_dirs.items()}
    sent_before = agent.requests()

    rerun = subprocess.run(cmd, check=False, env=env, cwd=tmp_path, capture_output=True,
                           timeout=300)  # fmt: skip

    assert rerun.returncode == 0, rerun.stderr.decode()[-3000:]
    sent_after = agent.requests()[len(sent_before) :]
    name_of = {t: n for n, t in TEMPERATURES.items()}
    resent = {(name_of[q["temperature"]], q["_ng_task_index"], q["_ng_rollout_index"])
              for q in sent_after}  # fmt: skip
    # datasets finished before the kill were not redone at all
    assert not {n for n, _, _ in resent} & finished
    # no rollout written before the kill was asked for again, in any dataset
    for name, keys in written.items():
        assert not {(name, t, r) for t, r in keys} & resent, name
    for name, n in {"high_quality": 40, "exploration": 1500, "hard": 20}.items():
        assert len(read_jsonl(outputs[name])) == n * REPEATS[name]
    assert len(read_jsonl(tmp_path / "train_mixed.jsonl")) == 60  # 36 + 18 + 2 groups of 3


def test_a_multi_dataset_run_cut_by_its_deadline_exits_3_and_writes_no_mix(
    tmp_path: Path, start_agent: Any, pg_prefect: PgPrefectServer
) -> None:
    """Each dataset's max_duration ends its subflow on time; the command says so with the
    deadline's exit status (3: rerun to continue), and mixes nothing from a partial set."""
    agent = start_agent("--latency-ms", "50")
    config = pattern_6_4(
        tmp_path, {"high_quality": 20, "exploration": 2000, "hard": 10}, total=30,
        chunk_size=500, num_samples_in_parallel=4, max_duration="4s",
    )  # fmt: skip
    config_path = tmp_path / "mix.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PREFECT_API_URL": pg_prefect.api_url,
           "ROLLOUTS_AGENTS": orjson.dumps({"sim": agent.url}).decode()}  # fmt: skip

    done = subprocess.run(
        [sys.executable, "-m", "rollouts_cli", "multi", "--config", str(config_path)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip

    assert done.returncode == 3, done.stderr[-3000:]
    assert "exploration" in done.stderr and "deadline" in done.stderr
    assert not (tmp_path / "train_mixed.jsonl").exists()
    assert (tmp_path / "train_high_quality.jsonl").exists()  # a dataset that finished in time


def test_rollouts_multi_shows_each_dataset_and_the_mix_and_on_a_server_the_runs_page(
    tmp_path: Path, start_agent: Any, pg_prefect: PgPrefectServer
) -> None:
    """Without a terminal (a log, `make demo` in CI): a line per dataset as it starts and
    finishes and the mix's, never a long silence; with the user's server, the run's page in
    its UI first; with the command's temporary API, no page (it has no UI). A dataset refused
    for other parameters names the way out of a multi-dataset run, which has no `fresh`."""
    agent = start_agent("--latency-ms", "5")
    sizes = {"high_quality": 60, "exploration": 40, "hard": 20}
    rollouts = {name: n * REPEATS[name] for name, n in sizes.items()}
    config = pattern_6_4(tmp_path, sizes, total=60)
    config_path = tmp_path / "mix.yaml"
    config_path.write_text(yaml.safe_dump(config))
    user_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ROLLOUTS_"))}
    user_env |= {"PREFECT_HOME": str(tmp_path / "home"),
                 "ROLLOUTS_AGENTS": orjson.dumps({"sim": agent.url}).decode()}  # fmt: skip
    on_server = {**user_env, "PREFECT_API_URL": pg_prefect.api_url}

    def multi(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rollouts_cli", "multi", "--config", str(config_path)],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip

    first = multi(on_server)

    assert first.returncode == 0, first.stderr[-3000:]
    stderr = first.stderr.splitlines()
    ui = re.escape(pg_prefect.api_url.removesuffix("/api"))
    page = re.fullmatch(rf"Prefect UI: {ui}/runs/flow-run/([0-9a-f-]{{36}})", stderr[0])
    assert page, stderr
    (flow_name,) = pg_prefect.query(
        "SELECT f.name FROM flow_run r JOIN flow f ON f.id = r.flow_id WHERE r.id = $1::uuid",
        page[1],
    )
    assert flow_name == ("collect-multi-dataset",)
    mix_out = config["mix"]["output"]
    for name in sizes:  # its last line: finished
        (last,) = [x for x in stderr if x.startswith(f"{name}: ")][-1:]
        n = rollouts[name]
        assert last.startswith(f"{name}: {n}/{n} (100.0%), 0 failed"), stderr
    assert stderr[-1] == f"mix: 60 rows written to {mix_out}", stderr
    assert sum(x.startswith("Prefect UI: ") for x in stderr) == 1  # the run, not its subflows

    again = multi(user_env)  # no server: the command's temporary API

    assert again.returncode == 0, again.stderr[-3000:]
    assert "Prefect UI" not in again.stderr
    for name in sizes:  # each dataset from the cache: its finished line, once
        (line,) = [x for x in again.stderr.splitlines() if x.startswith(f"{name}: ")]
        n = rollouts[name]
        assert line.startswith(f"{name}: {n}/{n} (100.0%), 0 failed"), again.stderr
    assert f"mix: mixing 60 rows into {mix_out}" in again.stderr.splitlines()

    config["datasets"][2]["responses_create_params"] = {"temperature": 0.9}
    config_path.write_text(yaml.safe_dump(config))
    refused = multi(on_server)

    assert refused.returncode == 2, refused.stderr[-3000:]
    hard_run_dir = run_dir_for(config["datasets"][2]["output"], None)
    assert (f"write to another output, or delete the output's files and its run state "
            f"{hard_run_dir} to discard it and start over") in refused.stderr  # fmt: skip
    assert "--fresh" not in refused.stderr and "`fresh` parameter" not in refused.stderr
