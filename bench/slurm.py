"""Benchmark: chunk workers as Slurm jobs (`--slurm-jobs 1`, `2`) beside `--processes 2`, on
the one-node Slurm of scripts/slurm.sh (issue 21).

One reference agent (its own process, fixed latency, request log), one Prefect server of the
script's own (SQLite, a temp PREFECT_HOME, a free port on 127.0.0.1: Slurm workers need a
server they can reach), one task file. For each mode of ``--modes`` the whole `rollouts collect`
command runs to a fresh output; per run:

- wall: the command, start to exit;
- first request: the command's start -> the first /run request the agent received (its
  request log: one line per request, its receive time);
- rollouts/s: requests the agent received / (its last request - its first), from the same log
  (the collection alone: start-up and the end of the run are outside it); beside it, rollouts
  written / (first request -> last rollout written to a chunk file, mtime);
- start-up phases, from the command's start: the run's worker jobs as squeue lists them
  (polled every 0.2 s: first seen, i.e. submitted, and first seen RUNNING); in the log of the
  job whose worker came up first, Dask's lines "Start Nanny" (the job's Python is up),
  "Registered to" (joined the run's scheduler), the shared-storage probe run on it, and the
  stop plugin registered (the flow's check has passed); the flow's "collecting ..." log line
  as the Prefect server stored it (just before the chunk tasks are submitted; also for
  `--processes`); then the first request.

Modes: ``processesN`` (`--processes N`, a local Dask cluster), ``slurmN`` (`--slurm-jobs N`,
worker jobs of ROLLOUTS_SLURM_CORES / ROLLOUTS_SLURM_MEMORY = ``--slurm-cores`` /
``--slurm-memory``, Dask on loopback), ``local`` (one process, no Dask). Each mode first gets
one unmeasured run of one chunk (flow registration, file cache), unless ``--no-warmup``.

    .venv/bin/python bench/slurm.py [--n 20000] [--modes processes2 slurm1 slurm2]
        [--latency-ms 20] [--parallel 256] [--chunk-size 1000] [--repeats 1]
        [--keep] [--json bench/results/slurm.json]

Needs the `[slurm]` extra and a running Slurm (`bash scripts/slurm.sh start`).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    add_gate_args,
    bench_dir,
    cli_env,
    collect_cmd,
    gate_from_args,
    last_rollout_written,
    loadavg,
    machine,
    prefect_server,
    print_table,
    reference_agent,
    run_measured,
    write_json,
)

MODE = re.compile(r"^(?:(local)|processes(\d+)|slurm(\d+))$")
FLOW_RUN = re.compile(r"/flow-run/([0-9a-f-]{36})")
# The flow's log line once workers are up and checked (flows/dask_runner.py `placement`).
COLLECTING = re.compile(r"^collecting (in Slurm jobs|locally)")
# A Dask worker's log lines (the first worker job's log): its phases, in order.
WORKER_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - ")
WORKER_PHASES = {
    "nanny_started": "Start Nanny at",  # Python and Dask up in the job
    "worker_registered": "Registered to:",  # joined the run's scheduler
    "storage_probe_run": "Run out-of-band function 'probe_shared_storage'",
    "stop_plugin_registered": "Starting Worker plugin rollouts-stop-chunks-on-close",
}


def mode_args(mode: str) -> list[str]:
    m = MODE.match(mode)
    if not m:
        raise SystemExit(f"unknown mode {mode!r}: local, processesN or slurmN")
    if m.group(1):
        return []
    if m.group(2):
        return ["--processes", m.group(2)]
    return ["--slurm-jobs", m.group(3)]


def is_slurm(mode: str) -> bool:
    return mode.startswith("slurm")


@dataclass
class JobWatch:
    """The run's worker jobs, polled through squeue while the command runs (its job name is
    in the run dir's slurm.json once the cluster is made)."""

    slurm_file: Path
    every_s: float = 0.2
    first_seen: dict[str, float] = field(default_factory=dict)  # job id -> epoch
    first_running: dict[str, float] = field(default_factory=dict)
    most_at_once: int = 0
    pending_reasons: set[str] = field(default_factory=set)  # squeue's %R while PENDING
    others_running: int = 0  # most RUNNING jobs of someone else's seen at once (a shared node)
    job_name: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _poll(self) -> None:
        while not self._stop.is_set():
            if self.job_name is None and self.slurm_file.exists():
                with contextlib.suppress(OSError, KeyError, orjson.JSONDecodeError):
                    self.job_name = orjson.loads(self.slurm_file.read_bytes())["job_name"]
            if self.job_name is not None:
                now = time.time()
                listed = subprocess.run(
                    ["squeue", "--noheader", "--format=%i|%j|%T|%R"],
                    capture_output=True, text=True, check=False,
                )  # fmt: skip
                ours, others = 0, 0
                for line in listed.stdout.splitlines():
                    job, name, state, reason = (line.strip().split("|") + [""] * 4)[:4]
                    if name != self.job_name:
                        others += state == "RUNNING"
                        continue
                    ours += 1
                    self.first_seen.setdefault(job, now)
                    if state == "RUNNING":
                        self.first_running.setdefault(job, now)
                    elif state == "PENDING":
                        self.pending_reasons.add(reason)
                self.most_at_once = max(self.most_at_once, ours)
                self.others_running = max(self.others_running, others)
            self._stop.wait(self.every_s)

    def cancel_leftovers(self) -> None:
        """The command cancels its jobs when it ends; after a failure or a timeout, we do
        (only this run's jobs: the name carries its run id)."""
        if self.job_name is not None:
            subprocess.run(["scancel", f"--name={self.job_name}"], check=False)


