"""Outputs in object storage: `--output s3://bucket/runs/rollouts.jsonl` against a real
S3-compatible server on 127.0.0.1 (moto's, tests/s3_server.py) and a real reference agent.

The three output objects hold what the same run writes on disk, a rerun comes back from the
cache, `rollouts failures`, `status` and `retry` read them; a SIGKILL mid-run and the same
command again give the exact output without resending what was written; an object appears
whole or not at all, even when its writer is killed mid-upload; a missing bucket and refused
credentials are one line naming the URL before any request. The run state of such an output is
local: ROLLOUTS_WORK_DIR, else $XDG_CACHE_HOME/rollouts/runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import AgentServer, read_jsonl
from fsspec.core import url_to_fs
from s3_server import S3Server
from test_cli_console import assert_one_message, collect, user_env
from test_crash_resume import wait_until_written, written_keys

from reference_agent.server import generate_tasks, write_tasks
from rollouts import storage
from rollouts.run_state import OutputPaths, local_runs_dir, run_dir_for
from rollouts.storage import StorageError, check_writable, object_writers

# ---------------------------------------------------------------------------------------------
# The stages alone


@pytest.mark.fast
def test_an_output_url_has_its_files_beside_it_without_folding_the_url() -> None:
    paths = OutputPaths.for_output("s3://bkt/runs/rollouts.jsonl")
    assert paths.all() == ["s3://bkt/runs/rollouts.jsonl", "s3://bkt/runs/rollouts_failures.jsonl",
                           "s3://bkt/runs/rollouts_aggregate_metrics.json"]  # fmt: skip
    local = OutputPaths.for_output("out/r.jsonl")
    assert local.all() == [Path("out/r.jsonl"), Path("out/r_failures.jsonl"),
                           Path("out/r_aggregate_metrics.json")]  # fmt: skip


@pytest.mark.fast
def test_the_run_state_of_an_output_url_is_local_and_keyed_by_the_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    a, b = "s3://bkt/a/rollouts.jsonl", "s3://bkt/b/rollouts.jsonl"
    assert local_runs_dir() == tmp_path / "cache" / "rollouts" / "runs"
    assert run_dir_for(a, None).parent == tmp_path / "cache" / "rollouts" / "runs"
    assert run_dir_for(a, None).name.startswith("rollouts-")
    assert run_dir_for(a, None) != run_dir_for(b, None)
    assert run_dir_for(a, tmp_path / "work").parent == tmp_path / "work"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert local_runs_dir() == Path.home() / ".cache" / "rollouts" / "runs"
    # A local output: beside it, as always.
    assert run_dir_for("out/r.jsonl", None).parent == tmp_path / "out" / ".rollouts"


@pytest.mark.fast
def test_run_names_and_artifact_keys_of_an_output_url() -> None:
    from flows.ui import artifact_key, output_label

    assert output_label("s3://bkt/runs/train.jsonl") == "runs/train"
    assert output_label("s3://bkt/train.jsonl") == "bkt/train"
    key = artifact_key("s3://bkt/runs/train.jsonl", "summary")
    assert key.startswith("train-summary-") and key != artifact_key("s3://x/runs/train.jsonl",
                                                                    "summary")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Against the S3 server, in this process


def _fs(s3: S3Server) -> Any:
    fs, _ = url_to_fs("s3://x", **s3.options())
    return fs


def _uploads_in_progress(s3: S3Server, bucket: str) -> list[Any]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="k",
                          aws_secret_access_key="s", region_name="us-east-1")  # fmt: skip
    return list(client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """This process's storage settings point at the test server."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


def test_objects_written_together_appear_whole_or_not_at_all(s3_env: S3Server) -> None:
    bucket = s3_env.bucket()
    a, b = f"s3://{bucket}/runs/r.jsonl", f"s3://{bucket}/runs/r_failures.jsonl"
    big = b"x" * (storage.WRITE_BLOCK + 1000) + b"\n"  # two parts: a multipart upload
    with object_writers([a, b]) as (out, fout):
        out.write(big)
        fout.write(b"f\n")
        assert not storage.exists(a)  # nothing appears before the end of the block
    assert storage.read_bytes(a) == big and storage.read_bytes(b) == b"f\n"

    with pytest.raises(RuntimeError, match="boom"), object_writers([a, b]) as (out, fout):
        out.write(b"y" * (storage.WRITE_BLOCK + 1000))
        fout.write(b"g\n")
        raise RuntimeError("boom")
    assert storage.read_bytes(a) == big and storage.read_bytes(b) == b"f\n"  # the old ones
    assert _uploads_in_progress(s3_env, bucket) == []  # the parts were discarded


