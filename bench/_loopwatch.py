"""Run `rollouts_cli` with an event-loop stall watchdog and GC accounting (a diagnostic).

    python bench/_loopwatch.py OUT.jsonl collect +agent_url=... (the CLI's own arguments)

- A coroutine on the CLI's event loop beats every 5 ms; a thread checks the beat, and when the
  loop has not come back for 50 ms it samples the main thread's Python stack every 5 ms until
  the loop runs again. Each stall is one JSON line (start, duration, most frequent stacks).
- Every garbage-collector pass is timed (gc.callbacks); per generation, counts and milliseconds
  are summed (and the longest kept) in 0.1 s buckets, written at exit as {"kind": "gc_buckets", ...}, so a reader can
  keep only the collection window.

Experiments, without touching the product code (environment variables):
- LOOPWATCH_GC_FREEZE=on: when the flow opens its dispatcher (right before the first request),
  gc.collect() then gc.freeze(): everything alive then (imported modules, Prefect's client and
  engine objects) moves to the permanent generation, which later full passes skip.
  (flows/collect.py itself calls gc.freeze() there since 2026-11-26 05:34; this is a no-op then.)
- LOOPWATCH_GC_FREEZE=off: gc.freeze() becomes a no-op, to measure the collector without it.
- LOOPWATCH_GC_THRESHOLD=a,b,c: gc.set_threshold(a, b, c) when the dispatcher opens.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import sys
import threading
import time
import traceback
from typing import Any

import orjson

STALL_MS = 50.0
BEAT_S = 0.005
BUCKET_S = 0.1


def main() -> None:
    out_path, argv = sys.argv[1], sys.argv[2:]
    out = open(out_path, "ab", buffering=0)
    state: dict[str, Any] = {"beat": time.perf_counter(), "running": False}
    main_id = threading.get_ident()
    gc_start = [0.0]
    # bucket start (epoch s) -> [count, total ms, longest ms] per generation
    buckets: dict[float, list[list[float]]] = collections.defaultdict(
        lambda: [[0, 0.0, 0.0], [0, 0.0, 0.0], [0, 0.0, 0.0]]
    )

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - gc_start[0]) * 1000
        b = buckets[time.time() // BUCKET_S * BUCKET_S][info["generation"]]
        b[0] += 1
        b[1] += ms
        b[2] = max(b[2], ms)

    gc.callbacks.append(on_gc)

    def watchdog() -> None:
        while True:
            time.sleep(BEAT_S)
            if not state["running"]:
                continue
            late = (time.perf_counter() - state["beat"]) * 1000
            if late < STALL_MS:
                continue
            t0 = time.time() - late / 1000
            stacks: collections.Counter[str] = collections.Counter()
            beat = state["beat"]
            while state["beat"] == beat and state["running"]:
                frame = sys._current_frames().get(main_id)
                if frame is not None:
                    stack = traceback.extract_stack(frame)[-14:]
                    stacks["".join(f"{f.filename}:{f.lineno} {f.name}\n" for f in stack)] += 1
                time.sleep(BEAT_S)
            dur = (time.perf_counter() - beat) * 1000
            out.write(orjson.dumps({"kind": "stall", "time": t0, "ms": round(dur, 1),
                                    "samples": sum(stacks.values()),
                                    "stacks": [[n, s] for s, n in stacks.most_common(3)]})
                      + b"\n")  # fmt: skip

    threading.Thread(target=watchdog, daemon=True).start()

    async def beat() -> None:
        while True:
            state["beat"] = time.perf_counter()
            await asyncio.sleep(BEAT_S)

    original_run = asyncio.run

    def run(coro, **kwargs):  # type: ignore[no-untyped-def]
        async def wrapped():  # type: ignore[no-untyped-def]
            task = asyncio.create_task(beat())
            state["running"] = True
            try:
                return await coro
            finally:
                state["running"] = False
                task.cancel()

        return original_run(wrapped(), **kwargs)

    asyncio.run = run  # type: ignore[assignment]

    freeze = os.environ.get("LOOPWATCH_GC_FREEZE") == "on"
    threshold = os.environ.get("LOOPWATCH_GC_THRESHOLD")
    if os.environ.get("LOOPWATCH_GC_FREEZE") == "off":
        gc.freeze = lambda: None  # the product's own call becomes a no-op
    if freeze or threshold:
        import flows.collect

        original_open = flows.collect.open_dispatcher

        def open_dispatcher(*args: Any, **kwargs: Any) -> Any:
            if freeze:
                t0 = time.perf_counter()
                gc.collect()
                gc.freeze()
                out.write(orjson.dumps({"kind": "freeze", "time": time.time(),
                                        "frozen": gc.get_freeze_count(),
                                        "ms": round((time.perf_counter() - t0) * 1000, 1)})
                          + b"\n")  # fmt: skip
            if threshold:
                gc.set_threshold(*(int(x) for x in threshold.split(",")))
            return original_open(*args, **kwargs)

        flows.collect.open_dispatcher = open_dispatcher  # type: ignore[assignment]

    from rollouts_cli.main import main as cli_main

    code = cli_main(argv)
    gc.callbacks.remove(on_gc)
    out.write(orjson.dumps({"kind": "gc_buckets", "bucket_s": BUCKET_S,
                            "buckets": [[t, v] for t, v in sorted(buckets.items())]}) + b"\n")  # fmt: skip
    out.close()
    sys.exit(code)


if __name__ == "__main__":
    main()
