"""Benchmark: what a shared agent limit (ROLLOUTS_AGENT_LIMITS) costs one run.

The real `rollouts collect` against a zero-latency reference agent (the collector is the
bottleneck, so any cost of the limit shows), on a `prefect server start` of its own (SQLite,
what `make server` runs), once per variant and repeat, alternating:

- ``none``: no limit;
- ``generous``: a limit far above the run's budget (``--generous``, default 10,000);
- ``at budget``: a limit equal to the run's budget (``--parallel``), always full.

Reported per run: collection rollouts/s (first request to last rollout written), start-up
(command to first request) and the CLI's CPU per rollout while it collects.

    .venv/bin/python bench/agent_limits.py [--n 20000] [--parallel 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (
    add_gate_args,
    bench_dir,
    gate_from_args,
    machine,
    prefect_server,
    print_table,
    reference_agent,
    run_collect,
    write_json,
)

from reference_agent.server import write_tasks

AGENT = "ref"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--parallel", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=5_000)
    ap.add_argument("--generous", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true")
    add_gate_args(ap)
    args = ap.parse_args()
    gate = gate_from_args(args)
    variants: dict[str, int | None] = {
        "none": None, "generous": args.generous, "at budget": args.parallel,
    }  # fmt: skip
    rows: list[list[Any]] = []
    results: list[dict[str, Any]] = []
    with bench_dir("agent-limits", args.keep) as d:
        inp = d / "tasks.jsonl"
        write_tasks(inp, args.n, seed=0)
        with prefect_server(d / "prefect-home", log_path=d / "server.log") as api_url, \
                reference_agent(0.0, request_log=d / "agent.jsonl") as agent:  # fmt: skip
            for repeat in range(args.repeats):
                for name, limit in variants.items():
                    label = f"{name} #{repeat + 1}"
                    load = gate.wait(label)
                    env = {"ROLLOUTS_AGENTS": f'{{"{AGENT}": "{agent.url}"}}'}
                    if limit is not None:
                        env["ROLLOUTS_AGENT_LIMITS"] = f'{{"{AGENT}": {limit}}}'
                    work = d / f"work-{name.replace(' ', '-')}-{repeat}"
                    work.mkdir()
                    timing = run_collect(
                        agent, inp, work / "out.jsonl", n=args.n, parallel=args.parallel,
                        chunk_size=args.chunk_size, prefect_home=d / "prefect-home",
                        work_dir=work, api_url=api_url, extra=[f"+agent_name={AGENT}"],
                        env_extra=env, log_path=d / f"{label}.log",
                    )  # fmt: skip
                    rate = args.n / timing.collection_s
                    cpu_ms = 1000 * timing.cpu_cli_collection_s / args.n
                    rows.append([label, limit or "-", f"{rate:,.0f}",
                                 f"{timing.startup_s:.1f}", f"{cpu_ms:.2f}"])  # fmt: skip
                    results.append({"variant": name, "limit": limit, "repeat": repeat,
                                    "rollouts_per_s": rate, "cpu_ms_per_rollout": cpu_ms,
                                    "load": load,
                                    **timing.as_dict()})  # fmt: skip
    print_table(["run", "limit", "rollouts/s", "start-up s", "CPU ms/rollout"], rows)
    summary = []
    for name in variants:
        rates = [r["rollouts_per_s"] for r in results if r["variant"] == name]
        summary.append([name, f"{statistics.median(rates):,.0f}",
                        f"{min(rates):,.0f}-{max(rates):,.0f}"])  # fmt: skip
    print_table(["variant", "median rollouts/s", "range"], summary)
    write_json("agent_limits", {"machine": machine(), "args": vars(args), "runs": results})


if __name__ == "__main__":
    main()
