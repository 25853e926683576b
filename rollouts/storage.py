"""Object storage (s3://, gs://, az://, any fsspec URL) where a run reads its input and writes
its output files.

A path is either local (a path, or a ``file://`` URL) or a URL of another fsspec protocol.
Local paths keep every behaviour they had; a URL is opened through fsspec with the options of
ROLLOUTS_STORAGE_OPTIONS (JSON, secret), else the storage library's own settings (for S3:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE, ...).

Never logged, stored or pickled: the options, and a filesystem object (its ``to_json()`` and
its pickle hold the credentials; its repr does not). Errors name the URL and the storage's
short reason, never an option.

An output in a bucket is written as a whole or not at all (``output_writers``: a multipart
upload completed only once every byte is uploaded; a crash leaves the old object or none), and
so is a mix's output with its manifest (rollouts/mix.py, which reads a source in a bucket from
a local copy). A run state in a bucket (ROLLOUTS_WORK_DIR) is not supported yet (settings.py).
A location is a ``Path`` (local) or a ``str`` (a URL): ``local_or_url`` makes one, and the
helpers here (``exists``, ``remove``, ``iter_lines``, ...) take either, the local one exactly
as rollouts/fileio.py does it.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import SecretStr

from rollouts import fileio
from rollouts.errors import ConfigError, InputError
from rollouts.urls import redact

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

STORAGE_OPTIONS_ENV = "ROLLOUTS_STORAGE_OPTIONS"
_LOCAL_PROTOCOLS = frozenset({"file", "local"})
# What to install for a protocol whose implementation is missing.
_INSTALL = {
    "s3": "pip install -e '.[s3]' (s3fs)",
    "s3a": "pip install -e '.[s3]' (s3fs)",
    "gs": "pip install gcsfs",
    "gcs": "pip install gcsfs",
    "az": "pip install adlfs",
    "abfs": "pip install adlfs",
    "abfss": "pip install adlfs",
    "adl": "pip install adlfs",
}
# A URL's input is read this many bytes at a time (s3fs's own block is 50 MiB).
READ_BLOCK = 4 * 2**20
# An output object is uploaded this many bytes at a time (a multipart upload's part; S3 takes
# parts of 5 MiB and more): memory holds one part per object being written.
WRITE_BLOCK = 8 * 2**20
# The object the pre-flight check writes and deletes beside an output in a bucket.
PROBE_PREFIX = ".rollouts-probe-"
_REASON_CHARS = 160


class StorageError(ConfigError):
    """Object storage refused a request or could not be reached (credentials, endpoint): the
    caller must change a setting first."""


def is_url(path: str | Path) -> bool:
    """Whether ``path`` is a URL of object storage (an fsspec protocol other than a local
    file); a local path, relative or absolute, is not."""
    if isinstance(path, Path):
        return False
    from fsspec.core import split_protocol

    protocol, _ = split_protocol(path)
    return protocol is not None and protocol not in _LOCAL_PROTOCOLS


Location = Path | str  # a local path (Path), or a URL of object storage (str)


def password_in(path: str) -> bool:
    """Whether ``path`` is a URL with a password in it (``https://user:pass@host/...``): a
    path is stored as given (flow parameters, run.json, manifests), so it must hold none."""
    if not is_url(path):
        return False
    from urllib.parse import urlsplit

    try:
        return urlsplit(path).password is not None
    except ValueError:
        return False


def local_or_url(path: str | Path) -> Location:
    """A URL as given (a str), a local path as a Path."""
    return path if isinstance(path, str) and is_url(path) else Path(path)


def _url(location: Location) -> str | None:
    return location if isinstance(location, str) and is_url(location) else None


def name_of(location: Location) -> str:
    """The file or object name: ``rollouts.jsonl`` of ``s3://b/runs/rollouts.jsonl``."""
    url = _url(location)
    return url.rstrip("/").rpartition("/")[2] if url is not None else Path(location).name


def stem_of(location: Location) -> str:
    """The name without its last suffix, as ``Path.stem``."""
    return PurePosixPath(name_of(location)).stem


def sibling(location: Location, name: str) -> Location:
    """The file named ``name`` beside ``location``: in its folder, or its URL's prefix (a
    Path would fold ``s3://`` into ``s3:/``)."""
    url = _url(location)
    if url is None:
        return Path(location).with_name(name)
    return f"{url.rstrip('/').rpartition('/')[0]}/{name}"


def parent_of(location: Location) -> Location:
    """The folder of ``location``, or its URL's prefix (``s3://b/runs``)."""
    url = _url(location)
    return Path(location).parent if url is None else url.rstrip("/").rpartition("/")[0]


def parse_storage_options(secret: SecretStr | None) -> dict[str, Any]:
    """ROLLOUTS_STORAGE_OPTIONS as fsspec's keyword arguments; ConfigError, without its text
    (it holds secrets), when it is not a JSON object."""
    if secret is None:
        return {}
    text = secret.get_secret_value()
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:  # its message has a position, none of the text
        raise ConfigError(f"{STORAGE_OPTIONS_ENV} is not JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(value, dict):
        raise ConfigError(
            f"{STORAGE_OPTIONS_ENV} must be a JSON object of fsspec options, e.g. "
            '{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}; got a '
            f"{type(value).__name__}"
        )
    return value


def storage_options() -> dict[str, Any]:
    """The process's storage options (ROLLOUTS_STORAGE_OPTIONS, .env)."""
    from rollouts.settings import RolloutsSettings  # settings imports this module

    return parse_storage_options(RolloutsSettings().storage_options)


def filesystem(
    url: str, options: Mapping[str, Any] | None = None
) -> tuple[AbstractFileSystem, str]:
    """The filesystem of ``url`` and the URL's path in it. ``options``: fsspec's keyword
    arguments (default: ``storage_options()``). ConfigError when the protocol's
    implementation is not installed or not known."""
    from fsspec.core import split_protocol, url_to_fs

    opts = storage_options() if options is None else dict(options)
    protocol = split_protocol(url)[0] or "file"
    try:
        return url_to_fs(url, **opts)  # type: ignore[no-any-return]
    except ImportError:
        install = _INSTALL.get(protocol.split("::")[-1], "install its fsspec implementation")
        raise ConfigError(
            f"cannot read {url}: no filesystem for {protocol}:// is installed: {install}"
        ) from None
    except ValueError as e:
        if "protocol" in str(e).lower():
            raise ConfigError(f"cannot read {url}: {protocol}:// is not a known protocol") from None
        raise ConfigError(f"cannot read {url}: {_short(e)}") from None
    except TypeError as e:  # an option the filesystem does not take: named, not its value
        raise ConfigError(
            f"cannot read {url}: {STORAGE_OPTIONS_ENV} does not suit {protocol}:// "
            f"({_short(e)})"
        ) from None


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = redact(text)
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def _endpoint_host(error: BaseException) -> str | None:
    """host:port of the endpoint an error names (botocore's endpoint_url, or a URL in its
    message), without any user or password."""
    kwargs = getattr(error, "kwargs", None)
    candidates = [kwargs.get("endpoint_url")] if isinstance(kwargs, dict) else []
    candidates.append(str(error))
    for text in candidates:
        if not isinstance(text, str):
            continue
        match = re.search(r"[a-z][a-z0-9+.-]*://(?:[^@/\s\"']*@)?([^/\s\"']+)", text)
        if match:
            return match.group(1)
    return None


def _unreachable(error: BaseException) -> bool:
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    names = [c.__name__ for c in type(error).__mro__]
    return any(n in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionError",
                     "ClientConnectorError", "ServerTimeoutError") for n in names)  # fmt: skip


def _no_credentials(error: BaseException) -> bool:
    return any(c.__name__ in ("NoCredentialsError", "PartialCredentialsError")
               for c in type(error).__mro__)  # fmt: skip


def _bucket_missing(fs: AbstractFileSystem, path: str, error: FileNotFoundError) -> bool:
    if "bucket" in str(error).lower():
        return True
    bucket = path.split("/", 1)[0]
    if not bucket or bucket == path:
        return False
    try:
        fs.info(bucket)
    except FileNotFoundError:
        return True
    except Exception:  # refused or unreachable: say what the object's request said
        return False
    return False


@contextlib.contextmanager
def storage_errors(
    url: str, fs: AbstractFileSystem, path: str, action: str = "read"
) -> Iterator[None]:
    """The storage library's errors on ``url`` as one-line errors naming it: refused
    credentials and an unreachable endpoint are StorageError; a missing bucket or object an
    InputError when reading, a StorageError when writing (``action="write"``)."""
    try:
        yield
    except Exception as e:
        error = _translated(e, url, fs, path, action)
        if error is None:
            raise
        raise error from None


def _translated(
    e: Exception, url: str, fs: AbstractFileSystem, path: str, action: str
) -> Exception | None:
    """``storage_errors``'s one-line error for ``e``; None for an error that is not the
    storage's (it passes unchanged)."""
    verb = f"cannot {action} {url}"
    if isinstance(e, PermissionError):
        return StorageError(
            f"{verb}: the storage refused the credentials ({_short(e)}); set them "
            "in the storage library's environment (for S3: AWS_ACCESS_KEY_ID, "
            f"AWS_SECRET_ACCESS_KEY or AWS_PROFILE) or {STORAGE_OPTIONS_ENV}"
        )
    if isinstance(e, FileNotFoundError):
        bucket = path.split("/", 1)[0]
        missing_bucket = _bucket_missing(fs, path, e)
        if action != "read":
            what = f"bucket {bucket!r} does not exist" if missing_bucket else f"not found ({_short(e)})"
            return StorageError(f"{verb}: {what}")
        if missing_bucket:
            return InputError(url, [(None, f"bucket {bucket!r} does not exist")])
        return InputError(url, [(None, "no such object")])
    if isinstance(e, IsADirectoryError):
        if action != "read":
            return StorageError(f"{verb}: it is a directory (a prefix), expected an object name")
        return InputError(url, [(None, "is a directory (a prefix), expected a JSONL object")])
    if isinstance(e, TypeError):
        if "unexpected keyword argument" not in str(e):
            return None
        protocol = url.split("://", 1)[0]
        return StorageError(  # the option's name, not its value
            f"{verb}: {STORAGE_OPTIONS_ENV} does not suit {protocol}:// ({_short(e)})"
        )
    if _no_credentials(e):
        return StorageError(
            f"{verb}: no credentials found ({_short(e)}); set AWS_ACCESS_KEY_ID "
            f"and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or {STORAGE_OPTIONS_ENV}"
        )
    if _unreachable(e):
        host = _endpoint_host(e)
        where = f"the storage endpoint {host}" if host else "the storage endpoint"
        return StorageError(
            f"{verb}: {where} does not answer ({type(e).__name__}); check "
            f"AWS_ENDPOINT_URL or the endpoint in {STORAGE_OPTIONS_ENV}"
        )
    if isinstance(e, OSError) or _storage_library_error(e):
        return StorageError(f"{verb}: {type(e).__name__}: {_short(e)}")
    return None


def _storage_library_error(e: BaseException) -> bool:
    """The storage library's own refusals (botocore's: an invalid bucket name, a malformed
    endpoint), a malformed value, or an operation its protocol does not have (writing to
    https://): the user's to fix, in one line."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"BotoCoreError", "ClientError"}) or isinstance(
        e, ValueError | NotImplementedError
    )


def check_readable(url: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The object's info (size, ETag, ...) when ``url`` names one this process may read;
    otherwise the one-line error that says why (see ``storage_errors``)."""
    fs, path = filesystem(url, options)
    with storage_errors(url, fs, path):
        info: dict[str, Any] = fs.info(path)
    if info.get("type") == "directory":
        raise InputError(url, [(None, "is a directory (a prefix), expected a JSONL object")])
    return info


_VERSION_KEYS = ("etag", "md5hash", "generation", "lastmodified", "last_modified", "updated",
                 "mtime", "created")  # fmt: skip


def object_identity(url: str, options: Mapping[str, Any] | None = None) -> tuple[str, int, str] | None:
    """(url, size, version: its ETag, else its last modification) of the object, or None
    when it cannot be read (the stage that reads it says why)."""
    try:
        info = check_readable(url, options)
    except Exception:
        return None
    by_key = {str(k).lower(): v for k, v in info.items()}
    version = next((str(by_key[k]) for k in _VERSION_KEYS if by_key.get(k)), "")
    return (url, int(info.get("size") or 0), version)


@contextlib.contextmanager
def open_lines(url: str, options: Mapping[str, Any] | None = None) -> Iterator[Iterator[bytes]]:
    """The lines of the object at ``url`` (each with its b"\\n" but the last), streamed a block
    at a time: memory holds one block and one line. A name ending in .gz, .bz2, .xz, .zst
    is decompressed. Storage errors are those of ``storage_errors``."""
    fs, path = filesystem(url, options)
    with storage_errors(url, fs, path):
        f = fs.open(path, "rb", block_size=READ_BLOCK, compression="infer")
    try:
        yield _lines(f, url, fs, path)
    finally:
        with contextlib.suppress(Exception):
            f.close()


def _lines(f: Any, url: str, fs: AbstractFileSystem, path: str) -> Iterator[bytes]:
    # fsspec's own readline reads a whole block per line; this splits blocks instead.
    rest = b""
    while True:
        with storage_errors(url, fs, path):
            block: bytes = f.read(READ_BLOCK)
        if not block:
            break
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest


# ---------------------------------------------------------------------------------------------
# Output files: a local path exactly as rollouts/fileio.py writes it, or an object in a bucket


class Writer(Protocol):
    """What the output writers hand out: bytes in, nothing else."""

    def write(self, data: bytes, /) -> object: ...


def exists(location: Location) -> bool:
    """Whether the file or object exists (an unreadable bucket: ``storage_errors``)."""
    url = _url(location)
    if url is None:
        return Path(location).exists()
    fs, path = filesystem(url)
    with storage_errors(url, fs, path):
        return bool(fs.exists(path))


def size_of(location: Location) -> int | None:
    """Its size in bytes, or None when it does not exist."""
    url = _url(location)
    if url is None:
        try:
            return Path(location).stat().st_size
        except FileNotFoundError:
            return None
    fs, path = filesystem(url)
    try:
        with storage_errors(url, fs, path):
            return int(fs.info(path).get("size") or 0)
    except InputError:  # no such object (or bucket: the pre-flight check names it)
        return None


def remove(location: Location) -> None:
    """Delete the file or object; one that does not exist is not an error."""
    url = _url(location)
    if url is None:
        Path(location).unlink(missing_ok=True)
        return
    fs, path = filesystem(url)
    with contextlib.suppress(FileNotFoundError), storage_errors(url, fs, path, "delete"):
        fs.rm_file(path)


def read_bytes(location: Location) -> bytes:
    url = _url(location)
    if url is None:
        return Path(location).read_bytes()
    fs, path = filesystem(url)
    with storage_errors(url, fs, path):
        return bytes(fs.cat_file(path))


def write_bytes(location: Location, data: bytes) -> None:
    """The file (atomically: rollouts/fileio.py) or the object (one request), whole."""
    with output_writers([location]) as (out,):
        out.write(data)


def iter_lines(location: Location) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its newline) of a JSONL file or object, streamed;
    blank lines skipped (``fileio.iter_lines``)."""
    url = _url(location)
    if url is None:
        yield from fileio.iter_lines(Path(location))
        return
    with open_lines(url) as lines:
        for number, raw in enumerate(lines, start=1):
            line = raw.rstrip(b"\r\n")
            if line.strip():
                yield number, line


@contextlib.contextmanager
def output_writers(locations: Sequence[Location]) -> Iterator[list[Writer]]:
    """Files that belong together (rollouts and failures), each written as a whole or not at
    all. Local paths: ``fileio.atomic_writers`` (temp file, fsync, rename), unchanged. URLs:
    ``object_writers``."""
    urls = [_url(loc) for loc in locations]
    if all(u is None for u in urls):
        with fileio.atomic_writers([Path(loc) for loc in locations]) as files:
            yield list(files)
        return
    if any(u is None for u in urls):
        raise ValueError(f"outputs both local and in object storage: {list(locations)}")
    with object_writers([u for u in urls if u is not None]) as writers:
        yield list(writers)


@contextlib.contextmanager
def open_output(location: Location) -> Iterator[Writer]:
    """One file or object, written as a whole or not at all (``output_writers``)."""
    with output_writers([location]) as (out,):
        yield out


class _ObjectWriter:
    """An object being uploaded: its bytes go to the store a part at a time (``WRITE_BLOCK``),
    and it appears only at ``commit``. The storage's errors name the URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.path = filesystem(url)
        if "/" not in self.path.strip("/"):
            raise StorageError(f"cannot write {url}: give an object's name in the bucket, "
                               f"e.g. {url.rstrip('/')}/rollouts.jsonl")  # fmt: skip
        with storage_errors(url, self.fs, self.path, "write"):
            # Not committed at close: the object appears at ``commit``, once every part of
            # every object of the group is uploaded.
            self.file: Any = self.fs.open(self.path, "wb", block_size=WRITE_BLOCK,
                                          autocommit=False)  # fmt: skip

    def write(self, data: bytes, /) -> int:
        try:
            return int(self.file.write(data))
        except Exception as e:
            error = _translated(e, self.url, self.fs, self.path, "write")
            if error is None:
                raise
            raise error from None

    def upload(self) -> None:
        """Every byte uploaded (the last part), nothing committed yet."""
        with storage_errors(self.url, self.fs, self.path, "write"):
            self.file.close()

    def commit(self) -> None:
        with storage_errors(self.url, self.fs, self.path, "write"):
            self.file.commit()

    def discard(self) -> None:
        """Abort the upload (its parts are deleted); the old object, if any, stays."""
        with contextlib.suppress(Exception):
            self.file.discard()
        self.file.closed = True  # discarded: nothing left for close() (or __del__) to upload


