"""Inputs in object storage (rollouts/storage.py): `--input s3://bucket/tasks.jsonl` against a
real S3-compatible server on 127.0.0.1 (moto's, tests/s3_server.py) and a real reference agent.

A URL input gives exactly the rows of the same input on disk, and a rerun comes back from the
cache; bad credentials, a missing bucket or object are refused in one line naming the URL
before anything reaches the agent; the secret reaches no file, no output and no object; a work
directory in a bucket is refused (not supported yet). Outputs in a bucket:
tests/test_storage_output.py.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import RUN_PAGE, AgentServer, read_jsonl
from fsspec.core import url_to_fs
from s3_server import S3Server
from test_cli_console import assert_one_message, collect, user_env

from reference_agent.server import generate_tasks
from rollouts import storage
from rollouts.errors import ConfigError, InputError
from rollouts.models import CollectConfig
from rollouts.request import check_multi_storage
from rollouts.settings import RolloutsSettings
from rollouts.split import split_input
from rollouts.storage import StorageError, check_readable, is_url, object_identity, open_lines

# ---------------------------------------------------------------------------------------------
# The stages alone


@pytest.mark.fast
@pytest.mark.parametrize(
    ("path", "url"),
    [("s3://bkt/tasks.jsonl", True), ("gs://bkt/a/b.jsonl", True), ("az://c/x", True),
     ("memory://x", True), ("file:///tmp/x.jsonl", False), ("/tmp/x.jsonl", False),
     ("tasks.jsonl", False), ("data/s3:/x.jsonl", False), ("C:\\data\\x.jsonl", False)],
)  # fmt: skip
def test_a_url_is_an_fsspec_protocol_other_than_a_local_file(path: str, url: bool) -> None:
    assert is_url(path) is url
    assert is_url(Path(path)) is False


@pytest.mark.fast
def test_storage_options_that_are_not_a_json_object_are_refused_without_their_text() -> None:
    from pydantic import SecretStr

    for text in ('{"secret": "hunter2"', '["hunter2"]'):
        with pytest.raises(ConfigError) as e:
            storage.parse_storage_options(SecretStr(text))
        assert "ROLLOUTS_STORAGE_OPTIONS" in str(e.value) and "hunter2" not in str(e.value)
    assert storage.parse_storage_options(None) == {}
    assert storage.parse_storage_options(SecretStr(' {"anon": true} ')) == {"anon": True}


@pytest.mark.fast
def test_the_storage_options_setting_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLLOUTS_STORAGE_OPTIONS", '{"secret": "hunter2"}')
    settings = RolloutsSettings()
    assert "hunter2" not in repr(settings) and "hunter2" not in settings.model_dump_json()
    assert storage.storage_options() == {"secret": "hunter2"}


@pytest.mark.fast
def test_a_missing_storage_library_names_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib

    registry = importlib.import_module("fsspec.registry")  # `fsspec.registry` is its mapping
    # As if s3fs were not installed.
    monkeypatch.delitem(registry._registry, "s3", raising=False)
    monkeypatch.setitem(registry.known_implementations, "s3",
                        {"class": "no_such_module.S3FileSystem", "err": "Install s3fs"})  # fmt: skip
    with pytest.raises(ConfigError) as e:
        storage.filesystem("s3://bkt/tasks.jsonl", {})
    assert e.value.exit_code == 2
    assert str(e.value) == (
        "cannot read s3://bkt/tasks.jsonl: no filesystem for s3:// is installed: "
        "pip install -e '.[s3]' (s3fs)"
    )
    monkeypatch.setitem(registry.known_implementations, "gs",
                        {"class": "no_such_module.GCSFileSystem", "err": "Install gcsfs"})  # fmt: skip
    monkeypatch.delitem(registry._registry, "gs", raising=False)
    with pytest.raises(ConfigError, match="pip install gcsfs"):
        storage.filesystem("gs://bkt/tasks.jsonl", {})


@pytest.mark.fast
def test_a_work_dir_in_object_storage_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLLOUTS_WORK_DIR", "s3://bkt/work")
    with pytest.raises(ConfigError, match=r"ROLLOUTS_WORK_DIR in object storage \(s3://bkt/work\)"):
        RolloutsSettings()


@pytest.mark.fast
def test_a_url_stays_as_given_where_local_paths_are_made_absolute(tmp_path: Path) -> None:
    config = CollectConfig(input_jsonl_fpath="s3://bkt/tasks.jsonl",
                           output_jsonl_fpath="out.jsonl", agent_url="http://127.0.0.1:1")  # fmt: skip
    stored = config.stored_params()
    assert stored["input_jsonl_fpath"] == "s3://bkt/tasks.jsonl"
    assert stored["output_jsonl_fpath"] == str(tmp_path / "out.jsonl")
    error = InputError("s3://bkt/tasks.jsonl", [(7, "malformed JSON")])
    assert "s3://bkt/tasks.jsonl:7: malformed JSON" in str(error)


@pytest.mark.fast
def test_an_endpoint_is_named_without_credentials() -> None:
    class EndpointConnectionError(Exception):
        def __init__(self) -> None:
            super().__init__('Could not connect to the endpoint URL: "http://u:pw@minio:9000/b/k"')
            self.kwargs = {"endpoint_url": "http://u:pw@minio:9000"}

    assert storage._endpoint_host(EndpointConnectionError()) == "minio:9000"
    assert storage._unreachable(EndpointConnectionError())


# ---------------------------------------------------------------------------------------------
# Against the S3 server, in this process


def _tasks(n: int) -> bytes:
    return b"".join(json.dumps(t).encode() + b"\n" for t in generate_tasks(n))


def test_check_readable_refuses_in_one_line_naming_the_url(s3_server: S3Server) -> None:
    bucket = s3_server.bucket()
    url = s3_server.put(f"s3://{bucket}/tasks.jsonl", _tasks(3))
    options = s3_server.options()
    assert check_readable(url, options)["size"] == len(_tasks(3))

    cases: list[tuple[str, dict[str, Any], type[Exception], str]] = [
        (f"s3://{bucket}/missing.jsonl", options, InputError, "no such object"),
        ("s3://no-such-bucket-here/tasks.jsonl", options, InputError,
         "bucket 'no-such-bucket-here' does not exist"),
        (f"s3://{bucket}", options, InputError, "is a directory"),
    ]  # fmt: skip
    for where, opts, kind, words in cases:
        with pytest.raises(kind) as e:
            check_readable(where, opts)
        assert where in str(e.value) and words in str(e.value), str(e.value)
        assert e.value.exit_code == 2  # type: ignore[attr-defined]

    with s3_server.enforcing_auth(), pytest.raises(StorageError) as refused:
        check_readable(url, s3_server.options(secret="MARKER-bad-secret"))
    message = str(refused.value)
    assert message.startswith(f"cannot read {url}: the storage refused the credentials (")
    assert "MARKER" not in message and "\n" not in message

    closed = {**options, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
              "config_kwargs": {"retries": {"max_attempts": 1}}}  # fmt: skip
    with pytest.raises(StorageError, match="ROLLOUTS_STORAGE_OPTIONS does not suit s3://"):
        check_readable(url, {**options, "no_such_option": 1})
    with pytest.raises(StorageError) as unreachable:
        check_readable(url, closed)
    assert "the storage endpoint 127.0.0.1:9 does not answer" in str(unreachable.value)


def test_an_object_streams_in_lines_across_blocks_and_gzip(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "READ_BLOCK", 7)  # lines longer than a block
    bucket = s3_server.bucket()
    data = b'{"a": 1}\n\n{"b": "a longer line than a block"}\n{"c": 3}'
    for name, body in (("t.jsonl", data), ("t.jsonl.gz", gzip.compress(data))):
        url = s3_server.put(f"s3://{bucket}/{name}", body)
        with open_lines(url, s3_server.options()) as lines:
            assert list(lines) == data.splitlines(keepends=True), name


def test_the_identity_of_an_object_changes_with_its_content(s3_server: S3Server) -> None:
    bucket = s3_server.bucket()
    url = s3_server.put(f"s3://{bucket}/tasks.jsonl", _tasks(3))
    first = object_identity(url, s3_server.options())
    assert first is not None and first[:2] == (url, len(_tasks(3))) and first[2]
    assert object_identity(url, s3_server.options()) == first
    s3_server.put(url, _tasks(3).replace(b"1", b"2"))  # same size, other content
    assert object_identity(url, s3_server.options()) not in (first, None)
    assert object_identity(f"s3://{bucket}/missing", s3_server.options()) is None


def test_split_names_the_url_and_line_of_a_bad_row(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.bucket()
    url = s3_server.put(f"s3://{bucket}/bad.jsonl", _tasks(3) + b"[1]\n")
    with pytest.raises(InputError) as e:
        split_input(url, tmp_path / "run", run_id="r", chunk_size=2)
    assert f"  {url}:4: expected a JSON object, got list" in str(e.value)
    assert not list((tmp_path / "run" / "chunks").glob("*"))


def test_a_multi_config_is_checked_before_any_dataset(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rollouts.models import MultiDatasetConfig

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.bucket()
    url = s3_server.put(f"s3://{bucket}/tasks.jsonl", _tasks(3))
    dataset = {"name": "a", "input": url, "output": "a.jsonl", "agent_url": "http://x:1"}
    check_multi_storage(MultiDatasetConfig(datasets=[dataset]))
    with pytest.raises(InputError, match="no such object"):
        check_multi_storage(MultiDatasetConfig(datasets=[{**dataset, "input": url + "x"}]))
    mixed = {"proportions": {"a": 1.0}, "output": f"s3://{bucket}/mix.jsonl", "total": 2}
    check_multi_storage(MultiDatasetConfig(datasets=[dataset], mix=mixed))  # a bucket it can write
    with pytest.raises(StorageError, match=r"cannot write s3://nobkt-mix/m\.jsonl: bucket"):
        check_multi_storage(MultiDatasetConfig(
            datasets=[dataset], mix={**mixed, "output": "s3://nobkt-mix/m.jsonl"}))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The command, end to end: a real reference agent, the CLI as a subprocess


def _env(prefect_api: str, home: Path, s3: dict[str, str], **extra: str) -> dict[str, str]:
    """A user's environment with this server's AWS settings and none of the developer's."""
    env = user_env(prefect_api, home, **extra)
    return {**{k: v for k, v in env.items() if not k.startswith("AWS_")}, **s3}


