"""Object storage (s3://, gs://, az://, any fsspec URL) where a run reads its input.

A path is either local (a path, or a ``file://`` URL) or a URL of another fsspec protocol.
Local paths keep every behaviour they had; a URL is opened through fsspec with the options of
ROLLOUTS_STORAGE_OPTIONS (JSON, secret), else the storage library's own settings (for S3:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE, ...).

Never logged, stored or pickled: the options, and a filesystem object (its ``to_json()`` and
its pickle hold the credentials; its repr does not). Errors name the URL and the storage's
short reason, never an option.

Outputs and run state in a bucket are not supported yet: ``refuse_output_url`` says so.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

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


def local_or_url(path: str | Path) -> Path | str:
    """A URL as given (a str), a local path as a Path."""
    return path if isinstance(path, str) and is_url(path) else Path(path)


def refuse_output_url(path: str | Path, what: str = "output") -> None:
    """ConfigError for an output (or run state) in object storage: the next stage builds it."""
    if is_url(path):
        raise ConfigError(
            f"{what} in object storage ({path}) is not supported yet: write it to a local or "
            "shared path"
        )


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
        raise
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
def storage_errors(url: str, fs: AbstractFileSystem, path: str) -> Iterator[None]:
    """The storage library's errors on ``url`` as one-line errors naming it: refused
    credentials and an unreachable endpoint are StorageError, a missing bucket or object an
    InputError."""
    try:
        yield
    except PermissionError as e:
        raise StorageError(
            f"cannot read {url}: the storage refused the credentials ({_short(e)}); set them "
            "in the storage library's environment (for S3: AWS_ACCESS_KEY_ID, "
            f"AWS_SECRET_ACCESS_KEY or AWS_PROFILE) or {STORAGE_OPTIONS_ENV}"
        ) from None
    except FileNotFoundError as e:
        bucket = path.split("/", 1)[0]
        if _bucket_missing(fs, path, e):
            raise InputError(url, [(None, f"bucket {bucket!r} does not exist")]) from None
        raise InputError(url, [(None, "no such object")]) from None
    except IsADirectoryError:
        raise InputError(url, [(None, "is a directory (a prefix), expected a JSONL object")]) from None
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        protocol = url.split("://", 1)[0]
        raise StorageError(  # the option's name, not its value
            f"cannot read {url}: {STORAGE_OPTIONS_ENV} does not suit {protocol}:// ({_short(e)})"
        ) from None
    except Exception as e:
        if _no_credentials(e):
            raise StorageError(
                f"cannot read {url}: no credentials found ({_short(e)}); set AWS_ACCESS_KEY_ID "
                f"and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or {STORAGE_OPTIONS_ENV}"
            ) from None
        if _unreachable(e):
            host = _endpoint_host(e)
            where = f"the storage endpoint {host}" if host else "the storage endpoint"
            raise StorageError(
                f"cannot read {url}: {where} does not answer ({type(e).__name__}); check "
                f"AWS_ENDPOINT_URL or the endpoint in {STORAGE_OPTIONS_ENV}"
            ) from None
        if isinstance(e, OSError):
            raise StorageError(f"cannot read {url}: {type(e).__name__}: {_short(e)}") from None
        raise


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
