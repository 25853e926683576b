"""Benchmark: does `rollouts collect` keep the agent saturated?

With agent latency L (mean) and C requests in flight, a perfect client needs N x L / C. This
runs the real CLI as a subprocess against the reference agent on 127.0.0.1 (fixed latency, and
lognormal with sigma 1, whose mean is L x exp(sigma^2 / 2)) and reports our time / ideal:

- start-up: command start -> first request the agent receives (its --request-log),
- collection: first request -> last rollout written (max mtime of the run's chunk outputs),
- total: command start -> exit (includes merge, metrics, Prefect shutdown).

A second ideal, "C-slot", replays the agent's own seeded latency draws through C slots
(list scheduling): what a client with zero overhead would need with exactly those draws,
the straggler at the end included.

    .venv/bin/python bench/saturation.py [--n 10000] [--parallel 64] [--latency-ms 100]
        [--sigmas 0 1] [--chunk-size 500] [--keep]

Targets: collection within 10% of N x L / C (fixed) and 15% (lognormal).
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    add_gate_args,
    bench_dir,
    gate_from_args,
    machine,
    print_table,
    reference_agent,
    run_collect,
    write_json,
)

TARGETS = {0.0: 1.10}  # sigma -> allowed collection / ideal; anything heavier-tailed: 1.15


def slot_ideal(n: int, parallel: int, latency_s: float, sigma: float, seed: int) -> float:
    """Makespan of n requests through `parallel` slots with the agent's own latency draws."""
    rng = random.Random(f"latency:{seed}")  # the reference agent's latency stream
    slots = [0.0] * parallel
    end = 0.0
    for _ in range(n):
        lat = latency_s if sigma <= 0 else rng.lognormvariate(math.log(latency_s), sigma)
        start = heapq.heappop(slots)
        heapq.heappush(slots, start + lat)
        end = max(end, start + lat)
    return end


def inflight_profile(
    times: list[float], latency_s: float, sigma: float, seed: int, parallel: int, t_end: float
) -> dict[str, float]:
    """Requests in flight at the agent over the collection, from its request log.

    The agent draws latencies from its seeded stream in arrival order, so request i (by receive
    time) ends at time_i + draw_i: in flight is exact, for fixed and lognormal latency.
    Slots idle while work was left to dispatch (first to last request) are what the client
    lost; each C idle slot-seconds cost one second of makespan.
    """
    rng = random.Random(f"latency:{seed}")
    times = sorted(times)
    events: list[tuple[float, int]] = []
    for t in times:
        lat = latency_s if sigma <= 0 else rng.lognormvariate(math.log(latency_s), sigma)
        events += [(t, 1), (t + lat, -1)]
    events.sort()
    t0, t_last = times[0], times[-1]
    busy = lost = lost_first_s = 0.0
    level, prev = 0, t0
    full_at = None
    for t, delta in events:
        if t > prev:
            span_end = min(t, t_last)
            if span_end > prev:
                lost += (parallel - level) * (span_end - prev)
                first_end = min(span_end, t0 + 1.0)
                if first_end > prev:
                    lost_first_s += (parallel - level) * (first_end - prev)
            busy += level * (min(t, t_end) - prev) if t_end > prev else 0.0
            prev = t
        level += delta
        if full_at is None and level >= parallel:
            full_at = t - t0
    return {
        "mean_in_flight": round(busy / max(t_end - t0, 1e-9), 2),
        "full_after_s": round(full_at, 3) if full_at is not None else -1.0,
        "lost_s_first_second": round(lost_first_s / parallel, 3),
        "lost_s_after": round((lost - lost_first_s) / parallel, 3),
        "tail_s": round(t_end - t_last, 3),  # last request received -> last rollout written
    }


