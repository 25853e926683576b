"""Benchmark: a long steady run stays bounded (issue 14, part 3).

One `rollouts collect` (the real command, against a running Prefect server, SQLite, its own
PREFECT_HOME) at a steady rate for --minutes: a fixed --num-samples-in-parallel against the
reference agent (its own process, not counted) at lognormal latency (--latency-ms median,
--sigma) with about 1 % faults (HTTP 500, connection resets, 429s; hangs optional), a short
ROLLOUTS_REQUEST_TIMEOUT_S so that faults resolve quickly, and enough tasks that the run never
runs out: it is cut by `--max-duration` (exit status 3). Every --every-s seconds:

- the RSS of the collecting process tree (the command and any children, /proc VmRSS) and its
  CPU (utime + stime, plus that of reaped children, /proc/PID/stat);
- rollouts finished (written + failed for good), read from the run dir with the project's own
  incremental StatusReader at the same instant; per window the rollouts/s and the collector's
  ms of CPU per rollout;
- the total size of the run dir's small state files: every file in it that is not a chunk's
  tasks / rollouts / failures JSONL (run.json, chunks/*.status.json, health.*.json, whatever
  a newer version adds), and how many there are;
- `rollouts status --json OUTPUT --sample-s 0` run as a user would: its wall time and the
  size of its output.

The summary compares the first third of the steady windows (those after the first rollout)
with the last third: RSS (and its slope), CPU per rollout, state-file and status sizes.

    .venv/bin/python bench/soak.py [--minutes 15] [--every-s 30] [--parallel 128]
        [--latency-ms 200] [--sigma 0.5] [--p-500 0.005] [--p-reset 0.003] [--p-429 0.002]
        [--p-hang 0] [--request-timeout-s 10] [--json bench/results/soak.json]
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (
    PY,
    _cpu_s,
    _descendants,
    _status_kb,
    add_gate_args,
    bench_dir,
    cli_env,
    collect_cmd,
    gate_from_args,
    kill_group,
    loadavg,
    machine,
    prefect_server,
    print_table,
    reference_agent,
    write_json,
)

from reference_agent.server import write_tasks
from rollouts.run_state import run_dir_for
from rollouts.status import StatusReader

BULK = (".tasks.jsonl", ".rollouts.jsonl", ".failures.jsonl")  # a chunk's data, not state
HEADERS = ["elapsed s", "rollouts", "rollouts/s", "RSS MB", "CPU ms/rollout", "state files",
           "state bytes", "health bytes", "status --json bytes", "status ms",
           "load 1m"]  # fmt: skip


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants: utime + stime of each live one, plus
    cutime + cstime (its reaped children) of each."""
    # one that ended between the listing and the read counts as nothing
    return sum(_cpu_s(p, reaped_children=True) or 0.0 for p in _descendants(pid))


def tree_rss_mb(pid: int) -> float:
    return sum(_status_kb(p, "VmRSS") or 0 for p in _descendants(pid)) / 1024


def state_files(run_dir: Path) -> dict[str, Any]:
    """Every file of the run dir but the chunks' bulk JSONL: count, bytes, bytes per kind."""
    kinds: dict[str, int] = {}
    count = 0
    for p in run_dir.rglob("*"):
        if p.name.endswith(BULK):
            continue
        try:
            if not p.is_file():
                continue
            size = p.stat().st_size
        except OSError:
            continue  # replaced atomically under us
        count += 1
        kind = re.sub(r"\d+", "N", str(p.relative_to(run_dir)))
        kinds[kind] = kinds.get(kind, 0) + size
    return {"count": count, "bytes": sum(kinds.values()), "by_kind": kinds}


def status_command(output: Path, env: dict[str, str], cwd: Path) -> tuple[float, int, int]:
    """(ms, bytes of stdout, exit status) of `rollouts status --json OUTPUT --sample-s 0`."""
    t0 = time.perf_counter()
    done = subprocess.run([PY, "-m", "rollouts_cli", "status", "--json", "--sample-s", "0",
                           str(output)], env=env, cwd=cwd, capture_output=True, check=False)  # fmt: skip
    return 1000 * (time.perf_counter() - t0), len(done.stdout), done.returncode


