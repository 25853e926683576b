"""Benchmark: every file step at 1,000,000 rows (and 250,000, to check time is linear), each as
its own process, so its peak RSS is its own.

Steps (each `python bench/scale.py --step NAME ...` in a subprocess; wall time and peak RSS from
wait4()):
- split:       rollouts.split.split_input on an N-task input (~300-byte rows), chunk_size 10000
- scan-chunks: rollouts.collect.scan_done over the 100 chunk outputs of 10,000 rows (as resume
               does, one chunk at a time)
- scan-file:   scan_done over one N-row output file (the worst case: one huge chunk)
- merge:       rollouts.merge.merge_chunks over N/10,000 chunk outputs of 10,000 rollouts
               (2,500 tasks x 4 repeats each, rows slightly out of order as they arrive),
               generated directly in a run-dir layout (chunks/NNNNN.{tasks,rollouts,failures}.jsonl)
- metrics:     rollouts.metrics.write_aggregate_metrics on the merged N-row file
- mix:         rollouts.mix.mix_sources over three sources of 0.6 N / 0.3 N / 0.1 N rows
               (repeats 1 / 1 / 4), total N / 2, keep-groups
- baseline:    the same imports and nothing else (the interpreter's floor)
Rollout rows are bench/mix_scale.py's generator (~2 KB each). Then, unless --collect-n 0, the
real CLI collects --collect-n rollouts from a zero-latency reference agent (rate, peak RSS).

    .venv/bin/python bench/scale.py [--rows 250000 1000000] [--collect-n 200000] [--keep]

Target: peak RSS under 400 MB for every step at 1M rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson
from _common import (
    PY,
    add_gate_args,
    base_env,
    bench_dir,
    gate_from_args,
    machine,
    print_table,
    reference_agent,
    run_collect,
    run_measured,
    write_json,
)

CHUNK_ROWS = 10_000
REPEATS = 4  # merge / metrics data: 2,500 tasks x 4 rollouts per chunk
STEPS = ["baseline", "split", "scan-chunks", "scan-file", "merge", "metrics", "mix"]
TARGET_MB = 400.0
PAD = "Show your work briefly, then give the final answer as a single integer. " * 2


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


def write_task_input(path: Path, n: int) -> None:
    """N task rows of ~300 bytes: the reference agent's arithmetic tasks plus instructions."""
    from reference_agent.server import generate_tasks

    with open(path, "wb") as f:
        for row in generate_tasks(n):
            row["responses_create_params"]["instructions"] = PAD
            row["responses_create_params"]["temperature"] = 0.6
            f.write(orjson.dumps(row) + b"\n")