def flow_logs(api: str, collect_log: Path) -> list[tuple[float, str]]:
    """(epoch time, message) of the run's flow and task logs, as the Prefect server stored
    them (the command prints none of them by default)."""
    import httpx

    m = FLOW_RUN.search(collect_log.read_text(errors="replace"))
    if not m:
        return []
    body = {"logs": {"flow_run_id": {"any_": [m.group(1)]}}, "sort": "TIMESTAMP_ASC",
            "limit": 200}  # fmt: skip
    rows = httpx.post(f"{api}/logs/filter", json=body, timeout=30).json()
    return [(datetime.fromisoformat(r["timestamp"]).timestamp(), r["message"]) for r in rows]


def worker_phases(slurm_log_dir: Path) -> dict[str, float]:
    """Epoch time of each of WORKER_PHASES in the log of the job whose worker started first."""
    by_job = []
    for path in slurm_log_dir.glob("*.err"):
        seen: dict[str, float] = {}
        for line in path.read_text(errors="replace").splitlines():
            m = WORKER_LINE.match(line)
            if not m:
                continue
            for phase, text in WORKER_PHASES.items():
                if phase not in seen and text in line:
                    stamp = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
                    seen[phase] = stamp.timestamp()
        if "nanny_started" in seen:
            by_job.append(seen)
    return min(by_job, key=lambda seen: seen["nanny_started"], default={})