def expected_rate(parallel: int, latency_ms: float, sigma: float) -> float:
    """Rollouts/s of ``parallel`` in flight at lognormal latency (mean = median e^(sigma^2/2))."""
    return parallel / (latency_ms / 1000 * math.exp(sigma**2 / 2))


def agent_flags(args: argparse.Namespace) -> list[str]:
    return ["--p-500", str(args.p_500), "--p-reset", str(args.p_reset), "--p-429",
            str(args.p_429), "--p-hang", str(args.p_hang), "--hang-s", str(args.hang_s)]  # fmt: skip


def soak(
    args: argparse.Namespace, d: Path, agent_url: str, api: str, tasks: Path
) -> dict[str, Any]:
    run = d / "soak"
    run.mkdir()
    output = run / "out.jsonl"
    env = cli_env(d / "prefect-home", run / "state", api)
    env["ROLLOUTS_REQUEST_TIMEOUT_S"] = str(args.request_timeout_s)
    cmd = collect_cmd(agent_url, tasks, output, parallel=args.parallel,
                      chunk_size=args.chunk_size,
                      extra=[f"+max_duration={round(args.minutes * 60)}s"])  # fmt: skip
    reader = StatusReader(output, run / "state")
    run_dir = run_dir_for(output, run / "state")
    samples: list[dict[str, Any]] = []
    rows: list[list[Any]] = []
    log = open(d / "collect.log", "wb")
    t0 = time.monotonic()
    print(" | ".join(HEADERS), flush=True)
    proc = subprocess.Popen(cmd, env=env, cwd=run, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        next_at = t0 + args.every_s
        limit = t0 + args.minutes * 60 + 300  # the deadline, the end of the run, and a margin
        while True:
            while proc.poll() is None and time.monotonic() < next_at:
                time.sleep(0.1)
            if proc.poll() is not None:
                break
            if time.monotonic() > limit:
                raise TimeoutError(f"collect still running {limit - t0:.0f} s after its start")
            next_at += args.every_s
            elapsed = time.monotonic() - t0
            cpu, rss = tree_cpu_s(proc.pid), tree_rss_mb(proc.pid)
            st = reader.read()
            finished = st.done + st.failed
            files = state_files(run_dir) if run_dir.exists() else {"count": 0, "bytes": 0,
                                                                   "by_kind": {}}  # fmt: skip
            status_ms, status_bytes, status_rc = status_command(output, env, run)
            prev = samples[-1] if samples else {"elapsed_s": 0.0, "rollouts": 0, "cpu_s": 0.0}
            n = finished - prev["rollouts"]
            s = {"elapsed_s": round(elapsed, 2), "rollouts": finished, "failed": st.failed,
                 "rate": n / (elapsed - prev["elapsed_s"]), "rss_mb": round(rss, 1),
                 "cpu_s": round(cpu, 3), "window_rollouts": n,
                 "cpu_ms_per_rollout": 1000 * (cpu - prev["cpu_s"]) / n if n else None,
                 "state_files": files["count"], "state_bytes": files["bytes"],
                 "state_by_kind": files["by_kind"], "status_json_bytes": status_bytes,
                 # the live health files: rewritten every 2 s, they must not grow
                 "health_bytes": sum(v for k, v in files["by_kind"].items()
                                     if k.startswith("health.")),
                 "status_ms": round(status_ms, 1), "status_exit": status_rc,
                 "chunks_started": sum(1 for c in st.chunks if c.worker),
                 "load_1m": loadavg()[0]}  # fmt: skip
            samples.append(s)
            row = [round(elapsed), finished, f"{s['rate']:.1f}", f"{rss:.1f}",
                   "-" if n == 0 else f"{s['cpu_ms_per_rollout']:.3f}", files["count"],
                   files["bytes"], s["health_bytes"], status_bytes, round(status_ms),
                   s["load_1m"]]  # fmt: skip
            rows.append(row)
            print(" | ".join(f"{v:,}".rjust(len(h)) if isinstance(v, int) else str(v).rjust(len(h))
                             for h, v in zip(HEADERS, row, strict=True)), flush=True)  # fmt: skip
    except BaseException:
        kill_group(proc)
        raise
    finally:
        log.close()
    wall = time.monotonic() - t0
    final = reader.read()
    tail = "\n".join((d / "collect.log").read_text(errors="replace").splitlines()[-15:])
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"collect exited {proc.returncode}:\n{tail}")
    return {"exit": proc.returncode, "wall_s": round(wall, 1), "samples": samples, "rows": rows,
            "final": {"done": final.done, "failed": final.failed, "expected": final.expected},
            "log_tail": tail}  # fmt: skip


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """First third of the steady windows vs the last third (steady: after the first rollout)."""
    steady = [s for i, s in enumerate(samples) if i > 0 and samples[i - 1]["rollouts"] > 0]
    k = len(steady) // 3
    if k == 0:
        return {"steady_windows": len(steady), "note": "too few windows for thirds"}
    first, last = steady[:k], steady[-k:]

    def med(part: list[dict[str, Any]], key: str) -> float:
        return statistics.median(s[key] for s in part)

    def cpu_ms(part: list[dict[str, Any]]) -> float:
        n = sum(s["window_rollouts"] for s in part)
        before = samples[samples.index(part[0]) - 1]["cpu_s"]
        return 1000 * (part[-1]["cpu_s"] - before) / n if n else float("nan")

    rss0, rss1 = med(first, "rss_mb"), med(last, "rss_mb")
    slope = statistics.linear_regression([s["elapsed_s"] / 60 for s in steady],
                                         [s["rss_mb"] for s in steady]).slope  # fmt: skip
    return {
        "steady_windows": len(steady),
        "third_windows": k,
        "rss_mb_first": rss0,
        "rss_mb_last": rss1,
        "rss_growth_mb": rss1 - rss0,
        "rss_growth_pct": 100 * (rss1 - rss0) / rss0,
        "rss_slope_mb_per_min": slope,
        "rss_max_mb": max(s["rss_mb"] for s in steady),
        "cpu_ms_per_rollout_first": cpu_ms(first),
        "cpu_ms_per_rollout_last": cpu_ms(last),
        "rate_first": med(first, "rate"),
        "rate_last": med(last, "rate"),
        "state_bytes_first": med(first, "state_bytes"),
        "state_bytes_last": med(last, "state_bytes"),
        "state_files_first": med(first, "state_files"),
        "state_files_last": med(last, "state_files"),
        "health_bytes_first": med(first, "health_bytes"),
        "health_bytes_last": med(last, "health_bytes"),
        "status_json_bytes_first": med(first, "status_json_bytes"),
        "status_json_bytes_last": med(last, "status_json_bytes"),
        "status_ms_first": med(first, "status_ms"),
        "status_ms_last": med(last, "status_ms"),
    }


