"""The temporary Prefect API of a command run without a Prefect server.

Without PREFECT_API_URL, Prefect starts a temporary API server in a subprocess the first time a
client needs one, and gives it 20 s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS). On a
fresh PREFECT_HOME that server first builds its database (every migration, then the block
types): 16-28 s on a quiet 2-core machine, more under load, so the README's first command died
with Prefect's traceback. And the client imports Prefect's whole server package (about 3 s of
CPU) only to launch it.

So the command launches that same server itself (uvicorn on Prefect's app factory, as Prefect
does), before its own imports, on a socket it has already bound (nothing can take the port and
early connections wait in the backlog), then points Prefect at it. What this changes:
- the server's start overlaps the command's imports and checks, and the command no longer
  imports the server package (`bench/startup.py`: figures in docs/benchmarks.md);
- the wait has a limit that fits a database being built: the user's
  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS where set, else DEFAULT_STARTUP_TIMEOUT_S;
  past it, one message and exit 2, no traceback;
- the server runs without what a collection never uses: automations (triggers, actions), the
  block types' registration, telemetry;
- its console goes to a log file (named in any failure) instead of the user's terminal;
- it stops with the command, and by itself if the command is killed (-9 included);
- a SIGTERM sent to every process of the command at once (Slurm ending or requeueing a job,
  systemd stopping a unit) leaves it running while the command stops gracefully and writes its
  run's final state through it; the command then stops it (SIGINT).

Subprocesses of the command (`--processes`, a local Dask cluster) inherit PREFECT_API_URL and
use this one server too. TEMPORARY_API_ENV names it for code that must know a URL is only this
command's server (a remote Dask cluster cannot reach it).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

from rollouts.settings import TEMPORARY_API_ENV

# Measured here: a fresh database takes 16-28 s on a quiet 2-core machine and about twice that
# with both cores busy; 120 s leaves room for a slow disk or a loaded CI runner.
DEFAULT_STARTUP_TIMEOUT_S = 120
TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"

# What the temporary server of one command never needs. Automations only exist on a real
# server (`make deploy` installs ours there); stopping the reactive-triggers service right after
# its start also fails in Prefect 3.9 ("Reactive triggers not started"). Block types are
# registered by any real server that opens this database.
SERVER_ENV = {
    "PREFECT_UI_ENABLED": "false",
    "PREFECT__SERVER_EPHEMERAL": "1",  # Prefect's own marker for its temporary server
    "PREFECT__SERVER_FINAL": "1",
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_ACTIONS_ENABLED": "false",
    "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


class TemporaryApiError(Exception):
    """The temporary API did not come up; the message says what to do."""


class TemporaryApi:
    """One server process on a socket bound here; `url` is known before the server answers."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/api"
        fd, log_path = tempfile.mkstemp(prefix="rollouts-prefect-api-", suffix=".log")
        self.log_path = Path(log_path)
        self.started = time.monotonic()
        server_argv = [sys.executable, "-m", "rollouts_cli.temporary_api"]
        self._process = subprocess.Popen(
            [*server_argv, str(self._sock.fileno()), str(os.getpid())],
            pass_fds=(self._sock.fileno(),),
            env={**os.environ, **SERVER_ENV},
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,  # a Ctrl-C at the terminal is the command's to handle
        )
        os.close(fd)
        self._sock.close()  # the server holds it now
        self._failed = False
        atexit.register(self.stop)

    def wait_ready(self, timeout_s: float) -> None:
        """Block until GET /health answers 200; TemporaryApiError when the server exits or
        the limit passes (counted from its launch: its start overlapped the command's)."""
        import httpx

        deadline = self.started + timeout_s
        with httpx.Client(timeout=httpx.Timeout(5.0, connect=5.0)) as client:
            while True:
                if self._process.poll() is not None:
                    self._fail(f"exited with code {self._process.returncode} while starting")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass  # not listening yet, or still building its database
                if time.monotonic() >= deadline:
                    self._fail(f"did not answer within {timeout_s:g} s")
                time.sleep(0.1)

    def _fail(self, what: str) -> None:
        self._failed = True
        self.stop()
        raise TemporaryApiError(
            f"the temporary Prefect API {what} (its log: {self.log_path}). A first start builds "
            f"its database and takes longest; raise {TIMEOUT_SETTING} (default here "
            f"{DEFAULT_STARTUP_TIMEOUT_S}), or start a server once (`make server`, then export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api): every command then starts seconds "
            "sooner."
        )

    def stop(self) -> None:
        process = self._process
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # a SIGTERM it ignores while this command lives
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if not self._failed:
            with contextlib.suppress(OSError):
                self.log_path.unlink()


_launched: list[TemporaryApi] = []  # this process's server, once launched


def launch_unless_configured() -> None:
    """Launch the server now when PREFECT_API_URL is not in the environment.

    Called before Prefect is imported, so a PREFECT_API_URL from a Prefect profile, `.env` or
    `prefect.toml` is not known yet: `attach` stops the server again in that (rarer) case."""
    if os.environ.get("PREFECT_API_URL") or _launched:
        return
    if "prefect.settings" in sys.modules:  # already loaded (a program calling main()): ask it
        from prefect.settings import get_current_settings

        if get_current_settings().api.url:
            return
    _launched.append(TemporaryApi())


def attach() -> None:
    """Point Prefect at the launched server once it answers; no-op when Prefect has an API URL
    of its own. Before the first call that needs the API."""
    if not _launched:
        return
    server = _launched[0]
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:  # a profile or a settings file names a server: use it
        _launched.clear()
        server.stop()
        return
    ephemeral = settings.server.ephemeral
    timeout_s = (
        ephemeral.startup_timeout_seconds
        if "startup_timeout_seconds" in ephemeral.model_fields_set
        else DEFAULT_STARTUP_TIMEOUT_S
    )
    server.wait_ready(timeout_s)
    os.environ["PREFECT_API_URL"] = server.url
    os.environ[TEMPORARY_API_ENV] = server.url
    refresh_global_settings_context()


def _watch_parent(parent_pid: int) -> None:
    """Stop this server once the command that launched it is gone (even after kill -9)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
            return


def serve(fd: int, parent_pid: int) -> None:
    import uvicorn

    class CommandServer(uvicorn.Server):
        """Uvicorn that stops when its command says so (SIGINT) or is gone, not at a
        SIGTERM that reached every process of the command: the command, stopping gracefully on
        the same signal, still reports its run's final state here."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if sig == signal.SIGTERM and os.getppid() == parent_pid:
                return
            super().handle_exit(sig, frame)

    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    config = uvicorn.Config(
        "prefect.server.api.server:create_app", factory=True, log_level="error", lifespan="on"
    )
    # The socket the command bound (uvicorn's own `fd=` would take it for a Unix socket).
    CommandServer(config).run(sockets=[socket.socket(fileno=fd)])


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