@contextlib.contextmanager
def object_writers(urls: Sequence[str]) -> Iterator[list[_ObjectWriter]]:
    """Objects that belong together, written as a whole or not at all: each a multipart
    upload (memory holds one part per object), completed only once every object's last part
    is uploaded, one right after the other. An error in the block, or a crash, completes
    none: the old objects stay (an upload cut by a crash is never completed; the bucket's
    lifecycle rule for incomplete multipart uploads clears its parts)."""
    writers: list[_ObjectWriter] = []
    try:
        for url in urls:
            writers.append(_ObjectWriter(url))
        yield writers
        for w in writers:
            w.upload()
    except BaseException:
        for w in writers:
            w.discard()
        raise
    done = 0
    try:
        for w in writers:
            w.commit()
            done += 1
    except BaseException:
        for w in writers[done:]:
            w.discard()
        raise


def check_writable(url: str, options: Mapping[str, Any] | None = None) -> None:
    """Before any request: the output's bucket exists and this process may write and delete
    in it (a small probe object beside the output, ``<prefix>/.rollouts-probe-<uuid>``);
    otherwise the one-line error naming ``url`` (``storage_errors``)."""
    fs, path = filesystem(url, options)
    if "/" not in path.strip("/"):
        raise StorageError(f"cannot write {url}: give an object's name in the bucket, e.g. "
                           f"{url.rstrip('/')}/rollouts.jsonl")  # fmt: skip
    probe = f"{path.rstrip('/').rpartition('/')[0]}/{PROBE_PREFIX}{uuid.uuid4().hex}"
    with storage_errors(url, fs, path, "write"):
        fs.pipe_file(probe, b"")
    with storage_errors(url, fs, path, "write"):
        fs.rm_file(probe)