def _split_state(stderr: str) -> str:
    """The state of the `split` task of the flow run whose page `stderr` names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    page = RUN_PAGE.match(stderr)
    assert page, stderr
    run_id = page.group(0).rstrip().rsplit("/", 1)[1]

    async def read() -> str:
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
            )
        (split,) = [r for r in runs if r.name == "split"]
        assert split.state is not None
        return split.state.name

    return asyncio.run(read())


def _rows(path: Path) -> list[dict[str, Any]]:
    """The output's rows, in order, but the agent's clock (its responses' created_at)."""
    rows = read_jsonl(path)
    for row in rows:
        row["response"].pop("created_at")
    return rows


def test_an_input_in_a_bucket_gives_the_rows_of_the_same_input_on_disk(
    s3_server: S3Server, agent: AgentServer, prefect_api: str, tmp_path: Path
) -> None:
    bucket = s3_server.bucket()
    data = _tasks(30)
    url = s3_server.put(f"s3://{bucket}/data/tasks.jsonl", data)
    (tmp_path / "tasks.jsonl").write_bytes(data)
    env = _env(prefect_api, tmp_path / "home", s3_server.env())
    common = (f"+agent_url={agent.url}", "+num_repeats=2", "+chunk_size=16")

    local, _ = collect(env, tmp_path, *common, "--input", "tasks.jsonl", "--output", "local.jsonl")
    assert local.returncode == 0, local.stderr
    remote, _ = collect(env, tmp_path, *common, "--input", url, "--output", "remote.jsonl")
    assert remote.returncode == 0, remote.stderr
    assert "60/60 written, 0 failed, 0 missing; 0/2 chunks from cache" in remote.stdout
    assert _rows(tmp_path / "remote.jsonl") == _rows(tmp_path / "local.jsonl")
    run_json = next((tmp_path / ".rollouts").glob("remote-*/run.json"))
    assert json.loads(run_json.read_text())["params"]["input_jsonl_fpath"] == url

    again, _ = collect(env, tmp_path, *common, f"+input_jsonl_fpath={url}",
                       "+output_jsonl_fpath=remote.jsonl")  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "60/60 written, 0 failed, 0 missing; 2/2 chunks from cache" in again.stdout
    assert _split_state(again.stderr) == "Cached"  # the object was not read again
    assert len(agent.requests()) == 120  # 60 each for the two first runs, none for the rerun


def test_bad_credentials_a_missing_bucket_or_object_are_refused_before_any_request(
    s3_server: S3Server, agent: AgentServer, prefect_api: str, tmp_path: Path
) -> None:
    bucket = s3_server.bucket()
    url = s3_server.put(f"s3://{bucket}/tasks.jsonl", _tasks(5))
    secret = "MARKER-refused-secret-0451"
    env = _env(prefect_api, tmp_path / "home", s3_server.env())
    args = (f"+agent_url={agent.url}", "--output", "out.jsonl", "--input")
    cases = [
        (f"s3://{bucket}/nothing-here.jsonl", env, "no such object"),
        ("s3://no-such-bucket-xyz/tasks.jsonl", env, "bucket 'no-such-bucket-xyz' does not exist"),
    ]
    for where, run_env, words in cases:
        res, _ = collect(run_env, tmp_path, *args, where)
        message = assert_one_message(res, 2)
        assert f"invalid input {where}" in message and words in message, message
    bad = _env(prefect_api, tmp_path / "home", s3_server.env(secret=secret))
    with s3_server.enforcing_auth():
        res, _ = collect(bad, tmp_path, *args, url)
    message = assert_one_message(res, 2)
    assert message.startswith(f"rollouts collect: cannot read {url}: the storage refused the "
                              "credentials"), message  # fmt: skip
    assert message.count("\n") == 1 and secret not in message
    assert agent.requests() == []
    assert not (tmp_path / ".rollouts").exists() and not (tmp_path / "out.jsonl").exists()


def _files_holding(root: Path, markers: list[str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {m}" for m in markers if m.encode() in data]
    return found


def test_the_secret_reaches_no_file_and_no_output(
    s3_server: S3Server, agent: AgentServer, prefect_api: str, tmp_path: Path
) -> None:
    """An input in the bucket, with the credentials from the environment (the output on disk)
    and from ROLLOUTS_STORAGE_OPTIONS (the output in the bucket too)."""
    bucket = s3_server.bucket()
    url = s3_server.put(f"s3://{bucket}/tasks.jsonl", _tasks(20))
    from_env, from_options = "MARKER-env-secret-7731", "MARKER-options-secret-9942"
    home = tmp_path / "home"
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}  # the run state of the bucket's output
    by_env = _env(prefect_api, home, s3_server.env(secret=from_env), **cache)
    options = json.dumps({"key": "k", "secret": from_options,
                          "client_kwargs": {"endpoint_url": s3_server.endpoint}})  # fmt: skip
    by_options = _env(prefect_api, home, {"AWS_EC2_METADATA_DISABLED": "true",
                                          "AWS_CONFIG_FILE": "/nonexistent",
                                          "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"},
                      ROLLOUTS_STORAGE_OPTIONS=options, **cache)  # fmt: skip
    outputs = []
    for env, output in ((by_env, "out/env.jsonl"), (by_options, f"s3://{bucket}/out/options.jsonl")):
        res, _ = collect(env, tmp_path, f"+agent_url={agent.url}", "--input", url,
                         "--output", output, "--verbose")  # fmt: skip
        assert res.returncode == 0, res.stderr
        outputs.append(res.stdout + res.stderr)
    markers = [from_env, from_options]
    assert not [m for m in markers for text in outputs if m in text]
    assert _files_holding(tmp_path, markers) == []  # outputs, run state, PREFECT_HOME, cache
    assert (tmp_path / "cache" / "rollouts" / "runs").is_dir()
    fs, _ = url_to_fs(url, **s3_server.options())
    objects = fs.find(bucket)
    assert len(objects) == 4  # the input, and the three objects of the output
    assert [(o, m) for o in objects for m in markers if m.encode() in fs.cat_file(o)] == []
    assert len(agent.requests()) == 40


def test_a_work_dir_in_a_bucket_is_refused_in_one_line(
    s3_server: S3Server, agent: AgentServer, prefect_api: str, tmp_path: Path
) -> None:
    bucket = s3_server.bucket()
    url = s3_server.put(f"s3://{bucket}/tasks.jsonl", _tasks(3))
    env = _env(prefect_api, tmp_path / "home", s3_server.env())
    work = {**env, "ROLLOUTS_WORK_DIR": f"s3://{bucket}/work"}
    res, _ = collect(work, tmp_path, f"+agent_url={agent.url}", "--input", url,
                     "--output", "out.jsonl")  # fmt: skip
    message = assert_one_message(res, 2)
    assert re.fullmatch(r"rollouts collect: ROLLOUTS_WORK_DIR in object storage \(s3://\S+\) "
                        r"is not supported yet: set it to a local or shared path\n", message)  # fmt: skip
    assert agent.requests() == []


@pytest.mark.fast
def test_a_password_in_a_path_url_is_refused_before_it_is_stored() -> None:
    """A path is stored as given (flow parameters, run.json, the mix manifest): a URL with a
    password in it is refused, naming the field, never showing the password; a user name
    alone (Azure's container@account) is a name, not a secret."""
    from pydantic import ValidationError

    from rollouts.models import CollectConfig, MixConfig
    from rollouts.request import validated_config

    with pytest.raises(ConfigError) as refused:
        validated_config({"input_jsonl_fpath": "https://u:hunter2@host/t.jsonl",
                          "output_jsonl_fpath": "out.jsonl"})  # fmt: skip
    assert "input_jsonl_fpath holds a password in its URL" in str(refused.value)
    assert "hunter2" not in str(refused.value)
    with pytest.raises(ValidationError, match="output holds a password"):
        MixConfig(output="s3://key:hunter2@bkt/mix.jsonl", total=10, proportions={"a": 1.0})
    CollectConfig(input_jsonl_fpath="abfs://container@account.dfs.core.windows.net/t.jsonl",
                  output_jsonl_fpath="out.jsonl")  # fmt: skip
