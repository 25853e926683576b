"""Benchmark: thousands of rollouts in flight (issue 12, item 3).

For each case (C in flight, agent latency L, N rollouts) the whole `rollouts collect` command
runs as a subprocess against a fresh reference agent (its own process, fixed latency, request
log) and a running Prefect server (SQLite, its own PREFECT_HOME, started once; one unmeasured
warm-up run registers the flow). Ideal = N x L / C. Printed per case:

- collection, agent: the agent's first /run request received -> its last answer sent (its
  GET /stats), and its ratio to the ideal (target: at most 1.05);
- collection, files: the first request -> the last rollout written to a chunk file (mtime);
- wall: the whole command, start to exit (Prefect start-up, split, merge, metrics included);
- peak RSS of the command (VmHWM of the process, sampled; and of its children, summed), and
  of the agent (target for the command: under 600 MB);
- failures: rows of `<output>_failures.jsonl` by `_ng_failure_class`; retries: the requests
  the command reports sending (its per-chunk log lines) minus N; requests the agent received;
- the agent's peak concurrent /run requests, peak open file descriptors of both processes.

    .venv/bin/python bench/concurrency.py [--case 4096:5:16384 --case 16384:30:65536]
        [--extra ARGS] [--multi ARGS] [--keep] [--json bench/results/concurrency.json]

``--extra '+max_parallel_chunks=8'`` passes arguments to every run; ``--multi '--processes 2'``
runs every case a second time with those arguments added (for a multi-process collection).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    LOOPWATCH,
    PY,
    _cpu_s,
    _descendants,
    _status_kb,
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
    read_loopwatch,
    reference_agent,
    run_measured,
    write_json,
)

DEFAULT_CASES = ["4096:5:16384", "16384:30:65536"]
TARGET_RATIO = 1.05
TARGET_RSS_MB = 600.0
_CHUNK_LINE = re.compile(rb"chunk \d+: .*?\((\d+) requests, worker")


@dataclass(frozen=True)
class Case:
    parallel: int
    latency_s: float
    n: int

    @classmethod
    def parse(cls, text: str) -> Case:
        c, latency, n = text.split(":")
        return cls(int(c), float(latency), int(n))

    @property
    def ideal_s(self) -> float:
        return self.n * self.latency_s / self.parallel

    @property
    def label(self) -> str:
        return f"C={self.parallel} L={self.latency_s:g}s N={self.n}"


def _open_fds(pid: int) -> int:
    with contextlib.suppress(OSError):
        return len(os.listdir(f"/proc/{pid}/fd"))
    return 0


@dataclass
class FdSampler:
    """Peak open file descriptors of the command (with its descendants) and of the agent."""

    agent_pid: int
    cli_pid: int | None = None
    peak_cli: int = 0
    peak_agent: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.wait(0.25):
            self.peak_agent = max(self.peak_agent, _open_fds(self.agent_pid))
            if self.cli_pid is not None:
                fds = sum(_open_fds(p) for p in _descendants(self.cli_pid))
                self.peak_cli = max(self.peak_cli, fds)

    def stop(self) -> None:
        self._stop.set()


def failures_by_class(output: Path) -> dict[str, int]:
    path = output.with_name(output.stem + "_failures.jsonl")
    if not path.exists():
        return {}
    with open(path, "rb") as f:
        return dict(Counter(str(orjson.loads(line).get("_ng_failure_class")) for line in f))


def agent_log_problems(path: Path) -> int:
    """Error lines the agent printed (aiohttp's accept/handler errors, EMFILE, tracebacks)."""
    if not path.exists():
        return 0
    text = path.read_text(errors="replace")
    return sum(1 for line in text.splitlines() if "Error" in line or "Traceback" in line)


def run_case(d: Path, api: str, tasks: Path, case: Case, extra: list[str], label: str,
             chunk_size: int, gate: Any, loopwatch: bool = False) -> dict[str, Any]:  # fmt: skip
    run = d / f"run-{case.parallel}-{case.n}-{time.monotonic_ns()}"
    run.mkdir()
    output = run / "out.jsonl"
    gate_entry = gate.wait(f"{case.label} {label}")
    with reference_agent(latency_ms=case.latency_s * 1000, request_log=run / "requests.jsonl",
                         log_path=run / "agent.log") as agent:  # fmt: skip
        sampler = FdSampler(agent.proc.pid)
        watcher = threading.Thread(target=sampler.run, daemon=True)
        watcher.start()
        cmd = collect_cmd(agent.url, tasks, output, parallel=case.parallel,
                          chunk_size=chunk_size, extra=[f"+limit={case.n}", *extra])  # fmt: skip
        if loopwatch:  # the CLI under the event-loop stall and GC watchdog
            cmd = [PY, str(LOOPWATCH), str(run / "loopwatch.jsonl"), *cmd[3:]]
        # INFO on the console: each chunk's line says how many requests it sent (retries).
        env = cli_env(d / "prefect-home", run / "state", api)
        env["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "INFO"
        load_before = loadavg()
        agent_cpu0 = _cpu_s(agent.proc.pid) or 0.0
        try:
            res = run_measured(cmd, env=env, cwd=run, log_path=run / "collect.log",
                               timeout_s=case.ideal_s * 10 + 300,
                               on_start=lambda p: setattr(sampler, "cli_pid", p.pid))  # fmt: skip
        finally:
            sampler.stop()
            watcher.join()
        load_after = loadavg()
        stats = httpx.get(f"{agent.url}/stats", timeout=10).json()
        agent_rss_mb = (_status_kb(agent.proc.pid, "VmHWM") or 0) / 1024
        agent_cpu = (_cpu_s(agent.proc.pid) or 0.0) - agent_cpu0
    log = (run / "collect.log").read_bytes()
    sent = sum(int(m) for m in _CHUNK_LINE.findall(log))
    first, last = stats["first_received"], stats["last_answered"]
    collection = (last - first) if first and last else float("nan")
    try:
        last_write, written = last_rollout_written(output, run / "state")
        collection_files = last_write - first if first else float("nan")
    except RuntimeError:
        written, collection_files = 0, float("nan")
    failures = failures_by_class(output)
    result = {
        "case": case.__dict__ | {"ideal_s": case.ideal_s},
        "label": label,
        "extra": extra,
        "returncode": res.returncode,
        "collection_agent_s": collection,
        "ratio": collection / case.ideal_s,
        "collection_files_s": collection_files,
        "wall_s": res.wall_s,
        "rss_cli_mb": res.hwm_main_mb,
        "rss_children_mb": res.hwm_children_mb,
        "rss_wait4_mb": res.maxrss_wait4_mb,
        "rss_agent_mb": agent_rss_mb,
        "rollouts_written": written,
        "failures": failures,
        "requests_sent": sent,
        "retries": sent - case.n if sent else None,
        "agent_requests": stats["requests"],
        "agent_peak_in_flight": stats["peak_in_flight"],
        "peak_fds_cli": sampler.peak_cli,
        "peak_fds_agent": sampler.peak_agent,
        "agent_error_lines": agent_log_problems(run / "agent.log"),
        "cpu_s": res.cpu_s,  # the command and its children, start-up included
        "cpu_cli_collection_s": res.cpu_between(first, last)[0] if first and last else None,
        "cpu_agent_s": agent_cpu,
        "loopwatch": read_loopwatch(run / "loopwatch.jsonl", first, last) if loopwatch else None,
        "load_before": load_before,
        "load_after": load_after,
        "gate": gate_entry,
    }
    if res.returncode != 0:
        print(f"  collect exited {res.returncode}:\n{res.tail(15)}", flush=True)
    print(f"  {case.label} {label}: collection {collection:.2f} s (ideal {case.ideal_s:.1f}, "
          f"x{collection / case.ideal_s:.3f}), wall {res.wall_s:.1f} s, RSS {res.hwm_main_mb:.0f}"
          f" MB, agent {agent_rss_mb:.0f} MB, peak in flight {stats['peak_in_flight']}, "
          f"failures {failures or 0}, retries {result['retries']}; CPU s: command "
          f"{result['cpu_cli_collection_s'] or 0:.1f} during collection, agent {agent_cpu:.1f}",
          flush=True)  # fmt: skip
    if result["loopwatch"]:
        lw = result["loopwatch"]
        print(f"  loop: GC {lw['gc_ms']:.0f} ms ({lw['gc']}), stalls > 50 ms: "
              f"{lw['stalls_over_50ms']} ({lw['stall_ms']:.0f} ms, max {lw['stall_max_ms']:.0f});"
              f" top {lw['stall_top_frames'][:3]}", flush=True)  # fmt: skip
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", default=None, metavar="C:L_S:N",
                    help=f"in flight : latency s : rollouts (repeatable; default {DEFAULT_CASES})")  # fmt: skip
    ap.add_argument("--extra", default="", help="arguments added to every `rollouts collect`")
    ap.add_argument("--multi", default=None,
                    help="also run each case with these arguments added (e.g. '--processes 2')")  # fmt: skip
    ap.add_argument("--chunk-size", type=int, default=10_000, help="(%(default)s: the CLI's)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--loopwatch", action="store_true",
                    help="run the CLI under bench/_loopwatch.py (event-loop stalls, GC time)")  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--json", type=Path, default=None)
    add_gate_args(ap, budget_s=600.0)
    args = ap.parse_args()
    cases = [Case.parse(c) for c in (args.case or DEFAULT_CASES)]
    variants = [("one process", shlex.split(args.extra))]
    if args.multi:
        variants.append((args.multi, shlex.split(args.extra) + shlex.split(args.multi)))

    from reference_agent.server import write_tasks

    gate = gate_from_args(args)
    results: dict[str, Any] = {"machine": machine(), "args": vars(args) | {"json": str(args.json)},
                               "runs": []}  # fmt: skip
    rows: list[list[Any]] = []
    with bench_dir("concurrency", args.keep) as d, prefect_server(d / "server-home") as api:
        tasks = d / "tasks.jsonl"
        write_tasks(tasks, max(c.n for c in cases))
        with reference_agent() as warm:  # registers the flow; not measured
            run_measured(collect_cmd(warm.url, tasks, d / "warm" / "out.jsonl", parallel=64,
                                     chunk_size=args.chunk_size, extra=["+limit=100"]),
                         env=cli_env(d / "prefect-home", d / "warm" / "state", api), cwd=d)  # fmt: skip
        for case in cases:
            for label, extra in variants:
                for _ in range(args.repeats):
                    r = run_case(d, api, tasks, case, extra, label, args.chunk_size, gate,
                                 args.loopwatch)
                    results["runs"].append(r)
                    fails = ", ".join(f"{k} {v}" for k, v in sorted(r["failures"].items()))
                    rows.append([case.label, label, f"{case.ideal_s:.1f}",
                                 f"{r['collection_agent_s']:.2f}", f"{r['ratio']:.3f}",
                                 f"{r['collection_files_s']:.2f}", f"{r['wall_s']:.1f}",
                                 f"{r['rss_cli_mb']:.0f}",
                                 f"{sum(r['rss_children_mb'].values()):.0f}",
                                 f"{r['rss_agent_mb']:.0f}", fails or "0",
                                 r["retries"], r["agent_peak_in_flight"],
                                 f"{r['peak_fds_cli']}/{r['peak_fds_agent']}",
                                 f"{r['load_before'][0]:.2f}"])  # fmt: skip
    print_table(["case", "collection", "ideal s", "agent s", "ratio", "files s", "wall s",
                 "RSS MB", "children MB", "agent MB", "failures", "retries", "agent peak",
                 "fds cli/agent", "load"], rows)  # fmt: skip
    print(f"targets: ratio <= {TARGET_RATIO}, RSS < {TARGET_RSS_MB:.0f} MB, no failures")
    write_json("concurrency", results, args.json)


if __name__ == "__main__":
    main()
