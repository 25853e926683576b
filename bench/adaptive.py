"""Benchmark: `--num-samples-in-parallel auto` against the best fixed value of a sweep.

The reference agent with a capacity: K requests at full speed, latency in proportion above
(`--capacity`), 429 above `--reject-above`. For each scenario (steady K; K halved mid-run by
`--capacity-schedule`) the whole `rollouts collect` command runs with each fixed value of the
sweep and with `auto`, each against a fresh agent; collection time is from the agent's first
/run to the last rollout written. Prints each run's time, its ratio to the scenario's best fixed
value, and the share of requests the agent rejected (429).

    .venv/bin/python bench/adaptive.py [--capacity 64] [--latency-ms 100] [--n 20000]
        [--sweep 32 48 64 96 128 192] [--halve-at 15] [--reject-above 256]
        [--json bench/results/adaptive.json]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    bench_dir,
    cli_env,
    collect_cmd,
    last_rollout_written,
    loadavg,
    machine,
    prefect_server,
    print_table,
    reference_agent,
    write_json,
)


def one_run(d: Path, api: str, tasks: Path, n: int, parallel: str, agent_flags: list[str],
            latency_ms: float) -> dict[str, Any]:  # fmt: skip
    run = d / f"run-{parallel}-{time.monotonic_ns()}"
    run.mkdir()
    log = run / "agent-requests.jsonl"
    with reference_agent(latency_ms, request_log=log, extra=agent_flags) as agent:
        cmd = collect_cmd(agent.url, tasks, run / "out.jsonl", parallel=0, chunk_size=10_000,
                          extra=[f"+limit={n}", f"+num_samples_in_parallel={parallel}"])  # fmt: skip
        cmd = [c for c in cmd if c != "+num_samples_in_parallel=0"]
        t0 = time.monotonic()
        done = subprocess.run(cmd, env=cli_env(d / "prefect-home", run / "state", api), cwd=run,
                              capture_output=True, text=True, check=False)  # fmt: skip
        wall = time.monotonic() - t0
        if done.returncode not in (0, 1):  # 1: rollouts left missing (e.g. 429s past retries)
            raise RuntimeError(f"collect exited {done.returncode}: {done.stderr[-2000:]}")
    records = [orjson.loads(line) for line in log.read_bytes().splitlines() if line]
    first = min(r["time"] for r in records)
    last_written, written = last_rollout_written(run / "out.jsonl", run / "state")
    rejected = sum(1 for r in records if r["outcome"] == "429")
    return {"parallel": parallel, "collection_s": last_written - first, "wall_s": wall,
            "written": written, "requests": len(records), "rejected": rejected,
            "exit": done.returncode}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--capacity", type=int, default=64)
    ap.add_argument("--latency-ms", type=float, default=100.0)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--sweep", type=int, nargs="+", default=[32, 48, 64, 96, 128, 192])
    ap.add_argument("--halve-at", type=float, default=15.0, help="seconds after the first /run")
    ap.add_argument("--reject-above", type=int, default=256)
    ap.add_argument("--scenarios", nargs="+", default=["steady", "halved"],
                    choices=["steady", "halved"])  # fmt: skip
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from reference_agent.server import write_tasks

    base = ["--capacity", str(args.capacity), "--reject-above", str(args.reject_above),
            "--retry-after-s", "0.1"]  # fmt: skip
    scenarios = {
        "steady": base,
        "halved": [*base, "--capacity-schedule", f"{args.halve_at}:{args.capacity // 2}"],
    }
    results: dict[str, Any] = {"machine": machine(), "args": vars(args) | {"json": str(args.json)},
                               "runs": []}  # fmt: skip
    rows = []
    with bench_dir("adaptive", args.keep) as d, prefect_server(d / "server-home") as api:
        tasks = d / "tasks.jsonl"
        write_tasks(tasks, args.n)
        for name in args.scenarios:
            runs = []
            for parallel in [*map(str, args.sweep), "auto"]:
                load = loadavg()[0]
                r = one_run(d, api, tasks, args.n, parallel, scenarios[name], args.latency_ms)
                r |= {"scenario": name, "load_1m": load}
                runs.append(r)
                results["runs"].append(r)
                print(f"{name} C={parallel}: {r['collection_s']:.1f} s, {r['written']} written "
                      f"(exit {r['exit']}), "
                      f"{r['rejected']} of {r['requests']} requests rejected (load {load:.2f})",
                      flush=True)  # fmt: skip
            # a fixed value that left rollouts missing is no candidate for the best
            best = min(r["collection_s"] for r in runs if r["parallel"] != "auto" and not r["exit"])
            for r in runs:
                rows.append([name, r["parallel"], f"{r['collection_s']:.1f}",
                             f"{r['collection_s'] / best:.2f}",
                             f"{100 * r['rejected'] / max(1, r['requests']):.2f}%",
                             r["written"]])  # fmt: skip
    print_table(["scenario", "C", "collection s", "x best fixed", "rejected", "written"], rows)
    write_json("adaptive", results, args.json)


if __name__ == "__main__":
    main()
