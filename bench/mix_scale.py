"""Benchmark: the balanced mix over ~1M realistic rollouts (a few KB each).

Prints wall time and peak RSS of `rollouts mix` (run as its own process) and writes JSON.
    .venv/bin/python bench/mix_scale.py [--rows 1000000] [--dir /tmp/rollouts-bench]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import orjson

FILLER = "The answer follows from the arithmetic; " * 40  # ~1.6 KB of response text


def rollout(task: int, rollout_index: int, rng: random.Random) -> dict:
    return {
        "responses_create_params": {
            "input": [{"role": "user", "content": f"What is {task} + {rollout_index}?",
                       "type": "message"}],
            "temperature": 0.4,
        },
        "response": {
            "id": f"resp_{task}_{rollout_index}", "object": "response", "model": "bench",
            "output": [{"type": "message", "role": "assistant",
                        "content": [{"type": "output_text", "text": FILLER}]}],
            "usage": {"input_tokens": 40, "output_tokens": 400, "total_tokens": 440},
        },
        "reward": float(rng.random() < 0.6),
        "expected_answer": str(task + rollout_index),
        "_ng_task_index": task,
        "_ng_rollout_index": rollout_index,
        "agent_ref": {"name": "bench"},
    }  # fmt: skip


def make_source(path: Path, rows: int, repeats: int, seed: int) -> None:
    if path.exists() and path.stat().st_size > 0:
        return
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for i in range(rows):
            f.write(orjson.dumps(rollout(i // repeats, i % repeats, rng)) + b"\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows over all sources")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/rollouts-bench"))
    ap.add_argument("--json", type=Path, default=Path("bench/results/mix_scale.json"))
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    shares = {"high_quality": (0.6, 1), "exploration": (0.3, 1), "hard": (0.1, 4)}
    sources = {}
    t0 = time.perf_counter()
    for name, (share, repeats) in shares.items():
        path = args.dir / f"{name}_{args.rows}.jsonl"
        make_source(path, int(args.rows * share), repeats, seed=len(name))
        sources[name] = path
    gen_s = time.perf_counter() - t0
    total_bytes = sum(p.stat().st_size for p in sources.values())
    out = args.dir / "mixed.jsonl"
    total = int(args.rows * 0.5)
    cmd = [sys.executable, "-m", "rollouts_cli", "mix", "--total", str(total), "--seed", "0",
           "--output", str(out), "--keep-groups"]  # fmt: skip
    for name, (share, _) in shares.items():
        cmd += ["--source", f"{name}={sources[name]}:{share}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {
        "rows_in": args.rows, "input_bytes": total_bytes, "rows_out": total,
        "output_bytes": out.stat().st_size, "wall_s": round(wall, 2),
        "peak_rss_mb": round(peak_mb, 1), "generate_s": round(gen_s, 1),
        "python": platform.python_version(), "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"), "command": " ".join(cmd),
    }  # fmt: skip
    print(f"{'rows in':>12} {'input MB':>9} {'rows out':>9} {'wall s':>7} {'peak RSS MB':>12}")
    print(f"{args.rows:>12,} {total_bytes / 1e6:>9.0f} {total:>9,} {wall:>7.1f} {peak_mb:>12.0f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
