"""Benchmark: what Prefect costs a collection: start-up and per chunk.

The real CLI collects the same N rollouts (zero-latency reference agent on 127.0.0.1) in one
chunk (chunk_size N) and in many (chunk_size --small-chunk), first with Prefect's temporary API
(no PREFECT_API_URL: the CLI starts one per run) and then against a real `prefect server start`
(its own PREFECT_HOME in a temp dir, analytics off, PREFECT_API_URL set for the runs).

- start-up: command start -> first request the agent receives (--request-log),
- per-chunk overhead: (t_many_chunks - t_one_chunk) / (n_chunks - 1), on the total time and on
  the collection phase (first request -> last rollout written); medians of --repeats runs.
The very first run on a fresh PREFECT_HOME (the temporary API creates its database) is reported
on its own as the cold start.

    .venv/bin/python bench/prefect_cost.py [--n 2000] [--small-chunk 50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

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


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=2000, help="rollouts per run")
    ap.add_argument("--small-chunk", type=int, default=50, help="chunk_size of the many-chunk runs")
    ap.add_argument("--parallel", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="runs per configuration (median)")
    ap.add_argument("--modes", nargs="+", default=["ephemeral", "server"],
                    choices=["ephemeral", "server"])  # fmt: skip
    ap.add_argument("--keep", action="store_true")
    ap.add_argument(
        "--json", type=Path, default=None, help="default bench/results/prefect_cost.json"
    )
    add_gate_args(ap)
    args = ap.parse_args()
    gate = gate_from_args(args)

    from reference_agent.server import write_tasks

    n_chunks = math.ceil(args.n / args.small_chunk)
    runs: list[dict[str, Any]] = []
    cold: dict[str, Any] | None = None
    summary: list[dict[str, Any]] = []
    with bench_dir("prefect-cost", args.keep) as tmp:
        tasks = tmp / "tasks.jsonl"
        write_tasks(tasks, args.n)
        with reference_agent(0, 0, tmp / "requests.jsonl") as agent:
            for mode in args.modes:
                home = tmp / f"home-{mode}"
                work = tmp / f"work-{mode}"
                work.mkdir()
                server_home = tmp / "server-home"

                def collect(label: str, chunk: int, i: int, api_url: str | None,
                            home: Path = home, work: Path = work, mode: str = mode) -> dict:  # fmt: skip
                    load = gate.wait(f"{mode} {label} #{i}")
                    t = run_collect(agent, tasks, tmp / "out" / f"{mode}-{label}-{i}.jsonl",
                                    n=args.n, parallel=args.parallel, chunk_size=chunk,
                                    prefect_home=home, work_dir=work, api_url=api_url,
                                    log_path=tmp / f"{mode}-{label}-{i}.log")  # fmt: skip
                    assert t.rollouts_written == args.n, t
                    r = {"mode": mode, "config": label, "chunk_size": chunk,
                         "chunks": math.ceil(args.n / chunk), "repeat": i, **t.as_dict(),
                         "cpu_server_s": round(sum(t.cpu_children_s.values()), 3),
                         "load": load}  # fmt: skip
                    print(f"    start-up {t.startup_s:.2f} s, collection {t.collection_s:.2f} s, "
                          f"total {t.total_s:.2f} s", flush=True)  # fmt: skip
                    return r

                def series(api_url: str | None, collect: Any = collect, mode: str = mode) -> None:
                    for i in range(args.repeats):
                        # alternate, so drift in the machine's load hits both configurations
                        runs.append(collect("one chunk", args.n, i, api_url))
                        runs.append(collect(f"{n_chunks} chunks", args.small_chunk, i, api_url))

                if mode == "ephemeral":
                    cold = collect("cold start (fresh PREFECT_HOME)", args.n, 0, None)
                    series(None)
                else:
                    with prefect_server(server_home, log_path=tmp / "server.log") as url:
                        # the first run registers the flow and the task keys: not measured
                        collect("warm-up", args.n, 0, url)
                        series(url)

    for mode in args.modes:
        one = [r for r in runs if r["mode"] == mode and r["config"] == "one chunk"]
        many = [r for r in runs if r["mode"] == mode and r["config"] != "one chunk"]
        med = {k: (statistics.median(r[k] for r in one), statistics.median(r[k] for r in many))
               for k in ("startup_s", "collection_s", "after_s", "total_s", "cpu_cli_s",
                         "cpu_server_s")}  # fmt: skip
        summary.append({
            "mode": mode, "n": args.n, "chunks_many": n_chunks,
            "startup_s": round(statistics.median([r["startup_s"] for r in one + many]), 3),
            "startup_min_s": round(min(r["startup_s"] for r in one + many), 3),
            "startup_max_s": round(max(r["startup_s"] for r in one + many), 3),
            "one_chunk_total_s": round(med["total_s"][0], 3),
            "many_chunks_total_s": round(med["total_s"][1], 3),
            "one_chunk_collection_s": round(med["collection_s"][0], 3),
            "many_chunks_collection_s": round(med["collection_s"][1], 3),
            "per_chunk_total_ms": round(1000 * (med["total_s"][1] - med["total_s"][0])
                                        / (n_chunks - 1), 1),
            "per_chunk_collection_ms": round(1000 * (med["collection_s"][1]
                                                     - med["collection_s"][0]) / (n_chunks - 1), 1),
            "after_s": round(med["after_s"][0], 3),
            "per_chunk_cli_cpu_ms": round(1000 * (med["cpu_cli_s"][1] - med["cpu_cli_s"][0])
                                          / (n_chunks - 1), 1),
            "per_chunk_server_cpu_ms": round(1000 * (med["cpu_server_s"][1]
                                                     - med["cpu_server_s"][0]) / (n_chunks - 1), 1),
            "cli_cpu_one_chunk_s": round(med["cpu_cli_s"][0], 2),
            "server_cpu_one_chunk_s": round(med["cpu_server_s"][0], 2),
            "loads": [r["load"]["load_1m"] for r in one + many],
        })  # fmt: skip

    print()
    print(f"N = {args.n:,} rollouts, zero-latency agent, C = {args.parallel}; one chunk "
          f"(chunk_size {args.n}) vs {n_chunks} chunks (chunk_size {args.small_chunk}); "
          f"medians of {args.repeats}")  # fmt: skip
    table = print_table(
        ["Prefect API", "start-up s (median)", "min-max", "total s: 1 chunk",
         f"{n_chunks} chunks", "per chunk ms (total)", "collection s: 1 chunk",
         f"{n_chunks} chunks", "per chunk ms (collection)", "per chunk CPU ms: CLI",
         "temporary server", "exit after last write s", "load"],
        [[s["mode"], s["startup_s"], f"{s['startup_min_s']:.1f}-{s['startup_max_s']:.1f}",
          s["one_chunk_total_s"], s["many_chunks_total_s"], s["per_chunk_total_ms"],
          s["one_chunk_collection_s"], s["many_chunks_collection_s"],
          s["per_chunk_collection_ms"], s["per_chunk_cli_cpu_ms"],
          s["per_chunk_server_cpu_ms"] if s["mode"] == "ephemeral" else "-", s["after_s"],
          f"{min(s['loads']):.2f}-{max(s['loads']):.2f}"] for s in summary],
    )  # fmt: skip
    if cold:
        print(f"cold start (temporary API, fresh PREFECT_HOME): start-up {cold['startup_s']:.2f} s, "
              f"total {cold['total_s']:.2f} s (load {cold['load']['load_1m']:.2f})")  # fmt: skip
    write_json("prefect_cost", {"machine": machine(), "args": vars(args) | {"json": None},
                                "summary": summary, "cold_start": cold, "runs": runs,
                                "table": table, "load_gate": gate.log}, args.json)  # fmt: skip


if __name__ == "__main__":
    main()
