"""An S3-compatible server on 127.0.0.1 for the tests: moto's standalone server (`moto[server]`,
a dev dependency), as s3fs and prefect-aws test themselves.

One server per session (it starts in about half a second); each test makes its own buckets.
Nothing is set process-wide: a test passes `S3Server.env()` to the subprocesses it starts, or
`S3Server.options()` to rollouts/storage.py's functions. Authentication is off (any key is
accepted) except inside `enforcing_auth()`, where moto refuses keys it did not issue.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs

KEY, SECRET = "testing-key", "testing-secret"


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen[bytes]

    def options(self, key: str = KEY, secret: str = SECRET) -> dict[str, Any]:
        """fsspec options for this server; a new filesystem object every time (s3fs caches
        instances by options, and a cached one would hide a change of credentials)."""
        return {
            "key": key, "secret": secret, "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": self.endpoint},
        }  # fmt: skip

    def env(self, key: str = KEY, secret: str = SECRET) -> dict[str, str]:
        """A subprocess's AWS settings for this server, and none of the developer's own
        (profiles, config files, the instance metadata service)."""
        return {
            "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_EC2_METADATA_DISABLED": "true",
        }  # fmt: skip

    def bucket(self) -> str:
        """A new bucket of this test's own."""
        name = f"t{uuid.uuid4().hex[:16]}"
        fs, _ = url_to_fs(f"s3://{name}", **self.options())
        fs.mkdir(name)
        return name

    def put(self, url: str, data: bytes) -> str:
        fs, path = url_to_fs(url, **self.options())
        fs.pipe(path, data)
        return url

    def _auth(self, value: bytes) -> None:
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth", data=value, method="POST",
            headers={"Content-Type": "text/plain"},
        )  # fmt: skip
        urllib.request.urlopen(request, timeout=10).read()

    @contextlib.contextmanager
    def enforcing_auth(self) -> Iterator[None]:
        """Within: moto checks credentials (and refuses every key of this module's)."""
        self._auth(b"0")
        try:
            yield
        finally:
            self._auth(b"inf")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def s3_server_started(log: Path) -> Iterator[S3Server]:
    moto = Path(sys.executable).parent / "moto_server"
    port = _free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    server = S3Server(f"http://127.0.0.1:{port}", process)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{server.endpoint}/moto-api/", timeout=1).read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start: {log.read_text()}") from None
                time.sleep(0.1)
        yield server
    finally:
        server.stop()