def one_run(args: argparse.Namespace, gate: Any, tmp: Path, tasks: Path, home: Path,
            work: Path, sigma: float, variant: str, env: dict[str, str] | None) -> dict[str, Any]:  # fmt: skip
    label = "fixed" if sigma <= 0 else f"lognormal sigma {sigma:g}"
    latency_s = args.latency_ms / 1000
    mean_s = latency_s * math.exp(sigma**2 / 2) if sigma > 0 else latency_s
    ideal = args.n * mean_s / args.parallel
    ideal_slots = slot_ideal(args.n, args.parallel, latency_s, sigma, args.seed)
    load = gate.wait(f"{label}, {variant}")
    slug = f"{sigma:g}-" + re.sub(r"[^a-z0-9]+", "-", variant.lower()).strip("-")
    log = tmp / f"requests-{slug}.jsonl"
    with reference_agent(args.latency_ms, sigma, log, seed=args.seed) as agent:
        offset = agent.log_offset()
        t = run_collect(agent, tasks, tmp / "out" / f"sat-{slug}.jsonl", n=args.n,
                        parallel=args.parallel, chunk_size=args.chunk_size, prefect_home=home,
                        work_dir=work, log_path=tmp / f"cli-{slug}.log",
                        loopwatch=None if env is None else tmp / f"loopwatch-{slug}.jsonl",
                        env_extra=env)  # fmt: skip
        times = agent.requests_since(offset)
    assert t.rollouts_written == args.n, t
    t_end = min(times) + t.collection_s  # the last rollout written
    flight = inflight_profile(times, latency_s, sigma, args.seed, args.parallel, t_end)
    target = TARGETS.get(sigma, 1.15)
    return {
        "latency": label, "variant": variant, "sigma": sigma, "latency_ms": args.latency_ms,
        "mean_latency_ms": round(mean_s * 1000, 2), "n": args.n,
        "parallel": args.parallel, "chunk_size": args.chunk_size,
        "chunks": math.ceil(args.n / args.chunk_size),
        "ideal_s": round(ideal, 3), "ideal_slots_s": round(ideal_slots, 3),
        **t.as_dict(),
        "collection_over_ideal": round(t.collection_s / ideal, 4),
        "collection_over_slot_ideal": round(t.collection_s / ideal_slots, 4),
        "total_over_ideal": round(t.total_s / ideal, 4),
        "target": target, "target_met": t.collection_s / ideal <= target,
        "in_flight": flight, "load": load,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=10_000, help="rollouts (tasks, one repeat)")
    ap.add_argument("--parallel", type=int, default=64, help="num_samples_in_parallel (C)")
    ap.add_argument("--latency-ms", type=float, default=100.0, help="agent (median) latency L")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 1.0],
                    help="lognormal sigma per run; 0 = fixed latency (%(default)s)")  # fmt: skip
    ap.add_argument("--chunk-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0, help="agent seed (latency draws)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the small first run that creates the Prefect database")  # fmt: skip
    ap.add_argument(
        "--gc-experiment",
        action="store_true",
        help="also run each latency under bench/_loopwatch.py: as is, with the product's "
        "gc.freeze() patched out, and with gc.set_threshold(20000, 10, 10) "
        "(GC pauses, loop stalls)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--json", type=Path, default=None, help="default bench/results/saturation.json")
    add_gate_args(ap)
    args = ap.parse_args()
    gate = gate_from_args(args)

    from reference_agent.server import write_tasks

    runs = []
    with bench_dir("saturation", args.keep) as tmp:
        home, work = tmp / "prefect-home", tmp / "work"
        work.mkdir()
        tasks = tmp / "tasks.jsonl"
        write_tasks(tasks, args.n)
        if not args.no_warmup:
            small = tmp / "warm.jsonl"
            write_tasks(small, 20)
            with reference_agent(0, 0, tmp / "warm.log") as agent:
                run_collect(agent, small, tmp / "out" / "warm.jsonl", n=20, parallel=8,
                            chunk_size=10, prefect_home=home, work_dir=work,
                            log_path=tmp / "warm.cli.log")  # fmt: skip
        variants: list[tuple[str, dict[str, str] | None]] = [("plain CLI", None)]
        if args.gc_experiment:
            variants += [("loopwatch, as is", {}),
                         ("loopwatch, gc.freeze() patched out", {"LOOPWATCH_GC_FREEZE": "off"}),
                         ("loopwatch, as is + gc threshold 20000", {
                             "LOOPWATCH_GC_THRESHOLD": "20000,10,10"})]  # fmt: skip
        for variant, env in variants:
            for sigma in args.sigmas:
                runs.append(one_run(args, gate, tmp, tasks, home, work, sigma, variant, env))
    print()
    print(f"N = {args.n:,} rollouts, C = {args.parallel}, L = {args.latency_ms:g} ms, "
          f"chunk_size {args.chunk_size} ({math.ceil(args.n / args.chunk_size)} chunks)")  # fmt: skip
    table = print_table(
        ["run", "latency", "ideal s", "C-slot ideal s", "start-up s", "collection s", "coll/ideal",
         "coll/C-slot", "total s", "total/ideal", "target", "met", "load"],
        [[r["variant"], r["latency"], r["ideal_s"], r["ideal_slots_s"], r["startup_s"], r["collection_s"],
          f"{r['collection_over_ideal']:.3f}", f"{r['collection_over_slot_ideal']:.3f}",
          r["total_s"], f"{r['total_over_ideal']:.2f}", f"<= {r['target']:.2f}",
          "yes" if r["target_met"] else "NO", r["load"]["load_1m"]] for r in runs],
    )  # fmt: skip
    print()
    flight_table = print_table(
        ["run", "latency", "collection - ideal s", "mean in flight",
         "idle slots, 1st second (s of makespan)", "idle slots, later (s)", "tail s"],
        [[r["variant"], r["latency"], round(r["collection_s"] - r["ideal_s"], 2),
          r["in_flight"]["mean_in_flight"],
          r["in_flight"]["lost_s_first_second"], r["in_flight"]["lost_s_after"],
          r["in_flight"]["tail_s"]] for r in runs],
    )  # fmt: skip
    watched = [r for r in runs if r.get("loopwatch")]
    gc_table = ""
    if watched:
        print()
        gc_table = print_table(
            ["run", "latency", "coll/ideal", "GC ms in collection", "GC share", "gen2 passes",
             "longest gen2 ms", "loop stalls > 50 ms", "stall ms", "load"],
            [[r["variant"], r["latency"], f"{r['collection_over_ideal']:.3f}",
              r["loopwatch"]["gc_ms"], f"{100 * r['loopwatch']['gc_share']:.1f}%",
              r["loopwatch"]["gc"][2]["passes"], r["loopwatch"]["gc"][2]["longest_ms"],
              r["loopwatch"]["stalls_over_50ms"], r["loopwatch"]["stall_ms"],
              r["load"]["load_1m"]] for r in watched],
        )  # fmt: skip
    write_json("saturation", {"machine": machine(), "args": vars(args) | {"json": None},
                              "runs": runs, "table": table, "flight_table": flight_table,
                              "gc_table": gc_table,
                              "load_gate": gate.log}, args.json)  # fmt: skip


if __name__ == "__main__":
    main()
