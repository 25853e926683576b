"""A real `prefect server start` backed by a PostgreSQL database of its own: the production setup
(SQLite stalls concurrent subflows on its database lock).

PostgreSQL is expected on 127.0.0.1:5432 as user ``postgres`` with trust auth. Every server gets
a fresh database ``rollouts_test_<epoch>_<pid>_<random>``, dropped when the server stops; the
machine's PostgreSQL is shared by other checkouts and later runs, so names never collide, and
databases a killed session left behind are dropped once they are a day old.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
# CREATE/DROP DATABASE run from here; never template1 (a session on it blocks every createdb).
ADMIN_DATABASES = ("postgres", "test")
PREFIX = "rollouts_test_"
STALE_AFTER_S = 24 * 3600
PREFECT = str(Path(sys.executable).with_name("prefect"))


def postgres_missing() -> str | None:
    """Why there is no PostgreSQL to use (a skip reason), or None. Only an absent server is a
    reason to skip; a server that answers but refuses us is an error, reported by the fixture."""
    try:
        socket.create_connection((PG_HOST, PG_PORT), timeout=3).close()
    except OSError as e:
        return (
            f"needs PostgreSQL on {PG_HOST}:{PG_PORT} (user {PG_USER}, trust auth) for a "
            f"PostgreSQL-backed Prefect server; none is listening there ({e})"
        )
    return None


async def _admin_connect() -> Any:
    import asyncpg

    last: Exception | None = None
    for db in ADMIN_DATABASES:
        try:
            return await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=db)
        except asyncpg.InvalidCatalogNameError as e:
            last = e
    raise RuntimeError(f"none of the databases {ADMIN_DATABASES} exists on {PG_HOST}") from last


async def _create_database() -> str:
    name = f"{PREFIX}{int(time.time())}_{os.getpid()}_{secrets.token_hex(3)}"
    conn = await _admin_connect()
    try:
        stale = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1", PREFIX.replace("_", r"\_") + "%"
        )
        for (old,) in stale:
            m = re.match(rf"{PREFIX}(\d+)_", old)
            if m and time.time() - int(m[1]) > STALE_AFTER_S:
                await conn.execute(f'DROP DATABASE IF EXISTS "{old}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def _drop_database(name: str) -> None:
    conn = await _admin_connect()
    try:
        # FORCE: a connection the stopped server's pool still holds must not keep it alive
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _fetch(database: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    import asyncpg

    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=database)
    try:
        return [tuple(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


@dataclass
class PgPrefectServer:
    api_url: str
    database: str
    log: Path

    @property
    def connection_url(self) -> str:
        return f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.database}"

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows straight from the server's PostgreSQL database (not through Prefect's API)."""
        return asyncio.run(_fetch(self.database, sql, *args))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """TERM, then KILL, the server and anything it started (its own process group)."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def pg_prefect_server(tmp: Path, startup_timeout_s: float = 120) -> Iterator[PgPrefectServer]:
    """`prefect server start` on 127.0.0.1 on a fresh PostgreSQL database, until exit."""
    database = asyncio.run(_create_database())
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ROLLOUTS_"))},
        "PREFECT_HOME": str(tmp / "server-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": (
            f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"
        ),
    }
    server = PgPrefectServer(f"http://127.0.0.1:{port}/api", database, tmp / "pg-server.log")
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(server.log, "wb") as log:
            proc = subprocess.Popen(
                [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + startup_timeout_s
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.api_url}/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"prefect server on PostgreSQL ({database}) did not become healthy:\n"
                    + server.log.read_text(errors="replace")[-3000:]
                )
            time.sleep(0.5)
        yield server
    finally:
        if proc is not None:
            _stop_group(proc)
        asyncio.run(_drop_database(database))
