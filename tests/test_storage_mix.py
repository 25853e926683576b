"""The mix in a bucket: sources read from object storage (each copied, streamed, to a local
temporary file first: the mix reads rows at random offsets) and the mix written to it with its
manifest beside it, against moto's S3 server on 127.0.0.1 (tests/s3_server.py).

A multi-dataset run with every path in the bucket mixes the same rows as on disk and its rerun
comes from the cache; `rollouts mix` with URLs writes the local mix's bytes; a mix output in a
missing bucket is refused before any dataset starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from conftest import AgentServer, read_jsonl
from fsspec.core import url_to_fs
from s3_server import S3Server
from test_storage_output import _cli, _env, _object_rows, _tasks, _without_clock

from rollouts.mix import mix_manifest
from rollouts_cli.main import main as cli_main


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """This process's storage settings point at the test server."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


def _objects(s3: S3Server, bucket: str) -> dict[str, str]:
    """Every object of the bucket and its ETag (a new filesystem: nothing cached)."""
    fs, _ = url_to_fs("s3://x", **s3.options())
    return {p: fs.info(p)["ETag"] for p in fs.find(bucket)}


def _without_places(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest but where its files are (and the sources' hashes: the agent's clock)."""
    doc = {k: v for k, v in manifest.items() if k != "output"}
    doc["sources"] = {n: {k: v for k, v in s.items() if k not in ("path", "sha256")}
                      for n, s in manifest["sources"].items()}  # fmt: skip
    return doc


@pytest.mark.fast
def test_the_manifest_of_a_mix_url_is_beside_it_in_its_bucket() -> None:
    assert mix_manifest("s3://bkt/runs/train.jsonl") == "s3://bkt/runs/train_manifest.json"
    assert mix_manifest(Path("out/train.jsonl")) == Path("out/train_manifest.json")


def test_a_multi_run_with_every_path_in_a_bucket_mixes_the_rows_of_the_same_run_on_disk(
    s3_server: S3Server, agent: AgentServer, prefect_api: str, tmp_path: Path
) -> None:
    bucket = s3_server.bucket()
    sizes = {"a": 24, "b": 20}
    for name, n in sizes.items():
        (tmp_path / f"{name}.jsonl").write_bytes(_tasks(n))
        s3_server.put(f"s3://{bucket}/data/{name}.jsonl", _tasks(n))

    def config(where: str) -> dict[str, Any]:
        at = f"s3://{bucket}/" if where == "bucket" else "local/"
        return {
            "datasets": [
                {"name": name, "agent_url": agent.url, "num_repeats": 2 if name == "a" else 1,
                 "input": f"{at}data/{name}.jsonl" if where == "bucket" else f"{name}.jsonl",
                 "output": f"{at}runs/{name}.jsonl"}
                for name in sizes
            ],
            "mix": {"output": f"{at}mix/train.jsonl", "total": 30, "seed": 7,
                    "proportions": {"a": 0.5, "b": 0.5}},
        }  # fmt: skip

    for where in ("local", "bucket"):
        (tmp_path / f"{where}.yaml").write_text(yaml.safe_dump(config(where)))
    env = _env(prefect_api, tmp_path, s3_server.env(), TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()

    local = _cli(env, tmp_path, "multi", "--config", "local.yaml")
    assert local.returncode == 0, local.stderr[-3000:]
    remote = _cli(env, tmp_path, "multi", "--config", "bucket.yaml")
    assert remote.returncode == 0, remote.stderr[-3000:]

    out = f"s3://{bucket}/mix/train.jsonl"
    manifest_url = f"s3://{bucket}/mix/train_manifest.json"
    assert f"30 rows -> {out}" in remote.stdout and f"manifest: {manifest_url}" in remote.stdout
    rows = _without_clock(_object_rows(s3_server, out))
    assert rows == _without_clock(read_jsonl(tmp_path / "local" / "mix" / "train.jsonl"))
    assert len(rows) == 30 and {r["_mix_source"] for r in rows} == {"a", "b"}
    manifest = json.loads(_read(s3_server, manifest_url))
    on_disk = json.loads((tmp_path / "local" / "mix" / "train_manifest.json").read_bytes())
    assert _without_places(manifest) == _without_places(on_disk)
    assert manifest["output"] == out
    for name, source in manifest["sources"].items():  # named as given, hashed as read
        url = f"s3://{bucket}/runs/{name}.jsonl"
        assert source["path"] == url
        assert source["sha256"] == hashlib.sha256(_read(s3_server, url)).hexdigest()
    names = sorted(p.removeprefix(f"{bucket}/") for p in _objects(s3_server, bucket))
    assert [n for n in names if n.startswith("mix/")] == ["mix/train.jsonl",
                                                          "mix/train_manifest.json"]  # fmt: skip
    assert not [n for n in names if ".rollouts-probe-" in n]
    assert not list((tmp_path / "tmp").glob("rollouts-mix-*"))  # the local copies are gone
    requests = len(agent.requests())
    assert requests == 2 * (24 * 2 + 20)  # the local run and the bucket run, each its own
    before = _objects(s3_server, bucket)

    again = _cli(env, tmp_path, "multi", "--config", "bucket.yaml")

    assert again.returncode == 0, again.stderr[-3000:]
    assert f"30 rows -> {out} (mix from cache)" in again.stdout
    assert _objects(s3_server, bucket) == before  # nothing rewritten
    assert len(agent.requests()) == requests

    fs, _ = url_to_fs("s3://x", **s3_server.options())
    fs.rm_file(manifest_url.removeprefix("s3://"))  # a mix without its manifest: mixed again
    third = _cli(env, tmp_path, "multi", "--config", "bucket.yaml")

    assert third.returncode == 0, third.stderr[-3000:]
    assert f"30 rows -> {out}\n" in third.stdout  # not from the cache
    assert json.loads(_read(s3_server, manifest_url)) == manifest
    assert _without_clock(_object_rows(s3_server, out)) == rows
    assert len(agent.requests()) == requests


def _read(s3: S3Server, url: str) -> bytes:
    fs, path = url_to_fs(url, **s3.options())
    return bytes(fs.cat_file(path))


def _rollouts(tasks: int, repeats: int, tag: str) -> bytes:
    return b"".join(
        orjson.dumps({"_ng_task_index": t, "_ng_rollout_index": r, "reward": (t * r) % 3,
                      "text": f"{tag}-{t}-{r}"}) + b"\n"
        for t in range(tasks) for r in range(repeats)
    )  # fmt: skip


def test_rollouts_mix_with_urls_writes_the_local_mix_of_the_same_files(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    bucket = s3_env.bucket()
    files = {"a": _rollouts(30, 2, "a"), "b": _rollouts(25, 1, "b")}
    for name, data in files.items():
        (tmp_path / f"{name}.jsonl").write_bytes(data)
        s3_env.put(f"s3://{bucket}/in/{name}.jsonl", data)
    knobs = ["--total", "40", "--seed", "3"]

    def mix(at: str, output: str) -> int:
        return cli_main(["mix", "--source", f"a={at}a.jsonl:0.7", "--source",
                         f"b={at}b.jsonl:0.3", *knobs, "--output", output])  # fmt: skip

    assert mix("", "local.jsonl") == 0
    out = f"s3://{bucket}/out/mix.jsonl"
    capsys.readouterr()
    assert mix(f"s3://{bucket}/in/", out) == 0

    printed = capsys.readouterr().out
    assert f"-> {out}\nmanifest: s3://{bucket}/out/mix_manifest.json" in printed
    assert _read(s3_env, out) == (tmp_path / "local.jsonl").read_bytes()
    manifest = json.loads(_read(s3_env, f"s3://{bucket}/out/mix_manifest.json"))
    on_disk = json.loads((tmp_path / "local_manifest.json").read_bytes())
    assert manifest["output"] == out
    assert {n: s["path"] for n, s in manifest["sources"].items()} == {
        n: f"s3://{bucket}/in/{n}.jsonl" for n in files}
    assert {n: s["sha256"] for n, s in manifest["sources"].items()} == {
        n: s["sha256"] for n, s in on_disk["sources"].items()}
    assert _without_places(manifest) == _without_places(on_disk)
    assert list((tmp_path / "tmp").iterdir()) == []  # the local copies are gone

    missing = f"s3://{bucket}/in/nope.jsonl"
    assert cli_main(["mix", "--source", f"a={missing}:1", *knobs, "--output", "m.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rollouts mix: ") and missing in err and "no such object" in err
    assert list((tmp_path / "tmp").iterdir()) == [] and not (tmp_path / "m.jsonl").exists()
    bad = s3_env.put(f"s3://{bucket}/in/bad.jsonl", files["b"] + b"[1]\n")
    assert cli_main(["mix", "--source", f"a={bad}:1", *knobs, "--output", "m.jsonl"]) == 2
    assert f"  {bad}:26: expected a JSON object" in capsys.readouterr().err  # its URL, line
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_mix_output_in_a_missing_bucket_is_refused_before_any_dataset_starts(
    s3_env: S3Server, agent: AgentServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_bytes(_tasks(5))
    missing = "s3://no-such-mix-bucket/mix/train.jsonl"
    config = {
        "datasets": [{"name": "a", "input": "a.jsonl", "output": "out_a.jsonl",
                      "agent_url": agent.url}],
        "mix": {"output": missing, "total": 5, "proportions": {"a": 1.0}},
    }  # fmt: skip
    (tmp_path / "multi.yaml").write_text(yaml.safe_dump(config))

    assert cli_main(["multi", "--config", "multi.yaml"]) == 2

    err = capsys.readouterr().err
    assert err == (f"rollouts multi: cannot write {missing}: bucket 'no-such-mix-bucket' does "
                   "not exist\n")  # fmt: skip
    assert agent.requests() == []
    assert not (tmp_path / "out_a.jsonl").exists()
