"""Benchmark: start-up of `rollouts collect`, from typing the command to the first /run request.

A tiny dataset (--n tasks, default 5) goes through the real console script
`.venv/bin/rollouts collect +agent_url=URL +input_jsonl_fpath=IN +output_jsonl_fpath=OUT`
(fresh output every run, clean environment: no PREFECT_*/ROLLOUTS_* variables except
PREFECT_HOME in a temp dir, PREFECT_SERVER_ANALYTICS_ENABLED=false and, with a server,
PREFECT_API_URL; the working directory is a temp dir so no .env / prefect.toml is read).
The agent is `.venv/bin/rollouts serve-agent --port 0 --request-log FILE`; its request log
stamps each /run with time.time() on receipt, which gives the first-request time.

Modes (--modes):
- ephemeral: PREFECT_API_URL unset, Prefect starts a temporary API per command. The first run on
  a fresh PREFECT_HOME (database created) is reported apart as the cold start.
- sqlite: one `prefect server start` (SQLite in its own PREFECT_HOME) for all runs.
- postgres: the same with PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://
  postgres@HOST:PORT/DB (createdb when missing; --pg-db, --pg-host, --pg-port).
  Server modes start with one unmeasured warm-up run (flow and task registration).

Per mode: --repeats plain runs (headline figures, median and range) and --probe-repeats runs of
the same command under a probe (this file, `probe` sub-command) that wraps functions of the
CLI, flow, tasks and Prefect to stamp phases (imports, temporary API, flow-run creation, API
calls, split task, progress artifact, gc.freeze, dispatcher, chunk task body) without changing
what runs. Plus `python -X importtime` of the CLI's import path, summed per top-level package.
Optional: --py-spy PATH records one run per mode (py-spy record --subprocesses, raw format)
and lists the heaviest frames before the first request.

    .venv/bin/python bench/startup.py [--repeats 5] [--probe-repeats 3] [--n 5]
        [--modes ephemeral sqlite postgres] [--py-spy /tmp/pyspy-venv/bin/py-spy]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
BIN = Path(sys.executable).parent
ROLLOUTS = str(BIN / "rollouts")
PREFECT = str(BIN / "prefect")
PY = sys.executable


# ==========================================================================================
# Probe: runs inside the measured process (python bench/startup.py probe MARKS -- collect ...)
# ==========================================================================================


def probe_main(marks_path: str, argv: list[str]) -> int:
    """Run `rollouts` like the console script does, stamping phases into ``marks_path``."""
    t_main = time.time()
    marks: list[tuple[str, float]] = [("probe_main", t_main)]
    api: list[dict[str, Any]] = []

    def mark(name: str) -> None:
        marks.append((name, time.time()))
        if name == "flow_call:end":
            dump()  # in case the process then hangs at exit and gets killed

    def dump() -> None:
        with open(marks_path, "w") as f:
            json.dump({"marks": marks, "api": api}, f)

    import atexit

    atexit.register(dump)  # registered first: runs last, after Prefect's own atexit (server stop)

    def wrap_sync(obj: Any, attr: str, label: str) -> None:
        orig = getattr(obj, attr, None)
        if orig is None:  # moved in this tree: that phase is simply not stamped
            return

        def wrapper(*a: Any, **k: Any) -> Any:
            mark(f"{label}:start")
            try:
                return orig(*a, **k)
            finally:
                mark(f"{label}:end")

        setattr(obj, attr, wrapper)

    def wrap_async(obj: Any, attr: str, label: str) -> None:
        orig = getattr(obj, attr, None)
        if orig is None:  # moved in this tree: that phase is simply not stamped
            return

        async def wrapper(*a: Any, **k: Any) -> Any:
            mark(f"{label}:start")
            try:
                return await orig(*a, **k)
            finally:
                mark(f"{label}:end")

        setattr(obj, attr, wrapper)

    import rollouts_cli.main as cli

    mark("cli_imported")
    wrap_sync(cli, "build_parser", "build_parser")
    wrap_sync(cli, "_check_parameters", "check_parameters")
    if hasattr(cli, "check_agent_first"):  # newer trees probe the agent before Prefect starts
        wrap_sync(cli, "check_agent_first", "check_agent_first")
    try:  # newer still: a run's request is checked once, in rollouts/request.py
        import rollouts.request as request_checks

        wrap_sync(request_checks, "check_request", "check_parameters")
        wrap_async(request_checks, "check_agent_first", "check_agent_first")
    except ImportError:
        pass
    try:  # newer trees start the temporary API themselves: stamp the wait for it
        import rollouts_cli.temporary_api as temporary_api

        wrap_sync(temporary_api, "attach", "temporary_api")
    except ImportError:
        pass
    import builtins

    orig_import = builtins.__import__

    def traced_import(name: str, *a: Any, **k: Any) -> Any:
        # cmd_collect's `from flows.collect import ...`: stamp it, then wrap what the flow calls.
        # Prefect's server module is wrapped only once Prefect itself imports it (temporary API):
        # importing it here would add ~2 s that a run against a server never pays.
        if name == "flows.collect" and name not in sys.modules:
            mark("flows_import:start")
            mod = orig_import(name, *a, **k)
            mark("flows_import:end")
            _patch_flow(sys.modules["flows.collect"])
            return mod
        if name == "prefect.server.api.server" and name not in sys.modules:
            mod = orig_import(name, *a, **k)
            builtins.__import__ = orig_import
            wrap_sync(sys.modules[name].SubprocessASGIServer, "start", "temporary_api")
            return mod
        return orig_import(name, *a, **k)

    builtins.__import__ = traced_import

    def _patch_flow(fc: Any) -> None:
        import gc
        import types

        import prefect.client.base as pcb
        from prefect.client.orchestration import PrefectClient

        import tasks.collect as tcollect
        import tasks.split as tsplit

        wrap_async(PrefectClient, "create_flow_run", "create_flow_run")
        wrap_sync(fc, "check_auto_resume_budget", "flow_body")
        wrap_sync(fc, "prepare_run_dir", "prepare_run_dir")
        wrap_sync(tsplit, "split_input", "split_body")
        wrap_sync(fc, "resolve_agent_urls", "split_returned")
        if hasattr(fc, "check_agents_reachable"):  # newer trees probe the agents first
            wrap_async(fc, "check_agents_reachable", "agents_reachable")
        wrap_async(fc, "acreate_progress_artifact", "progress_artifact")
        ns = types.SimpleNamespace(freeze=gc.freeze)
        wrap_sync(ns, "freeze", "gc_freeze")
        fc.gc = ns
        wrap_sync(fc, "open_dispatcher", "open_dispatcher")
        try:  # newer trees: the run's sequence in rollouts/run.py, the dispatcher's setup in
            # rollouts/dispatchers.py; the same phases, stamped where they now are
            import flows.artifacts as artifacts
            import rollouts.collect as rcollect
            import rollouts.dispatchers as dispatchers
            import rollouts.gctune as gctune
            import rollouts.run as run_core

            wrap_sync(run_core, "prepare_run_dir", "prepare_run_dir")
            wrap_sync(rcollect, "resolve_agent_urls", "split_returned")
            wrap_async(run_core, "check_agents_reachable", "agents_reachable")
            wrap_async(artifacts, "acreate_progress_artifact", "progress_artifact")
            wrap_sync(gctune, "freeze_heap", "gc_freeze")
            wrap_sync(dispatchers, "_new_dispatcher", "open_dispatcher")
        except ImportError:
            pass
        wrap_async(tcollect, "collect_chunk", "chunk_body")
        wrap_sync(cli, "_run_flow_state", "flow_call")

        orig_send = pcb.PrefectHttpxAsyncClient.send

        async def send(self: Any, request: Any, *a: Any, **k: Any) -> Any:
            t0 = time.time()
            try:
                return await orig_send(self, request, *a, **k)
            finally:
                api.append(
                    {"m": request.method, "p": request.url.path, "t0": t0, "t1": time.time()}
                )

        pcb.PrefectHttpxAsyncClient.send = send  # type: ignore[method-assign]
        orig_ssend = pcb.PrefectHttpxSyncClient.send

        def ssend(self: Any, request: Any, *a: Any, **k: Any) -> Any:
            t0 = time.time()
            try:
                return orig_ssend(self, request, *a, **k)
            finally:
                api.append({"m": request.method, "p": request.url.path, "t0": t0, "t1": time.time(),
                            "sync": True})  # fmt: skip

        pcb.PrefectHttpxSyncClient.send = ssend  # type: ignore[method-assign]

    sys.argv = ["rollouts", *argv]
    try:
        rc = cli.main(argv)
    finally:
        mark("main_returned")
    return rc


# ==========================================================================================
# Driver
# ==========================================================================================


def clean_env(prefect_home: Path, api_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "ROLLOUTS_"))}  # fmt: skip
    env.pop("PYTHONPATH", None)  # the venv's editable install finds rollouts, flows, tasks
    env["PREFECT_HOME"] = str(prefect_home)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


class Agent:
    def __init__(self, log: Path, tmp: Path) -> None:
        self.log = log
        self.err = open(tmp / "agent.stderr", "wb")
        self.proc = subprocess.Popen(
            [ROLLOUTS, "serve-agent", "--host", "127.0.0.1", "--port", "0", "--request-log",
             str(log)], stdout=subprocess.PIPE, stderr=self.err, env=clean_env(tmp / "agent-home"),
            start_new_session=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        m = re.search(r"listening on (http://\S+)", line)
        if not m:
            self.stop()
            raise RuntimeError(f"agent did not start: {line!r}")
        self.url = m.group(1)

    def offset(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def times_since(self, offset: int) -> list[float]:
        if not self.log.exists():
            return []
        with open(self.log, "rb") as f:
            f.seek(offset)
            return [json.loads(line)["time"] for line in f if line.endswith(b"\n")]

    def stop(self) -> None:
        from _common import kill_group

        kill_group(self.proc)
        self.err.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def prefect_server(home: Path, log: Path, db_url: str | None) -> Any:
    import httpx
    from _common import kill_group

    port = free_port()
    env = clean_env(home)
    if db_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = db_url
    out = open(log, "wb")
    t0 = time.perf_counter()
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=home.parent,
                            start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited {proc.returncode}; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.perf_counter() - t0 > 120:
                raise RuntimeError("prefect server not healthy within 120 s")
            time.sleep(0.1)
        healthy_s = time.perf_counter() - t0
        print(f"  prefect server ({'postgres' if db_url else 'sqlite'}) healthy after "
              f"{healthy_s:.1f} s on {url}", flush=True)  # fmt: skip
        yield url, healthy_s, proc
    finally:
        kill_group(proc, grace_s=10)
        out.close()


def ensure_pg_db(host: str, port: int, db: str) -> bool:
    """Create ``db`` when missing; True when this call created it."""
    q = subprocess.run(["psql", "-h", host, "-p", str(port), "-U", "postgres", "-tAc",
                        f"SELECT 1 FROM pg_database WHERE datname = '{db}'"],
                       capture_output=True, text=True, check=True)  # fmt: skip
    if q.stdout.strip() == "1":
        return False
    subprocess.run(["createdb", "-h", host, "-p", str(port), "-U", "postgres", db], check=True)
    return True


def run_cmd(cmd: list[str], env: dict[str, str], cwd: Path, log: Path, timeout_s: float
            ) -> dict[str, Any]:  # fmt: skip
    """Run to its end or ``timeout_s`` (then kill its group: "hung"); wall and wait4 CPU."""
    from _common import kill_group

    with open(log, "wb") as out:
        start_ts = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        hung = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.perf_counter() - t0 > timeout_s:
                hung = True
                kill_group(proc)
                rc, usage = proc.returncode, None
                break
            time.sleep(0.005)
        wall = time.perf_counter() - t0
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, 9)  # a child it left behind (the temporary API) is ours to stop
    cpu = usage.ru_utime + usage.ru_stime if usage else None
    return {"start_ts": start_ts, "end_ts": start_ts + wall, "wall_s": wall, "rc": rc,
            "hung": hung, "cpu_s": cpu}  # fmt: skip


def run_one(agent: Agent, tmp: Path, label: str, i: int, home: Path, api_url: str | None,
            n: int, probe: bool, timeout_s: float, code_dir: Path | None,
            pyspy: str | None = None) -> dict[str, Any]:  # fmt: skip
    run = tmp / "runs" / f"{label}-{i}{'-probe' if probe else ''}{'-pyspy' if pyspy else ''}"
    run.mkdir(parents=True)
    out_path = run / "out.jsonl"
    args = ["collect", f"+agent_url={agent.url}", f"+input_jsonl_fpath={tmp / 'tasks.jsonl'}",
            f"+output_jsonl_fpath={out_path}"]  # fmt: skip
    marks_path = run / "marks.json"
    cmd = [PY, str(HERE), "probe", str(marks_path), "--", *args] if probe else [ROLLOUTS, *args]
    if pyspy:
        cmd = [pyspy, "record", "--subprocesses", "--rate", "200", "--format", "raw",
               "--output", str(run / "pyspy.txt"), "--", *cmd]  # fmt: skip
    env = clean_env(home, api_url)
    if code_dir is not None:
        env["PYTHONPATH"] = str(code_dir)
    offset = agent.offset()
    res = run_cmd(cmd, env, run, run / "stdout.log", timeout_s)
    tail = (run / "stdout.log").read_text(errors="replace")[-3000:]
    if res["rc"] not in (0, None) and not res["hung"]:
        raise RuntimeError(f"{label} #{i} exited {res['rc']}:\n{tail}")
    times = agent.times_since(offset)
    if len(times) != n:
        raise RuntimeError(f"{label} #{i}: agent saw {len(times)} requests, expected {n}\n{tail}")
    first = min(times)
    # the flow's last files: the merged output and its metrics (written before artifacts)
    outs = [p for p in run.glob("out*") if p.is_file()]
    outputs_done = max(p.stat().st_mtime for p in outs) if outs else None
    out = {
        "mode": label, "repeat": i, "probe": probe, "hung": res["hung"],
        "first_request_s": round(first - res["start_ts"], 3),
        "total_s": None if res["hung"] else round(res["wall_s"], 3),
        "outputs_written_s": round(outputs_done - res["start_ts"], 3) if outputs_done else None,
        "after_first_request_s": None if res["hung"] else round(res["end_ts"] - first, 3),
        "cpu_s": None if res["cpu_s"] is None else round(res["cpu_s"], 3),
        "start_ts": res["start_ts"], "first_ts": first, "end_ts": res["end_ts"],
    }  # fmt: skip
    if res["hung"]:
        out["stdout_tail"] = tail[-800:]
    if probe:
        out["phases"], out["api_before_first"] = phases_from_marks(
            marks_path, res["start_ts"], first, None if res["hung"] else res["end_ts"]
        )
    if pyspy:
        out["pyspy_file"] = str(run / "pyspy.txt")
    return out


# Phases: (name, from mark, to mark); "t0" = process created, "first" = first /run received.
PHASES = [
    ("interpreter + import rollouts_cli.main", "t0", "cli_imported"),
    ("build_parser (imports reference_agent: aiohttp)", "build_parser:start", "build_parser:end"),
    ("_check_parameters (rollouts.models, pydantic)", "check_parameters:start",
     "check_parameters:end"),
    ("check_agent_first (connect to the agent)", "check_agent_first:start",
     "check_agent_first:end"),
    ("import flows.collect (prefect, pandas, ...)", "flows_import:start", "flows_import:end"),
    ("settings, progress bar -> flow call", "flows_import:end", "flow_call:start"),
    ("flow call -> flow body (engine, API)", "flow_call:start", "flow_body:start"),
    ("  of which temporary API start (or the wait for it)", "temporary_api:start",
     "temporary_api:end"),
    ("  of which create_flow_run", "create_flow_run:start", "create_flow_run:end"),
    ("flow body -> prepare_run_dir done", "flow_body:start", "prepare_run_dir:end"),
    ("split task: engine -> body", "prepare_run_dir:end", "split_body:start"),
    ("split body (read, chunk files)", "split_body:start", "split_body:end"),
    ("split body end -> task returned", "split_body:end", "split_returned:start"),
    ("split returned -> agents_reachable done", "split_returned:start", "agents_reachable:end"),
    ("-> progress artifact created", "split_returned:start", "progress_artifact:end"),
    ("gc.freeze", "gc_freeze:start", "gc_freeze:end"),
    ("open_dispatcher", "open_dispatcher:start", "open_dispatcher:end"),
    ("chunk task: engine -> body", "open_dispatcher:end", "chunk_body:start"),
    ("chunk body -> first request received", "chunk_body:start", "first"),
    ("first request -> flow returned", "first", "flow_call:end"),
    ("flow returned -> process exit (hung: -)", "flow_call:end", "exit"),
]  # fmt: skip


def phases_from_marks(path: Path, t0: float, first: float, end: float | None
                      ) -> tuple[dict[str, float], dict[str, Any]]:  # fmt: skip
    if not path.exists():
        return {}, {"calls": 0, "sum_s": 0.0, "by_endpoint": {}}
    data = json.loads(path.read_text())
    at: dict[str, float] = {"t0": t0, "first": first}
    if end is not None:
        at["exit"] = end
    for name, t in data["marks"]:
        at.setdefault(name, t)  # first occurrence
    phases = {}
    for label, a, b in PHASES:
        if a in at and b in at:
            phases[label] = round(at[b] - at[a], 3)
    phases["(flow body start since t0)"] = round(at.get("flow_body:start", first) - t0, 3)
    before = [c for c in data["api"] if c["t0"] < first]
    calls: dict[str, list[float]] = {}
    for c in before:
        key = f"{c['m']} {re.sub(r'[0-9a-f-]{36}', '{id}', c['p'])}"
        calls.setdefault(key, []).append(c["t1"] - c["t0"])
    api = {
        "calls": len(before),
        "sum_s": round(sum(c["t1"] - c["t0"] for c in before), 3),
        "by_endpoint": {k: [len(v), round(sum(v), 3)] for k, v in
                        sorted(calls.items(), key=lambda kv: -sum(kv[1]))},
    }  # fmt: skip
    return phases, api


# ------------------------------------------------------------------------------------------
# Imports
# ------------------------------------------------------------------------------------------

IMPORT_SNIPPETS = {
    "import rollouts_cli.main": "import rollouts_cli.main",
    "CLI before the flow import (cli + build_parser + models)":
        "import rollouts_cli.main as c; c.build_parser(); import rollouts.models",
    "import flows.collect": "import flows.collect",
    "whole CLI path (cli + parser + models + flows.collect)":
        "import rollouts_cli.main as c; c.build_parser(); import rollouts.models; import flows.collect",
    "import prefect": "import prefect",
    "import prefect + flow/task/artifacts API": "import prefect, prefect.artifacts, prefect.states",
}  # fmt: skip
PACKAGES_OF_INTEREST = ["prefect", "pandas", "numpy", "dask", "distributed", "prefect_dask",
                        "aiohttp", "httpx", "httpx_aiohttp", "rich", "pydantic", "pydantic_core",
                        "pydantic_settings", "yaml", "orjson", "sqlalchemy", "fastapi", "uvicorn",
                        "griffe", "pendulum", "whenever", "websockets", "rollouts", "flows",
                        "tasks"]  # fmt: skip


def parse_importtime(text: str) -> tuple[dict[str, float], dict[str, float], list[tuple]]:
    """(self seconds per top-level package, cumulative s of each package's first import line,
    the import stack of the first import of each package of interest)."""
    selfs: dict[str, float] = {}
    first_cum: dict[str, float] = {}
    rows = []
    for line in text.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            rows.append((int(m[1]) / 1e6, int(m[2]) / 1e6, len(m[3]) // 2, m[4]))
    # importtime prints children before parents: walk backwards to find each import's parent
    parents: dict[int, str] = {}
    who: dict[str, str] = {}
    for s, c, depth, name in reversed(rows):
        parents[depth] = name
        top = name.split(".")[0]
        selfs[top] = selfs.get(top, 0.0) + s
        if name == top:
            first_cum[top] = c  # reversed: the last assignment is the earliest (outermost) one
            who[top] = " <- ".join(parents[d] for d in range(depth - 1, -1, -1) if d in parents)
    return selfs, first_cum, [(k, who.get(k, "")) for k in PACKAGES_OF_INTEREST if k in who]


def measure_imports(repeats: int) -> dict[str, Any]:
    env = clean_env(Path("/tmp/rollouts-startup-import-home"))
    out: dict[str, Any] = {}
    for label, code in IMPORT_SNIPPETS.items():
        walls = []
        for _ in range(repeats):
            t = time.perf_counter()
            subprocess.run([PY, "-c", code], env=env, check=True, cwd="/tmp")
            walls.append(time.perf_counter() - t)
        p = subprocess.run([PY, "-X", "importtime", "-c", code], env=env, cwd="/tmp",
                           capture_output=True, text=True, check=True)  # fmt: skip
        selfs, first_cum, who = parse_importtime(p.stderr)
        out[label] = {
            "wall_s": summary(walls),
            "self_s_by_package": {k: round(v, 3) for k, v in
                                  sorted(selfs.items(), key=lambda kv: -kv[1])[:20]},
            "total_self_s": round(sum(selfs.values()), 3),
            "first_import_cumulative_s": {k: round(first_cum[k], 3) for k in PACKAGES_OF_INTEREST
                                          if k in first_cum},
            "imported_via": dict(who),
        }  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------
# py-spy
# ------------------------------------------------------------------------------------------


def pyspy_top(path: Path, limit: int = 15) -> list[tuple[str, float]]:
    """Inclusive share of samples per frame of our code / first library frame (raw format)."""
    total = 0
    incl: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        total += c
        seen = set()
        for frame in stack.split(";"):
            m = re.match(r"(.+?) \((.+?)(?::\d+)?\)$", frame.strip())
            if not m:
                continue
            fn, file = m[1], m[2]
            file = file.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
            key = f"{fn} ({file})"
            if key not in seen:
                seen.add(key)
                incl[key] = incl.get(key, 0) + c
    return [(k, round(v / max(total, 1), 3)) for k, v in
            sorted(incl.items(), key=lambda kv: -kv[1])[:limit]]  # fmt: skip


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


def fmt_total(r: dict[str, Any]) -> str:
    if r["hung"]:
        return f"HUNG (killed; outputs written at {r['outputs_written_s']:.2f} s)"
    return f"{r['total_s']:.2f} s"


def summary(values: list[Any]) -> dict[str, Any]:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "n": len(values)}  # fmt: skip


def rng(s: dict[str, Any]) -> str:
    if s["median"] is None:
        return "-"
    return f"{s['min']:.2f}-{s['max']:.2f}"


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "probe":
        rest = sys.argv[3:]
        if rest and rest[0] == "--":
            rest = rest[1:]
        sys.exit(probe_main(sys.argv[2], rest))

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--n", type=int, default=5, help="tasks in the dataset (%(default)s)")
    ap.add_argument("--repeats", type=int, default=5, help="plain runs per mode (%(default)s)")
    ap.add_argument("--probe-repeats", type=int, default=3,
                    help="runs per mode under the phase probe (%(default)s)")  # fmt: skip
    ap.add_argument("--import-repeats", type=int, default=5, help="runs per import snippet")
    ap.add_argument("--modes", nargs="+", default=["ephemeral", "sqlite", "postgres"],
                    choices=["ephemeral", "sqlite", "postgres"])  # fmt: skip
    ap.add_argument("--no-imports", action="store_true", help="skip the importtime section")
    ap.add_argument("--pg-host", default="127.0.0.1")
    ap.add_argument("--pg-port", type=int, default=5432)
    ap.add_argument("--pg-db", default="rollouts_bench", help="created when missing (kept)")
    ap.add_argument("--py-spy", default=None, metavar="PATH",
                    help="py-spy binary: also record one run per mode and list hot frames")  # fmt: skip
    ap.add_argument(
        "--timeout-s",
        type=float,
        default=60.0,
        help="a command still running after this is killed and reported hung "
        "(its first-request time still counts) (%(default)s)",
    )
    ap.add_argument(
        "--code-dir",
        type=Path,
        default=None,
        help="run this copy of the code (PYTHONPATH), e.g. a `git archive HEAD` "
        "export, instead of the working tree",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--burn", type=int, default=0, metavar="N",
                    help="measure under load: N processes spinning on the CPU for the whole "
                    "run (the load gate is then off)")
    ap.add_argument("--json", type=Path, default=None, help="default bench/results/startup.json")
    from _common import add_gate_args

    add_gate_args(ap, budget_s=240.0)
    # a running Prefect server keeps a 2-core machine's load near 1-2 by itself: short waits
    ap.set_defaults(load_threshold=1.5, max_wait_s=15.0)
    args = ap.parse_args()

    from _common import bench_dir, gate_from_args, machine, print_table, write_json

    from reference_agent.server import write_tasks

    if args.burn:
        args.load_threshold = float("inf")
    gate = gate_from_args(args)
    burners = [subprocess.Popen([PY, "-c", "while True: pass"]) for _ in range(args.burn)]
    runs: list[dict[str, Any]] = []
    extra: dict[str, Any] = {"servers": {}, "cold": None, "warmups": {}}
    imports = None
    if not args.no_imports:
        print("imports ...", flush=True)
        imports = measure_imports(args.import_repeats)

    with contextlib.ExitStack() as stop_burners, bench_dir("startup", args.keep) as tmp:
        for burner in burners:
            stop_burners.callback(burner.kill)
        write_tasks(tmp / "tasks.jsonl", args.n)
        agent = Agent(tmp / "requests.jsonl", tmp)
        try:
            for mode in args.modes:
                print(f"mode {mode}", flush=True)
                home = tmp / f"home-{mode}"
                home.mkdir()

                def series(api_url: str | None, mode: str = mode, home: Path = home) -> None:
                    for i in range(max(args.repeats, args.probe_repeats)):
                        # alternate plain and probed runs so drift hits both
                        for probe in (False, True):
                            if i >= (args.probe_repeats if probe else args.repeats):
                                continue
                            load = gate.wait(f"{mode} #{i}{' probe' if probe else ''}")
                            r = run_one(
                                agent,
                                tmp,
                                mode,
                                i,
                                home,
                                api_url,
                                args.n,
                                probe,
                                args.timeout_s,
                                args.code_dir,
                            )
                            r["load_1m"] = load["load_1m"]
                            runs.append(r)
                            print(f"    first request {r['first_request_s']:.2f} s, total "
                                  f"{fmt_total(r)}{' (probe)' if probe else ''}", flush=True)  # fmt: skip
                    if args.py_spy:
                        r = run_one(
                            agent,
                            tmp,
                            mode,
                            0,
                            home,
                            api_url,
                            args.n,
                            False,
                            args.timeout_s,
                            args.code_dir,
                            args.py_spy,
                        )
                        extra.setdefault("pyspy", {})[mode] = {
                            "first_request_s": r["first_request_s"], "total_s": r["total_s"],
                            "top_inclusive": pyspy_top(Path(r["pyspy_file"])),
                        }  # fmt: skip

                if mode == "ephemeral":
                    gate.wait("ephemeral cold")
                    cold = run_one(
                        agent,
                        tmp,
                        "ephemeral-cold",
                        0,
                        home,
                        None,
                        args.n,
                        True,
                        args.timeout_s,
                        args.code_dir,
                    )
                    extra["cold"] = cold
                    print(f"    cold: first request {cold['first_request_s']:.2f} s, total "
                          f"{fmt_total(cold)}", flush=True)  # fmt: skip
                    series(None)
                    continue
                db_url = None
                if mode == "postgres":
                    created = ensure_pg_db(args.pg_host, args.pg_port, args.pg_db)
                    db_url = (f"postgresql+asyncpg://postgres@{args.pg_host}:{args.pg_port}/"
                              f"{args.pg_db}")  # fmt: skip
                    extra["pg_db_created"] = created
                shome = tmp / f"server-home-{mode}"
                shome.mkdir()
                with prefect_server(shome, tmp / f"server-{mode}.log", db_url) as (url, hs, _):
                    extra["servers"][mode] = {"healthy_after_s": round(hs, 2)}
                    w = run_one(
                        agent,
                        tmp,
                        mode + "-warmup",
                        0,
                        home,
                        url,
                        args.n,
                        True,
                        args.timeout_s,
                        args.code_dir,
                    )
                    extra["warmups"][mode] = w
                    print(f"    warm-up: first request {w['first_request_s']:.2f} s, total "
                          f"{fmt_total(w)}", flush=True)  # fmt: skip
                    series(url)
        finally:
            agent.stop()

        # ---------------------------------------------------------------- report
        print()
        headline = []
        summ: dict[str, Any] = {}
        for mode in args.modes:
            plain = [r for r in runs if r["mode"] == mode and not r["probe"]]
            probed = [r for r in runs if r["mode"] == mode and r["probe"]]
            s = {k: summary([r[k] for r in plain]) for k in
                 ("first_request_s", "total_s", "outputs_written_s", "after_first_request_s",
                  "cpu_s")}  # fmt: skip
            s["hung"] = sum(1 for r in plain if r["hung"])
            s["probe_first_request_s"] = summary([r["first_request_s"] for r in probed])
            s["loads"] = [r["load_1m"] for r in plain + probed]
            summ[mode] = s
            headline.append([mode, len(plain), s["first_request_s"]["median"],
                             rng(s["first_request_s"]), s["total_s"]["median"], rng(s["total_s"]),
                             s["hung"], s["outputs_written_s"]["median"],
                             s["after_first_request_s"]["median"] or "-",
                             s["cpu_s"]["median"] or "-", s["probe_first_request_s"]["median"],
                             f"{min(s['loads']):.2f}-{max(s['loads']):.2f}"])  # fmt: skip
        print(f"`rollouts collect`, {args.n} tasks, zero-latency reference agent; seconds")
        table = print_table(["Prefect API", "runs", "first request (median)", "range",
                             "total (median)", "range", "hung", "outputs written",
                             "first req -> exit", "CPU (CLI + temp. API)", "first req under probe",
                             "load 1m"], headline)  # fmt: skip
        if extra["cold"]:
            c = extra["cold"]
            print(f"cold start (fresh PREFECT_HOME, temporary API creates its DB): first request "
                  f"{c['first_request_s']:.2f} s, total {fmt_total(c)}")  # fmt: skip
        for mode, w in extra["warmups"].items():
            print(f"{mode}: server healthy after {extra['servers'][mode]['healthy_after_s']:.1f} s;"
                  f" first run (registers the flow) first request {w['first_request_s']:.2f} s, "
                  f"total {fmt_total(w)}")  # fmt: skip

        # phases: medians over the probed runs
        print()
        print("Phases (probe runs, median s)")
        prows = []
        phase_summary: dict[str, dict[str, float]] = {}
        for label, _, _ in [*PHASES, ("(flow body start since t0)", "", "")]:
            row: list[Any] = [label]
            for mode in args.modes:
                vals = [r["phases"][label] for r in runs
                        if r["mode"] == mode and r["probe"] and label in r["phases"]]  # fmt: skip
                med = round(statistics.median(vals), 3) if vals else None
                phase_summary.setdefault(label, {})[mode] = med  # type: ignore[assignment]
                row.append("-" if med is None else med)
            prows.append(row)
        ptable = print_table(["phase", *args.modes], prows)
        print()
        print("Prefect API calls before the first request (probe runs, median count / s)")
        arows = []
        for mode in args.modes:
            probed = [r for r in runs if r["mode"] == mode and r["probe"]]
            if not probed:
                continue
            arows.append([mode, statistics.median(r["api_before_first"]["calls"] for r in probed),
                          statistics.median(r["api_before_first"]["sum_s"] for r in probed),
                          ", ".join(f"{k} x{v[0]} {v[1]:.2f}s" for k, v in
                                    list(probed[0]["api_before_first"]["by_endpoint"].items())[:6])])  # fmt: skip
        atable = print_table(["mode", "calls", "sum s", "slowest endpoints (first probe run)"],
                             arows)  # fmt: skip

        itable = ""
        if imports:
            print()
            print("Imports (python -c, wall median s; importtime: self s of the top packages)")
            irows = []
            for label, d in imports.items():
                top = ", ".join(f"{k} {v:.2f}" for k, v in list(d["self_s_by_package"].items())[:6])
                irows.append([label, d["wall_s"]["median"], rng(d["wall_s"]), d["total_self_s"],
                              top])  # fmt: skip
            itable = print_table(["snippet", "wall", "range", "importtime sum", "top self"], irows)
            whole = imports["whole CLI path (cli + parser + models + flows.collect)"]
            print("first import of each package on the whole CLI path (cumulative s; via):")
            for k, v in whole["first_import_cumulative_s"].items():
                print(f"  {k:20s} {v:6.3f}  {whole['imported_via'].get(k, '')}")
        if extra.get("pyspy"):
            print()
            for mode, d in extra["pyspy"].items():
                print(
                    f"py-spy {mode} (first request {d['first_request_s']:.1f} s, inclusive share of "
                    "samples over the whole run):"
                )
                for k, v in d["top_inclusive"]:
                    print(f"  {v:5.1%}  {k}")

        write_json("startup", {
            "machine": machine(), "args": vars(args) | {"json": None},
            "summary": summ, "phases": phase_summary, "imports": imports,
            "cold": extra["cold"], "warmups": extra["warmups"], "servers": extra["servers"],
            "pyspy": extra.get("pyspy"), "runs": runs,
            "tables": {"headline": table, "phases": ptable, "api": atable, "imports": itable},
            "load_gate": gate.log,
        }, args.json)  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
