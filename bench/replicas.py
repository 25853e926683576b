"""Benchmark: replicas of one agent name (issue 13, item 2).

Reference agents on 127.0.0.1 limited to ``--capacity`` K requests at full speed (more in
flight share it: latency grows in proportion, as an inference server's batch does), so one
serves at most K / latency rollouts/s. The collector's core runs in this process (the
AgentClient with its ReplicaRouter, exactly as a chunk uses them; no Prefect), with enough in
flight to saturate three replicas:

1. **throughput**: ``--n`` rollouts with the agent name on 1 URL vs on 3 replicas;
2. **a killed replica**: 3 replicas; at ``--kill-at`` s one is SIGKILLed, ``--down-s`` later
   restarted on its port. Completions per ``--bin-s`` bin, and: the rate before / while down /
   after it is back, the longest stretch without a completion, the failed attempts, how long
   until the router took it out and until it answered again after its restart.

    .venv/bin/python bench/replicas.py [--capacity 8] [--latency-ms 100] [--in-flight 48]
        [--n 1500] [--kill-n 4500] [--kill-at 6] [--down-s 6] [--bin-s 0.5]

Expected: 3 replicas ~3x the rollouts/s of one; while one is down ~2/3 of that (the other two
are at capacity), with no stall.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import add_gate_args, gate_from_args, loadavg, machine, print_table, reference_agent
from _common import write_json as write_result

from reference_agent.server import generate_tasks
from rollouts.agent_client import AgentClient, RetryPolicy
from rollouts.replicas import ReplicaRouter

POLICY = RetryPolicy(request_timeout_s=60.0)  # the defaults otherwise: 5 attempts, 0.5 s backoff


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bodies(n: int) -> list[bytes]:
    return [orjson.dumps({**row, "_ng_task_index": i, "_ng_rollout_index": 0})
            for i, row in enumerate(generate_tasks(n, 0))]  # fmt: skip


async def collect(
    urls: list[str], n: int, in_flight: int, events: list[tuple[float, Any]] | None = None
) -> dict[str, Any]:
    """Send n rollouts to the agent ``calc`` (``urls``: its replicas) as a chunk does; returns
    completion times, outcomes and the router's counts. ``events``: (seconds after start,
    callable) run on the way (the kill and the restart)."""
    router = ReplicaRouter({"calc": urls}) if len(urls) > 1 else None
    client = AgentClient(POLICY, in_flight, replicas=router)
    if router is not None:
        router.use({"calc": urls[0]})  # route "calc"
    done: list[float] = []
    failed = 0
    marks: dict[str, float] = {}
    t0 = time.monotonic()

    async def one(body: bytes, slot: Any) -> None:
        nonlocal failed
        outcome = await client.run(urls[0] + "/run", body, slot=slot)
        done.append(time.monotonic() - t0)
        failed += outcome.kind != "ok"

    async def watch() -> None:  # when the router took the replica out and put it back
        assert router is not None
        r = router._groups["calc"].replicas[1]
        while True:
            if r.ejected and "ejected" not in marks:
                marks["ejected"] = time.monotonic() - t0
            if "ejected" in marks and not r.ejected and "restored" not in marks:
                marks["restored"] = time.monotonic() - t0
            await asyncio.sleep(0.005)

    async def run_events() -> None:
        for at, action in events or []:
            await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
            marks[action.__name__] = time.monotonic() - t0
            await asyncio.to_thread(action)

    side = [asyncio.create_task(run_events())]
    if router is not None:
        side.append(asyncio.create_task(watch()))
    tasks = set()
    for body in bodies(n):
        slot = await client.reserve()
        t = asyncio.create_task(one(body, slot))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - t0
    for t in side:
        t.cancel()
    await asyncio.gather(*side, return_exceptions=True)
    counts = [] if router is None else [
        {"agent": r.agent, "url": r.url, "sent": r.sent, "answered": r.answered,
         "failed": dict(r.failed), "in_flight": r.in_flight, "ejected": r.ejected,
         "ejections": r.ejections}
        for group in router._groups.values() for r in group.replicas
    ]  # fmt: skip
    await client.aclose()
    if router is not None:
        await router.aclose()
    return {"elapsed_s": elapsed, "done": sorted(done), "failed": failed, "marks": marks,
            "replicas": counts}  # fmt: skip


def rate(done: list[float], start: float, end: float) -> float:
    return sum(1 for t in done if start <= t < end) / max(1e-9, end - start)


def longest_gap(done: list[float], start: float, end: float) -> float:
    times = [start, *(t for t in done if start <= t < end), end]
    return max(b - a for a, b in itertools.pairwise(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--capacity", type=int, default=8)
    ap.add_argument("--latency-ms", type=float, default=100.0)
    ap.add_argument("--in-flight", type=int, default=48)
    ap.add_argument("--n", type=int, default=1500, help="rollouts per throughput run")
    ap.add_argument("--kill-n", type=int, default=4500, help="rollouts of the kill run")
    ap.add_argument("--kill-at", type=float, default=6.0)
    ap.add_argument("--down-s", type=float, default=6.0)
    ap.add_argument("--bin-s", type=float, default=0.5)
    add_gate_args(ap, budget_s=120.0)
    args = ap.parse_args()
    gate = gate_from_args(args)
    flags = ["--capacity", str(args.capacity)]
    ports = [free_port() for _ in range(3)]
    result: dict[str, Any] = {"machine": machine(), "args": vars(args), "runs": {}}
    with contextlib.ExitStack() as stack:
        agents = [stack.enter_context(reference_agent(args.latency_ms,
                                                      extra=[*flags, "--port", str(p)]))
                  for p in ports]  # fmt: skip
        urls = [a.url for a in agents]
        rows = []
        for k in (1, 3):
            load = gate.wait(f"{k} replica(s)")
            r = asyncio.run(collect(urls[:k], args.n, args.in_flight))
            rows.append([k, args.n, round(r["elapsed_s"], 2), args.n / r["elapsed_s"],
                         r["failed"], load["load_1m"]])  # fmt: skip
            result["runs"][f"{k}_replicas"] = {**r, "done": None, "load": load}
        print_table(["replicas", "rollouts", "seconds", "rollouts/s", "failed", "load 1m"], rows)

        def kill() -> None:
            os.killpg(agents[1].proc.pid, signal.SIGKILL)
            agents[1].proc.wait()

        def restart() -> None:
            stack.enter_context(reference_agent(args.latency_ms,
                                                extra=[*flags, "--port", str(ports[1])]))  # fmt: skip

        load = gate.wait("kill")
        r = asyncio.run(collect(urls, args.kill_n, args.in_flight,
                                [(args.kill_at, kill), (args.kill_at + args.down_s, restart)]))  # fmt: skip
    marks, done = r["marks"], r["done"]
    killed, back = marks["kill"], marks["restart"]
    restored = marks.get("restored")
    summary = {
        "rate_before": rate(done, 1.0, killed),
        "rate_down": rate(done, killed + 1.0, back),
        "rate_after": rate(done, (restored or back) + 1.0, r["elapsed_s"] - 1.0),
        "longest_gap_s_around_kill": longest_gap(done, killed - 1.0, killed + 2.0),
        "ejected_after_kill_s": marks.get("ejected", float("nan")) - killed,
        "back_in_after_restart_s": (restored or float("nan")) - back,
        "failed_attempts": {c["url"]: c["failed"] for c in r["replicas"]},
        "rollouts_failed": r["failed"],
        "load": load,
    }
    bins = [round(rate(done, t, t + args.bin_s)) for t in
            [i * args.bin_s for i in range(int(r["elapsed_s"] / args.bin_s) + 1)]]  # fmt: skip
    result["runs"]["kill"] = {**summary, "marks": marks, "rate_per_bin": bins,
                              "replicas": r["replicas"], "elapsed_s": r["elapsed_s"]}  # fmt: skip
    print(f"kill run: {args.kill_n} rollouts in {r['elapsed_s']:.1f} s; killed at {killed:.1f} s, "
          f"restarted at {back:.1f} s; load {load['load_1m']:.2f}")  # fmt: skip
    print_table(["phase", "rollouts/s"], [["before", summary["rate_before"]],
                                          ["one down", summary["rate_down"]],
                                          ["back", summary["rate_after"]]])  # fmt: skip
    print(
        f"taken out {summary['ejected_after_kill_s']:.3f} s after the kill; back in "
        f"{summary['back_in_after_restart_s']:.2f} s after the restart; longest stretch "
        f"without a completion around the kill {summary['longest_gap_s_around_kill']:.3f} s; "
        f"failed attempts {summary['failed_attempts']}; rollouts failed {r['failed']}"
    )
    print(f"rollouts/s per {args.bin_s} s: {bins}")
    print(f"load now: {loadavg()}")
    write_result("replicas", result)


if __name__ == "__main__":
    main()
