"""Benchmark: CPU per rollout of the whole `rollouts collect` command, beside a bare aiohttp loop.

Against one zero-latency reference agent (its own process, not counted) and a running Prefect
server (SQLite, its own PREFECT_HOME), for each C: the command's CPU (it and its children, from
RUSAGE_CHILDREN) for a small and a large N; the marginal figure (CPU(large) - CPU(small)) /
(large - small) excludes start-up, which would otherwise swamp it. The same for the bare loop
(bench/_bare_client.py --client aiohttp): this machine's limit. One unmeasured warm-up run
first registers the flow. With `--processes 1 2`, the command runs once per process count
(`--processes P`): CPU per rollout and rollouts/s of each, the agent on the same cores.

    .venv/bin/python bench/cpu_per_rollout.py [--parallel 256 64] [--small 2000 --large 42000]
        [--processes 1 2] [--repeats 3] [--json bench/results/cpu_per_rollout.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    PY,
    ROOT,
    base_env,
    bench_dir,
    cli_env,
    collect_cmd,
    loadavg,
    machine,
    prefect_server,
    print_table,
    reference_agent,
    write_json,
)


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, str]:
    """(CPU s of the command and its children, wall s, stdout)."""
    cpu0, t0 = children_cpu_s(), time.monotonic()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    cpu, wall = children_cpu_s() - cpu0, time.monotonic() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} exited {done.returncode}: {done.stderr[-2000:]}")
    return cpu, wall, done.stdout


def collect_run(
    d: Path, api: str, agent_url: str, tasks: Path, n: int, c: int, processes: int = 1
) -> tuple[float, float]:
    run = d / f"run-{n}-{c}-{time.monotonic_ns()}"
    run.mkdir()
    cmd = collect_cmd(agent_url, tasks, run / "out.jsonl", parallel=c, chunk_size=10_000,
                      extra=[f"+limit={n}", f"+processes={processes}"])  # fmt: skip
    cpu, wall, _ = timed(cmd, cli_env(d / "prefect-home", run / "state", api), run)
    return cpu, wall


def bare_run(d: Path, agent_url: str, tasks: Path, n: int, c: int) -> tuple[float, float]:
    cmd = [PY, str(ROOT / "bench" / "_bare_client.py"), "--client", "aiohttp", "--url", agent_url,
           "--tasks", str(tasks), "--n", str(n), "--parallel", str(c),
           "--out", str(d / f"bare-{n}-{c}.jsonl")]  # fmt: skip
    cpu, _, out = timed(cmd, base_env(), d)
    return cpu, float(json.loads(out)["loop_s"])


def marginal(small: tuple[float, float], large: tuple[float, float], n: int) -> tuple[float, float]:
    """(ms of CPU per rollout, rollouts/s) over the n rollouts between two runs."""
    return 1000 * (large[0] - small[0]) / n, n / (large[1] - small[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parallel", type=int, nargs="+", default=[256, 64])
    ap.add_argument("--small", type=int, default=2_000)
    ap.add_argument("--large", type=int, default=42_000)
    ap.add_argument("--processes", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from reference_agent.server import write_tasks

    rows: list[list[Any]] = []
    results: dict[str, Any] = {"machine": machine(), "args": vars(args) | {"json": str(args.json)},
                               "runs": []}  # fmt: skip
    span = args.large - args.small
    with bench_dir("cpu", args.keep) as d, reference_agent() as agent, \
            prefect_server(d / "server-home") as api:  # fmt: skip
        tasks = d / "tasks.jsonl"
        write_tasks(tasks, args.large)
        collect_run(d, api, agent.url, tasks, args.small, args.parallel[0])  # warm-up
        for c in args.parallel:
            ours: dict[int, list[tuple[float, float]]] = {p: [] for p in args.processes}
            bare = []
            for _ in range(args.repeats):
                load = loadavg()[0]
                for p in args.processes:
                    ours[p].append(marginal(
                        collect_run(d, api, agent.url, tasks, args.small, c, p),
                        collect_run(d, api, agent.url, tasks, args.large, c, p), span))  # fmt: skip
                bare.append(marginal(bare_run(d, agent.url, tasks, args.small, c),
                                     bare_run(d, agent.url, tasks, args.large, c), span))
                results["runs"].append({"parallel": c, "load_1m": load,
                                        "ours": {p: v[-1] for p, v in ours.items()},
                                        "bare_aiohttp": bare[-1]})  # fmt: skip
                figures = "; ".join(f"{p} process(es) {v[-1][0]:.3f} ms/rollout {v[-1][1]:,.0f}/s"
                                    for p, v in ours.items())  # fmt: skip
                print(f"C={c}: ours {figures}; bare aiohttp {bare[-1][0]:.3f} ms "
                      f"{bare[-1][1]:,.0f}/s (load {load:.2f})", flush=True)  # fmt: skip
            for p, v in ours.items():
                rows.append([c, p, f"{statistics.median(o for o, _ in v):.3f}",
                             " ".join(f"{o:.3f}" for o, _ in v),
                             f"{statistics.median(r for _, r in v):,.0f}",
                             f"{statistics.median(b for b, _ in bare):.3f}",
                             f"{statistics.median(r for _, r in bare):,.0f}"])  # fmt: skip
    print_table(["C", "processes", "ours ms/rollout (median)", "runs", "ours rollouts/s", "bare aiohttp ms",
                 "bare rollouts/s"], rows)  # fmt: skip
    write_json("cpu_per_rollout", results, args.json)


if __name__ == "__main__":
    main()