def test_an_object_whose_writer_is_killed_mid_upload_never_appears(
    s3_env: S3Server, tmp_path: Path
) -> None:
    bucket = s3_env.bucket()
    url = f"s3://{bucket}/runs/r.jsonl"
    storage.write_bytes(url, b"old\n")
    script = textwrap.dedent(f"""
        import os, signal
        from rollouts import storage
        with storage.object_writers([{url!r}]) as (out,):
            out.write(b"n" * (3 * storage.WRITE_BLOCK))  # parts uploaded, not completed
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ}, check=False,
                          capture_output=True, timeout=60)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert len(_uploads_in_progress(s3_env, bucket)) == 1  # begun, never completed
    assert storage.read_bytes(url) == b"old\n"


def test_the_output_check_refuses_in_one_line_naming_the_url(s3_server: S3Server) -> None:
    bucket = s3_server.bucket()
    options = s3_server.options()
    check_writable(f"s3://{bucket}/runs/r.jsonl", options)
    assert _fs(s3_server).find(bucket) == []  # the probe object is gone
    cases = [
        ("s3://no-such-bucket-out/runs/r.jsonl", options,
         "cannot write s3://no-such-bucket-out/runs/r.jsonl: bucket 'no-such-bucket-out' does "
         "not exist"),
        (f"s3://{bucket}", options, f"cannot write s3://{bucket}: give an object's name"),
    ]  # fmt: skip
    for url, opts, words in cases:
        with pytest.raises(StorageError) as e:
            check_writable(url, opts)
        assert str(e.value).startswith(words), str(e.value)
        assert e.value.exit_code == 2
    with s3_server.enforcing_auth(), pytest.raises(StorageError) as refused:
        check_writable(f"s3://{bucket}/r.jsonl", s3_server.options(secret="MARKER-out-secret"))
    message = str(refused.value)
    assert message.startswith(f"cannot write s3://{bucket}/r.jsonl: the storage refused the "
                              "credentials (")  # fmt: skip
    assert "MARKER" not in message and "\n" not in message


def test_an_output_object_without_its_run_state_is_refused_and_fresh_deletes_it(
    s3_env: S3Server, tmp_path: Path
) -> None:
    from rollouts.errors import RunConflict
    from rollouts.models import CollectConfig
    from rollouts.run_state import prepare_run_dir, started_from

    bucket = s3_env.bucket()
    out = f"s3://{bucket}/runs/r.jsonl"
    paths = OutputPaths.for_output(out)
    for p in paths.all():
        storage.write_bytes(p, b"{}\n")
    params = {"input_jsonl_fpath": "in.jsonl", "output_jsonl_fpath": out,
              "agent_url": "http://127.0.0.1:1"}  # fmt: skip
    run_dir = tmp_path / "runs" / "r-1"
    with started_from("command line"), pytest.raises(RunConflict) as e:
        prepare_run_dir(CollectConfig(**params), run_dir)
    assert str(e.value).startswith(f"{out} already exists but its run state ({run_dir}) is "
                                   "missing")  # fmt: skip
    assert "add --fresh" in str(e.value)
    prepare_run_dir(CollectConfig(**params, fresh=True), run_dir)
    assert [storage.exists(p) for p in paths.all()] == [False, False, False]
    assert json.loads((run_dir / "run.json").read_text())["output"] == out


def test_a_multi_config_may_write_its_outputs_and_its_mix_to_a_bucket(
    s3_env: S3Server,
) -> None:
    from rollouts.models import MultiDatasetConfig
    from rollouts.request import check_multi_storage

    bucket = s3_env.bucket()
    dataset = {"name": "a", "input": "in.jsonl", "output": f"s3://{bucket}/a/r.jsonl",
               "agent_url": "http://x:1"}  # fmt: skip
    check_multi_storage(MultiDatasetConfig(datasets=[dataset]))
    with pytest.raises(StorageError, match="bucket 'nobkt-x' does not exist"):
        check_multi_storage(MultiDatasetConfig(
            datasets=[{**dataset, "output": "s3://nobkt-x/a/r.jsonl"}]))  # fmt: skip
    mixed = {"proportions": {"a": 1.0}, "output": "mix.jsonl", "total": 2}
    check_multi_storage(MultiDatasetConfig(datasets=[dataset], mix=mixed))  # sources in a bucket
    check_multi_storage(MultiDatasetConfig(
        datasets=[dataset], mix={**mixed, "output": f"s3://{bucket}/mix.jsonl"}))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The command, end to end: a real reference agent, the CLI as a subprocess


def _env(prefect_api: str, tmp_path: Path, s3: dict[str, str], **extra: str) -> dict[str, str]:
    """A user's environment with this server's AWS settings and none of the developer's; the
    machine's cache (the run state of an output in a bucket) in ``tmp_path``."""
    env = user_env(prefect_api, tmp_path / "home", XDG_CACHE_HOME=str(tmp_path / "cache"), **extra)
    return {**{k: v for k, v in env.items() if not k.startswith("AWS_")}, **s3}


def _tasks(n: int) -> bytes:
    return b"".join(json.dumps(t).encode() + b"\n" for t in generate_tasks(n))


def _without_clock(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows but the agent's clock (its responses' created_at)."""
    for row in rows:
        if isinstance(row.get("response"), dict):
            row["response"].pop("created_at", None)
    return rows


def _object_rows(s3: S3Server, url: str) -> list[dict[str, Any]]:
    fs, path = url_to_fs(url, **s3.options())
    return [orjson.loads(line) for line in fs.cat_file(path).splitlines() if line.strip()]


def _cli(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rollouts_cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=180, check=False)  # fmt: skip


def test_an_output_in_a_bucket_holds_the_rows_of_the_same_run_on_disk(
    s3_server: S3Server, start_agent: Any, prefect_api: str, tmp_path: Path
) -> None:
    agent: AgentServer = start_agent("--fail-400-tasks", "3,7")
    bucket = s3_server.bucket()
    url_in = s3_server.put(f"s3://{bucket}/data/tasks.jsonl", _tasks(25))
    out = f"s3://{bucket}/out/r.jsonl"
    env = _env(prefect_api, tmp_path, s3_server.env())
    common = (f"+agent_url={agent.url}", "+num_repeats=2", "+chunk_size=13", "--input", url_in)

    local, _ = collect(env, tmp_path, *common, "--output", "r.jsonl")
    assert local.returncode == 0, local.stderr
    remote, _ = collect(env, tmp_path, *common, "--output", out)
    assert remote.returncode == 0, remote.stderr
    assert "46/50 written, 4 failed, 0 missing; 0/2 chunks from cache" in remote.stdout
    assert out in remote.stdout
    fs = _fs(s3_server)
    names = sorted(p.rsplit("/", 1)[1] for p in fs.find(bucket))
    assert names == ["r.jsonl", "r_aggregate_metrics.json", "r_failures.jsonl", "tasks.jsonl"]
    assert _without_clock(_object_rows(s3_server, out)) == _without_clock(read_jsonl(tmp_path / "r.jsonl"))
    failures = _object_rows(s3_server, f"s3://{bucket}/out/r_failures.jsonl")
    assert failures == read_jsonl(tmp_path / "r_failures.jsonl") and len(failures) == 4
    metrics_url = f"s3://{bucket}/out/r_aggregate_metrics.json"
    metrics = json.loads(fs.cat_file(metrics_url.removeprefix("s3://")))
    assert metrics == json.loads((tmp_path / "r_aggregate_metrics.json").read_bytes())
    # The run state is on this machine, in its cache; nothing beside the working directory.
    run_dirs = list((tmp_path / "cache" / "rollouts" / "runs").glob("r-*/run.json"))
    assert len(run_dirs) == 1 and json.loads(run_dirs[0].read_text())["output"] == out
    assert len(list((tmp_path / ".rollouts").glob("*/run.json"))) == 1  # the local run's
    assert len(agent.requests()) == 100
    before = {p: fs.info(p)["ETag"] for p in fs.find(f"{bucket}/out")}

    again, _ = collect(env, tmp_path, f"+output_jsonl_fpath={out}", *common)
    assert again.returncode == 0, again.stderr
    assert "46/50 written, 4 failed, 0 missing; 2/2 chunks from cache" in again.stdout
    fs = _fs(s3_server)  # a new one: nothing cached
    assert {p: fs.info(p)["ETag"] for p in fs.find(f"{bucket}/out")} == before  # untouched
    assert len(agent.requests()) == 100

    status = _cli(env, tmp_path, "status", out, "--json", "--sample-s", "0")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert (doc["output"], doc["state"], doc["done"], doc["failed"]) == (out, "complete", 46, 4)
    triage = _cli(env, tmp_path, "failures", out, "--json")
    assert triage.returncode == 0, triage.stderr
    report = json.loads(triage.stdout)
    assert report["total"] == 4 and list(report["classes"]) == ["http_400"]
    assert report["failures"] == f"s3://{bucket}/out/r_failures.jsonl"

    retry = _cli(env, tmp_path, "retry", out, "--failure-class", "http_400")
    assert retry.returncode == 0, retry.stderr
    assert "lists 4 rollouts failed with http_400" in retry.stdout
    assert len(agent.requests()) == 104  # those four again, nothing else
    assert _without_clock(_object_rows(s3_server, out)) == _without_clock(read_jsonl(tmp_path / "r.jsonl"))
    assert [p for p in _fs(s3_server).find(bucket) if ".rollouts-probe-" in p] == []


def test_kill_9_then_the_same_command_writes_the_exact_output_object(
    s3_server: S3Server, start_agent: Any, prefect_api: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    agent: AgentServer = start_agent("--latency-ms", "5")
    bucket = s3_server.bucket()
    n = 400
    write_tasks(tmp_path / "tasks.jsonl", n, seed=3)
    url_in = s3_server.put(f"s3://{bucket}/tasks.jsonl", (tmp_path / "tasks.jsonl").read_bytes())
    out = f"s3://{bucket}/runs/rollouts.jsonl"
    env = _env(prefect_api, tmp_path, s3_server.env())
    cmd = [sys.executable, "-m", "rollouts_cli", "collect", f"+agent_url={agent.url}",
           "+num_repeats=2", "+chunk_size=100", "+num_samples_in_parallel=16",
           "--input", url_in, "--output", out]  # fmt: skip
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run_dir = run_dir_for(out, None)

    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    wait_until_written(proc, run_dir, 250, timeout_s=90)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = written_keys(run_dir)
    assert 250 <= len(before) < 2 * n
    assert not storage_exists(s3_server, out)
    requests_before = len(agent.requests())

    rerun = subprocess.run(cmd, check=False, env=env, cwd=tmp_path, capture_output=True,
                           timeout=180)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    rows = _object_rows(s3_server, out)
    assert [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in rows] == [
        (t, r) for t in range(n) for r in range(2)
    ]
    resent = {(q["_ng_task_index"], q["_ng_rollout_index"])
              for q in agent.requests()[requests_before:]}  # fmt: skip
    assert resent.isdisjoint(before)
    assert resent == {(t, r) for t in range(n) for r in range(2)} - before


def storage_exists(s3: S3Server, url: str) -> bool:
    fs, path = url_to_fs(url, **s3.options())
    return bool(fs.exists(path))


def test_a_missing_output_bucket_or_refused_credentials_are_one_line_before_any_request(
    s3_server: S3Server, agent: AgentServer, prefect_api: str, tmp_path: Path
) -> None:
    bucket = s3_server.bucket()
    (tmp_path / "tasks.jsonl").write_bytes(_tasks(5))
    secret = "MARKER-refused-output-secret-3307"
    args = (f"+agent_url={agent.url}", "--input", "tasks.jsonl", "--output")
    env = _env(prefect_api, tmp_path, s3_server.env())
    missing = "s3://no-such-output-bucket/runs/r.jsonl"
    res, _ = collect(env, tmp_path, *args, missing)
    assert assert_one_message(res, 2) == (
        f"rollouts collect: cannot write {missing}: bucket 'no-such-output-bucket' does not "
        "exist\n"
    )
    out = f"s3://{bucket}/runs/r.jsonl"
    bad = _env(prefect_api, tmp_path, s3_server.env(secret=secret))
    with s3_server.enforcing_auth():
        res, _ = collect(bad, tmp_path, *args, out)
    message = assert_one_message(res, 2)
    assert message.startswith(f"rollouts collect: cannot write {out}: the storage refused the "
                              "credentials ("), message  # fmt: skip
    assert message.count("\n") == 1 and secret not in message
    assert agent.requests() == []
    assert not (tmp_path / "cache").exists() and _fs(s3_server).find(bucket) == []


def test_a_multi_dataset_run_writes_a_dataset_output_to_a_bucket(
    s3_server: S3Server, agent: AgentServer, prefect_api: str, tmp_path: Path
) -> None:
    import yaml

    bucket = s3_server.bucket()
    url_in = s3_server.put(f"s3://{bucket}/data/a.jsonl", _tasks(12))
    (tmp_path / "b.jsonl").write_bytes(_tasks(8))
    out_a = f"s3://{bucket}/runs/a.jsonl"
    config = {"datasets": [
        {"name": "a", "input": url_in, "output": out_a, "agent_url": agent.url},
        {"name": "b", "input": "b.jsonl", "output": "b_out.jsonl", "agent_url": agent.url},
    ]}  # fmt: skip
    (tmp_path / "multi.yaml").write_text(yaml.safe_dump(config))
    env = _env(prefect_api, tmp_path, s3_server.env())
    res = _cli(env, tmp_path, "multi", "--config", "multi.yaml")
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(_object_rows(s3_server, out_a)) == 12 and len(read_jsonl(tmp_path / "b_out.jsonl")) == 8
    assert storage_exists(s3_server, f"s3://{bucket}/runs/a_aggregate_metrics.json")


def test_two_machines_on_one_bucket_output_the_second_is_refused_naming_the_first(
    s3_server: S3Server, start_agent: Any, prefect_api: str, tmp_path: Path,
) -> None:  # fmt: skip
    """Each machine has its own run state and flock; the lease object in the bucket is what
    the second one sees (machines told apart here by their cache directories)."""
    agent: AgentServer = start_agent("--latency-ms", "100")
    bucket = s3_server.bucket()
    url_in = s3_server.put(f"s3://{bucket}/tasks.jsonl", _tasks(200))
    out = f"s3://{bucket}/runs/rollouts.jsonl"
    args = ["collect", f"+agent_url={agent.url}", "+num_samples_in_parallel=4",
            "--input", url_in, "--output", out]  # fmt: skip
    first_env = _env(prefect_api, tmp_path / "a", s3_server.env())
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = subprocess.Popen([sys.executable, "-m", "rollouts_cli", *args], env=first_env,
                             cwd=tmp_path / "a", stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        lease = f"{bucket}/runs/.rollouts/"
        fs = _fs(s3_server)
        deadline = time.monotonic() + 60
        while not (fs.exists(lease) and any(p.endswith(".lease") for p in fs.find(lease))):
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            assert time.monotonic() < deadline, "the first run never took its lease"
            time.sleep(0.2)
            fs.invalidate_cache()
        second = _cli(_env(prefect_api, tmp_path / "b", s3_server.env()), tmp_path / "b", *args)
        message = assert_one_message(second, 2)  # RunLocked: the user's to resolve
        assert f"{out} is being collected by " in message and ".lease" in message
        assert f":{first.pid}" in message  # the holder, host:pid
        # Refused before it collected anything (the first run's requests go on meanwhile, so
        # the agent's count cannot tell): no chunk results in the second machine's run state.
        assert not list((tmp_path / "b" / "cache").glob("**/*.rollouts.jsonl"))
    finally:
        first.send_signal(signal.SIGINT)  # a graceful stop gives the lease back
        first.wait(60)
    fs.invalidate_cache()
    assert [p for p in fs.find(f"{bucket}/runs") if p.endswith(".lease")] == []