def print_summary(s: dict[str, Any]) -> None:
    if "rss_mb_first" not in s:
        print(f"summary: {s}")
        return
    print(f"first third vs last third of {s['steady_windows']} steady windows "
          f"({s['third_windows']} each):")  # fmt: skip
    print_table(["", "first", "last", "change"], [
        ["RSS MB (median)", f"{s['rss_mb_first']:.1f}", f"{s['rss_mb_last']:.1f}",
         f"{s['rss_growth_mb']:+.1f} MB ({s['rss_growth_pct']:+.1f} %)"],
        ["RSS slope, steady windows", "", "", f"{s['rss_slope_mb_per_min']:+.2f} MB/min"],
        ["CPU ms/rollout", f"{s['cpu_ms_per_rollout_first']:.3f}",
         f"{s['cpu_ms_per_rollout_last']:.3f}",
         f"{s['cpu_ms_per_rollout_last'] - s['cpu_ms_per_rollout_first']:+.3f}"],
        ["rollouts/s (median)", f"{s['rate_first']:.1f}", f"{s['rate_last']:.1f}", ""],
        *([label, f"{s[key + '_first']:,.0f}", f"{s[key + '_last']:,.0f}",
           f"{s[key + '_last'] - s[key + '_first']:+,.0f}"]
          for label, key in (("state files (median)", "state_files"),
                             ("state bytes (median)", "state_bytes"),
                             ("health file bytes (median)", "health_bytes"),
                             ("status --json bytes (median)", "status_json_bytes"),
                             ("status ms (median)", "status_ms"))),
    ])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--minutes", type=float, default=15.0, help="length of the run (--max-duration)"
    )
    ap.add_argument("--every-s", type=float, default=30.0, help="seconds between two samples")
    ap.add_argument("--parallel", type=int, default=128, help="--num-samples-in-parallel")
    ap.add_argument("--chunk-size", type=int, default=10_000, help="the command's default")
    ap.add_argument("--latency-ms", type=float, default=200.0, help="median agent latency")
    ap.add_argument("--sigma", type=float, default=0.5, help="lognormal sigma of the latency")
    ap.add_argument("--p-500", type=float, default=0.005)
    ap.add_argument("--p-reset", type=float, default=0.003)
    ap.add_argument("--p-429", type=float, default=0.002)
    ap.add_argument("--p-hang", type=float, default=0.0,
                    help="each hang costs a whole request timeout (%(default)s)")  # fmt: skip
    ap.add_argument("--hang-s", type=float, default=60.0, help="a hang's length (> the timeout)")
    ap.add_argument("--request-timeout-s", type=float, default=10.0,
                    help="ROLLOUTS_REQUEST_TIMEOUT_S of the command (%(default)s)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", type=int, default=None,
                    help="tasks to write (default: expected rate x duration x 1.3)")  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--json", type=Path, default=None)
    add_gate_args(ap, budget_s=180.0)
    args = ap.parse_args()
    gate = gate_from_args(args)

    rate = expected_rate(args.parallel, args.latency_ms, args.sigma)
    n_rows = args.rows or math.ceil(rate * args.minutes * 60 * 1.3)
    print(f"soak: {args.minutes:g} min at C={args.parallel}, latency lognormal median "
          f"{args.latency_ms:g} ms sigma {args.sigma:g} (~{rate:,.0f} rollouts/s expected), "
          f"faults 500 {args.p_500:g} reset {args.p_reset:g} 429 {args.p_429:g} hang "
          f"{args.p_hang:g}; {n_rows:,} tasks", flush=True)  # fmt: skip
    result: dict[str, Any] = {"machine": machine(), "args": vars(args) | {"json": str(args.json)},
                              "rows_written": n_rows, "expected_rate": rate}  # fmt: skip
    with bench_dir("soak", args.keep) as d, \
            reference_agent(args.latency_ms, args.sigma, seed=args.seed, log_path=d / "agent.log",
                            extra=agent_flags(args)) as agent, \
            prefect_server(d / "server-home", log_path=d / "server.log") as api:  # fmt: skip
        tasks = d / "tasks.jsonl"
        write_tasks(tasks, n_rows, seed=args.seed)
        warm = d / "warm"  # registers the flow with the server, unmeasured
        warm.mkdir()
        subprocess.run(collect_cmd(agent.url, tasks, warm / "out.jsonl", parallel=args.parallel,
                                   chunk_size=args.chunk_size, extra=["+limit=20"]),
                       env=cli_env(d / "prefect-home", warm / "state", api), cwd=warm,
                       check=True, capture_output=True)  # fmt: skip
        result["load_gate"] = gate.wait("soak")
        result["load_start"] = loadavg()
        run = soak(args, d, agent.url, api, tasks)
        result["load_end"] = loadavg()
    rows = run.pop("rows")
    result |= run
    result["summary"] = summary = summarize(run["samples"])
    print()
    print_table(HEADERS, rows)
    ls, le = result["load_start"], result["load_end"]
    print(f"\nexit {run['exit']} after {run['wall_s']:.0f} s; {run['final']['done']:,} rollouts "
          f"written, {run['final']['failed']} failed for good, of {run['final']['expected']:,} "
          f"tasks; load average (1/5/15 min) at start {ls[0]:.2f}/{ls[1]:.2f}/{ls[2]:.2f}, at "
          f"end {le[0]:.2f}/{le[1]:.2f}/{le[2]:.2f}")  # fmt: skip
    if run["exit"] == 0:
        print("WARNING: the run ran out of tasks before its deadline: not steady to the end")
    print_summary(summary)
    write_json("soak", result, args.json)


if __name__ == "__main__":
    main()