def write_merge_run_dir(run_dir: Path, rows: int) -> list[dict[str, Any]]:
    """chunks/NNNNN.tasks.jsonl + .rollouts.jsonl (+ empty .failures.jsonl) like a collected run;
    returns the ChunkSpecs as dicts."""
    from mix_scale import rollout

    chunks = run_dir / "chunks"
    chunks.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    tasks_per_chunk = CHUNK_ROWS // REPEATS
    specs = []
    for index in range((rows + CHUNK_ROWS - 1) // CHUNK_ROWS):
        first = index * tasks_per_chunk
        n_tasks = min(tasks_per_chunk, (rows - index * CHUNK_ROWS) // REPEATS)
        sha = hashlib.sha256()
        tasks_path = chunks / f"{index:05d}.tasks.jsonl"
        with open(tasks_path, "wb") as f:
            for t in range(first, first + n_tasks):
                line = orjson.dumps({"responses_create_params": {"input": [
                    {"role": "user", "content": f"What is {t} + 0?", "type": "message"}]},
                    "expected_answer": str(t), "_ng_task_index": t}) + b"\n"  # fmt: skip
                sha.update(line)
                f.write(line)
        keys = [(t, r) for t in range(first, first + n_tasks) for r in range(REPEATS)]
        # Rollouts land in completion order: roughly dispatch order, shuffled within C = 64.
        for w in range(0, len(keys), 64):
            window = keys[w : w + 64]
            rng.shuffle(window)
            keys[w : w + 64] = window
        with open(chunks / f"{index:05d}.rollouts.jsonl", "wb") as f:
            f.writelines(orjson.dumps(rollout(t, r, rng)) + b"\n" for t, r in keys)
        (chunks / f"{index:05d}.failures.jsonl").touch()
        specs.append({"index": index, "tasks_path": str(tasks_path), "n_tasks": n_tasks,
                      "content_sha256": sha.hexdigest(), "run_id": "bench",
                      "task_min": first, "task_max": first + n_tasks - 1,
                      "contiguous": True})  # fmt: skip
    (run_dir / "specs.json").write_bytes(orjson.dumps(specs))
    return specs


def write_mix_sources(d: Path, rows: int) -> dict[str, tuple[Path, float]]:
    from mix_scale import make_source

    out = {}
    for name, share, repeats in (("high_quality", 0.6, 1), ("exploration", 0.3, 1),
                                 ("hard", 0.1, 4)):  # fmt: skip
        path = d / f"mix_{name}.jsonl"
        make_source(path, int(rows * share), repeats, seed=len(name))
        out[name] = (path, share)
    return out


# ------------------------------------------------------------------------------------------
# One step, in this process (the --step worker)
# ------------------------------------------------------------------------------------------


def run_step(step: str, rows: int, d: Path) -> dict[str, Any]:
    from rollouts import collect, merge, metrics, mix, split  # the same imports for every step
    from rollouts.models import ChunkSpec

    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    if step == "split":
        run_dir = d / "split-run"
        shutil.rmtree(run_dir, ignore_errors=True)
        r = split.split_input(d / "tasks.jsonl", run_dir, run_id="bench", chunk_size=CHUNK_ROWS)
        info = {"tasks": r.n_tasks, "chunks": len(r.chunks)}
    elif step == "scan-chunks":
        keys = largest = 0
        for f in sorted((d / "merge-run" / "chunks").glob("*.rollouts.jsonl")):
            ok, terminal = collect.scan_done(f, f.with_name(f.name.replace("rollouts", "failures")))
            keys += len(ok) + len(terminal)
            largest = max(largest, len(ok))
        info = {"keys": keys, "largest_chunk": largest}
    elif step == "scan-file":
        ok, terminal = collect.scan_done(d / "merged.jsonl", d / "no_failures.jsonl")
        info = {"keys": len(ok) + len(terminal)}
    elif step == "merge":
        specs = [
            ChunkSpec(**s) for s in orjson.loads((d / "merge-run" / "specs.json").read_bytes())
        ]
        t0 = time.perf_counter()  # the specs come from split in a real run; not timed
        r = merge.merge_chunks(specs, num_repeats=REPEATS,
                               agent_of=lambda _: "bench", output_path=d / "merged.jsonl",
                               failures_path=d / "merged_failures.jsonl")  # fmt: skip
        info = {"expected": r.expected, "succeeded": r.succeeded, "missing": r.missing}
    elif step == "metrics":
        s = metrics.write_aggregate_metrics(d / "merged.jsonl", d / "merged_failures.jsonl",
                                            d / "merged_aggregate_metrics.json",
                                            num_repeats=REPEATS,
                                            expected_by_agent={"bench": rows})  # fmt: skip
        a = s.agents[0]
        info = {"succeeded": a.succeeded, "mean_reward": a.mean_reward,
                "pass_at_k": a.pass_at_k,
                "metrics_bytes": (d / "merged_aggregate_metrics.json").stat().st_size}  # fmt: skip
    elif step == "mix":
        sources = orjson.loads((d / "mix_sources.json").read_bytes())
        req = mix.MixRequest(sources=[mix.MixSource(name=n, path=p, proportion=w)
                                      for n, (p, w) in sources.items()],
                             output=str(d / "mixed.jsonl"), total=rows // 2, seed=0,
                             keep_groups=True)  # fmt: skip
        r = mix.mix_sources(req)
        info = {"rows_out": r.rows}
    elif step != "baseline":
        raise SystemExit(f"unknown step {step}")
    return {"step": step, "rows": rows, "step_s": time.perf_counter() - t0, **info}


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------


def measure(step: str, rows: int, d: Path) -> dict[str, Any]:
    log = d / f"step-{step}.log"
    cmd = [PY, str(Path(__file__).resolve()), "--step", step, "--rows", str(rows), "--dir", str(d)]
    res = run_measured(cmd, env=base_env(), log_path=log, timeout_s=600)
    if res.returncode != 0:
        raise RuntimeError(f"step {step} exited {res.returncode}:\n{res.tail()}")
    out = json.loads(log.read_text().strip().splitlines()[-1])
    return out | {"wall_s": round(res.wall_s, 2), "step_s": round(out["step_s"], 2),
                  "peak_rss_mb": round(res.maxrss_wait4_mb, 1), "cpu_s": round(res.cpu_s, 2)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, nargs="+", default=[250_000, 1_000_000])
    ap.add_argument("--steps", nargs="+", default=STEPS, choices=STEPS)
    ap.add_argument("--collect-n", type=int, default=200_000,
                    help="rollouts for the CLI collect run (0: skip) (%(default)s)")  # fmt: skip
    ap.add_argument("--dir", type=Path, default=None, help="where to put the data (a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the data")
    ap.add_argument("--json", type=Path, default=None, help="default bench/results/scale.json")
    ap.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # worker mode
    add_gate_args(ap, budget_s=120.0)  # many steps: keep the whole script under 10 minutes
    args = ap.parse_args()
    if args.step:
        result = run_step(args.step, args.rows[0], args.dir)
        sys.stdout.write(json.dumps(result) + "\n")
        return
    gate = gate_from_args(args)

    results: list[dict[str, Any]] = []
    data: list[dict[str, Any]] = []
    collect_run: dict[str, Any] | None = None
    with bench_dir("scale", args.keep, args.dir) as tmp:
        for rows in sorted(args.rows):
            d = tmp / f"rows-{rows}"
            d.mkdir()
            t0 = time.perf_counter()
            write_task_input(d / "tasks.jsonl", rows)
            write_merge_run_dir(d / "merge-run", rows)
            sources = write_mix_sources(d, rows)
            (d / "mix_sources.json").write_bytes(
                orjson.dumps({n: [str(p), w] for n, (p, w) in sources.items()}))  # fmt: skip
            t_sync = time.perf_counter()
            os.sync()  # the generated GBs are written back now, not during the measured steps
            sizes = {"tasks_mb": (d / "tasks.jsonl").stat().st_size / 1e6,
                     "chunk_outputs_mb": sum(f.stat().st_size for f in
                                             (d / "merge-run" / "chunks").glob("*.rollouts.jsonl"))
                     / 1e6,
                     "mix_sources_mb": sum(p.stat().st_size for p, _ in sources.values()) / 1e6}  # fmt: skip
            data.append({"rows": rows, "generate_s": round(time.perf_counter() - t0, 1),
                         "sync_s": round(time.perf_counter() - t_sync, 1),
                         **{k: round(v) for k, v in sizes.items()}})  # fmt: skip
            print(
                f"{rows:,} rows: data generated in {data[-1]['generate_s']} s {sizes}", flush=True
            )
            # merge writes merged.jsonl, which scan-file and metrics read: keep that order.
            order = [s for s in ["baseline", "split", "scan-chunks", "merge", "scan-file",
                                 "metrics", "mix"] if s in args.steps]  # fmt: skip
            if "merge" not in order and ({"scan-file", "metrics"} & set(order)):
                order.insert(0, "merge")
            for step in order:
                load = gate.wait(f"{step} {rows:,}")
                r = measure(step, rows, d)
                r["load"] = load
                results.append(r)
                print(f"  {step:<12} {r['step_s']:>7.2f} s  peak RSS {r['peak_rss_mb']:>6.0f} MB",
                      flush=True)  # fmt: skip
            if not args.keep:
                shutil.rmtree(d, ignore_errors=True)
        if args.collect_n:
            from reference_agent.server import write_tasks

            tasks = tmp / "collect-tasks.jsonl"
            write_tasks(tasks, args.collect_n)
            work = tmp / "work"
            work.mkdir()
            with reference_agent(0, 0, tmp / "requests.jsonl") as agent:
                run_collect(agent, tasks, tmp / "out" / "warm.jsonl", n=50, parallel=8,
                            chunk_size=50, prefect_home=tmp / "prefect-home", work_dir=work,
                            extra=["+limit=50"])  # fmt: skip
                load = gate.wait(f"collect {args.collect_n:,}")
                t = run_collect(agent, tasks, tmp / "out" / "collect.jsonl", n=args.collect_n,
                                parallel=64, chunk_size=CHUNK_ROWS,
                                prefect_home=tmp / "prefect-home", work_dir=work,
                                log_path=tmp / "collect.log", timeout_s=900)  # fmt: skip
            assert t.rollouts_written == args.collect_n, t
            collect_run = t.as_dict() | {"load": load, "rate_collection": round(
                args.collect_n / t.collection_s, 1), "rate_total": round(args.collect_n / t.total_s, 1)}  # fmt: skip

    print()
    by = {(r["step"], r["rows"]): r for r in results}
    sizes_sorted = sorted(args.rows)
    big, small = sizes_sorted[-1], sizes_sorted[0]
    table_rows = []
    headers = ["step"]
    if small != big:
        headers += [f"{small:,} rows s", "peak RSS MB"]
    headers += [f"{big:,} rows s", "peak RSS MB"]
    if small != big:
        headers += ["time ratio / row ratio"]
    headers += [f"< {TARGET_MB:.0f} MB", "load"]
    for step in [s for s in STEPS if (s, big) in by]:
        b = by[(step, big)]
        row: list[Any] = [step]
        if small != big:
            s = by.get((step, small))
            ratio = (
                (b["step_s"] / s["step_s"] / (big / small)) if s and s["step_s"] > 0.05 else None
            )
            row += [s["step_s"] if s else "", s["peak_rss_mb"] if s else ""]
        row += [b["step_s"], b["peak_rss_mb"]]
        if small != big:
            row += [f"{ratio:.2f}" if ratio is not None else "-"]
        row += ["yes" if b["peak_rss_mb"] < TARGET_MB else "NO", b["load"]["load_1m"]]
        table_rows.append(row)
    table = print_table(headers, table_rows)
    collect_table = ""
    if collect_run:
        print()
        collect_table = print_table(
            ["collect (CLI, zero latency, C=64, chunk 10000)", "N", "start-up s", "collection s",
             "rollouts/s (collection)", "total s", "CLI peak RSS MB", "Prefect server MB", "load"],
            [["rollouts collect", args.collect_n, collect_run["startup_s"],
              collect_run["collection_s"], collect_run["rate_collection"], collect_run["total_s"],
              collect_run["hwm_cli_mb"], max(collect_run["hwm_children_mb"].values(), default=0),
              collect_run["load"]["load_1m"]]],
        )  # fmt: skip
    write_json("scale", {"machine": machine(), "args": vars(args) | {"json": None, "dir": None},
                         "data": data, "steps": results, "collect": collect_run,
                         "table": table, "collect_table": collect_table, "load_gate": gate.log},
               args.json)  # fmt: skip


if __name__ == "__main__":
    main()