def one_run(d: Path, api: str, agent: Any, tasks: Path, mode: str, args: argparse.Namespace,
            label: str, extra: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    from rollouts.run_state import run_dir_for

    run = d / label
    run.mkdir()
    out, work = run / "rollouts.jsonl", run / "work"
    cmd = collect_cmd(agent.url, tasks, out, parallel=args.parallel, chunk_size=args.chunk_size,
                      extra=[*mode_args(mode), *(extra or [])])  # fmt: skip
    env = cli_env(d / "prefect-home", work, api)
    if is_slurm(mode):
        env |= {"ROLLOUTS_SLURM_CORES": str(args.slurm_cores),
                "ROLLOUTS_SLURM_MEMORY": args.slurm_memory,
                "DASK_JOBQUEUE__SLURM__INTERFACE": "lo"}  # fmt: skip
    run_dir = run_dir_for(out, work)
    watch = JobWatch(run_dir / "slurm.json")
    offset = agent.log_offset()
    load_start = loadavg()
    if is_slurm(mode):
        watch.start()
    try:
        res = run_measured(cmd, env=env, cwd=run, timeout_s=args.timeout_s,
                           log_path=run / "collect.log")  # fmt: skip
    finally:
        watch.stop()
        if is_slurm(mode):
            watch.cancel_leftovers()
    if res.returncode != 0:
        raise RuntimeError(f"{mode}: collect exited {res.returncode}:\n{res.tail(40)}")
    load_end = loadavg()
    times = sorted(agent.requests_since(offset))
    if not times:
        raise RuntimeError(f"{mode}: the agent logged no request")
    first, last = times[0], times[-1]
    last_written, written = last_rollout_written(out, work)
    t0 = res.start_ts
    logs = flow_logs(api, run / "collect.log")
    collecting = next((t for t, msg in logs if COLLECTING.match(msg)), None)
    r: dict[str, Any] = {
        "mode": mode,
        "label": label,
        "wall_s": res.wall_s,
        "first_request_s": first - t0,
        "requests": len(times),
        "written": written,
        "rate_agent": len(times) / (last - first) if last > first else None,
        "rate_written": written / (last_written - first) if last_written > first else None,
        "collection_agent_s": last - first,
        "collection_written_s": last_written - first,
        "collecting_logged_s": collecting - t0 if collecting else None,
        "flow_logs": [[round(t - t0, 3), msg[:200]] for t, msg in logs],
        "load_start": load_start,
        "load_end": load_end,
    }
    if is_slurm(mode):
        submits = sorted(watch.first_seen.values())
        runs = sorted(watch.first_running.values())
        phases = worker_phases(run_dir / "slurm")
        r |= {
            "jobs_over_run": len(watch.first_seen),
            "jobs_most_at_once": watch.most_at_once,
            "job_submitted_s": [s - t0 for s in submits],
            "job_running_s": [s - t0 for s in runs],
            "first_worker_s": {k: v - t0 for k, v in phases.items()},
            "pending_reasons": sorted(watch.pending_reasons),
            "other_jobs_running": watch.others_running,
        }
    return r


def median(values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def rate_row(mode: str, runs: list[dict[str, Any]]) -> list[Any]:
    def med(key: str) -> Any:
        return median([r[key] for r in runs])

    return [
        mode, len(runs), _f(med("wall_s"), "{:.1f}"), _f(med("first_request_s")),
        _f(med("rate_agent"), "{:,.0f}"), _f(med("rate_written"), "{:,.0f}"),
        _f(med("collection_agent_s"), "{:.1f}"),
        ", ".join(f"{r['load_start'][0]:.2f}-{r['load_end'][0]:.2f}" for r in runs),
    ]  # fmt: skip


RATE_HEADERS = ["mode", "runs", "wall s", "command -> first request s", "rollouts/s (agent)",
                "rollouts/s (to last written)", "collection s (agent)", "load 1m start-end"]  # fmt: skip


def startup_row(mode: str, runs: list[dict[str, Any]]) -> list[Any]:
    """Seconds from the command's start to each phase (medians over the runs)."""

    def nth(key: str, i: int) -> Any:
        return median([r[key][i] if len(r.get(key) or []) > i else None for r in runs])

    def phase(name: str) -> Any:
        return median([r.get("first_worker_s", {}).get(name) for r in runs])

    slurm = is_slurm(mode)
    return [
        mode, _f(nth("job_submitted_s", 0)), _f(nth("job_running_s", 0)),
        _f(phase("nanny_started")), _f(phase("worker_registered")),
        _f(phase("storage_probe_run")), _f(phase("stop_plugin_registered")),
        _f(median([r["collecting_logged_s"] for r in runs])),
        _f(median([r["first_request_s"] for r in runs])), _f(nth("job_running_s", 1)),
        "/".join(f"{r['jobs_over_run']} ({r['jobs_most_at_once']})" for r in runs) if slurm else "-",
        "/".join(str(r["other_jobs_running"]) for r in runs) if slurm else "-",
    ]  # fmt: skip


STARTUP_HEADERS = ["mode", "job submitted", "job running", "worker process up",
                   "worker joined", "storage probe on worker", "check done",
                   "'collecting' logged", "first request", "2nd job running",
                   "jobs over the run (most at once)",
                   "others' jobs running"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=20_000, help="tasks, one rollout each (%(default)s)")
    ap.add_argument("--modes", nargs="+", default=["processes2", "slurm1", "slurm2"],
                    help="local, processesN, slurmN (%(default)s)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=1, help="runs per mode; the median is printed")
    ap.add_argument("--latency-ms", type=float, default=20.0,
                    help="the agent's fixed latency (%(default)s)")  # fmt: skip
    ap.add_argument("--parallel", type=int, default=256,
                    help="num_samples_in_parallel, for the whole run (%(default)s)")  # fmt: skip
    ap.add_argument("--chunk-size", type=int, default=1000,
                    help="tasks per chunk: enough chunks to spread over the workers (%(default)s)")  # fmt: skip
    ap.add_argument("--slurm-cores", type=int, default=1, help="ROLLOUTS_SLURM_CORES (%(default)s)")
    ap.add_argument("--slurm-memory", default="1GB", help="ROLLOUTS_SLURM_MEMORY (%(default)s)")
    ap.add_argument("--no-warmup", action="store_true", help="no unmeasured run per mode")
    ap.add_argument("--timeout-s", type=float, default=900.0, help="per run (%(default)s)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, outputs)")
    ap.add_argument("--json", type=Path, default=None, help="default bench/results/slurm.json")
    add_gate_args(ap, budget_s=300.0)
    args = ap.parse_args()
    for mode in args.modes:
        mode_args(mode)  # refuse a bad mode before anything starts
    if any(is_slurm(m) for m in args.modes) and shutil.which("sbatch") is None:
        raise SystemExit("no Slurm here (sbatch not found): bash scripts/slurm.sh start")
    gate = gate_from_args(args)

    from reference_agent.server import write_tasks

    runs: list[dict[str, Any]] = []
    with bench_dir("slurm", args.keep) as d, \
            prefect_server(d / "server-home", log_path=d / "prefect-server.log") as api, \
            reference_agent(args.latency_ms, request_log=d / "requests.jsonl",
                            log_path=d / "agent.log") as agent:  # fmt: skip
        tasks = d / "tasks.jsonl"
        write_tasks(tasks, args.n)
        print(f"{args.n:,} tasks, agent {agent.url} ({args.latency_ms:g} ms), server {api}",
              flush=True)  # fmt: skip
        if not args.no_warmup:
            for mode in dict.fromkeys(args.modes):
                t = time.monotonic()
                one_run(d, api, agent, tasks, mode, args, f"warmup-{mode}",
                        extra=["--limit", str(args.chunk_size)])  # fmt: skip
                print(f"  warm-up {mode}: {time.monotonic() - t:.1f} s", flush=True)
        for i in range(args.repeats):
            for mode in args.modes:
                load = gate.wait(f"{mode} run {i + 1}")
                r = one_run(d, api, agent, tasks, mode, args, f"{mode}-{i + 1}")
                r["gate"] = load
                runs.append(r)
                extra = ""
                if is_slurm(mode):
                    extra = (f", job submitted {r['job_submitted_s'][0]:.2f} s, running "
                             f"{r['job_running_s'][0]:.2f} s, jobs {r['jobs_over_run']}, "
                             f"others' jobs running {r['other_jobs_running']}, pending "
                             f"reasons {r['pending_reasons'] or '-'}")  # fmt: skip
                print(f"  {mode}: wall {r['wall_s']:.1f} s, first request {r['first_request_s']:.2f}"
                      f" s, {r['rate_agent']:,.0f} rollouts/s (agent){extra}, "
                      f"{r['written']:,} written, load {r['load_start'][0]:.2f}", flush=True)  # fmt: skip
                if r["written"] != args.n:
                    raise RuntimeError(f"{mode}: {r['written']} rollouts written of {args.n}")

    print()
    modes = {m: [r for r in runs if r["mode"] == m] for m in dict.fromkeys(args.modes)}
    table = print_table(RATE_HEADERS, [rate_row(m, rs) for m, rs in modes.items()])
    print("\nstart-up, seconds from the command's start (medians):")
    startup = print_table(STARTUP_HEADERS, [startup_row(m, rs) for m, rs in modes.items()])
    print(
        f"\nload average at the end: {' '.join(f'{x:.2f}' for x in loadavg())} "
        f"(1, 5, 15 min; {machine()['nproc']} cores)"
    )
    write_json("slurm", {"machine": machine(), "args": vars(args) | {"json": str(args.json)},
                         "runs": runs, "table": table, "startup_table": startup, "load_gate": gate.log}, args.json)  # fmt: skip


if __name__ == "__main__":
    main()
