"""Benchmark: what a shared agent limit (ROLLOUTS_AGENT_LIMITS) costs one run.

The real `rollouts collect` against a zero-latency reference agent (the collector is the
bottleneck, so any cost of the limit shows), on a `prefect server start` of its own (SQLite,
what `make server` runs), once per variant and repeat, alternating:

- ``none``: no limit;
- ``generous``: a limit far above the run's budget (``--generous``, default 10,000);
- ``at budget``: a limit equal to the run's budget (``--parallel``), always full.

Each repeat starts with the next variant, so that a drift in the machine's load favours none.

Reported per run: collection rollouts/s (first request to last rollout written), start-up
(command to first request) and the CLI's CPU per rollout while it collects.

Then the calls one process makes to the Prefect API for it: the keeper (``AgentSlots``) with
the Prefect store, every call counted, under ``--calls-s`` seconds of simulated requests
(``--calls-in-flight`` at once, 1 ms each, as fast as the loop goes) against the same server,
for each limit.

    .venv/bin/python bench/agent_limits.py [--n 20000] [--parallel 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import statistics
import sys
import time
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
from rollouts.agent_limits import AgentSlots, LimitReading, LimitStore
from rollouts.concurrency import InFlightLimit

AGENT = "ref"


class CountingStore:
    """A store that counts the calls made to the one it wraps."""

    def __init__(self, store: LimitStore) -> None:
        self.store, self.calls = store, collections.Counter[str]()

    async def ensure(self, name: str, limit: int, *, overwrite: bool) -> None:
        self.calls["ensure"] += 1
        await self.store.ensure(name, limit, overwrite=overwrite)

    async def read(self, name: str) -> LimitReading | None:
        self.calls["read"] += 1
        return await self.store.read(name)

    async def acquire(self, name: str, slots: int, lease_s: float) -> str | None:
        self.calls["acquire"] += 1
        return await self.store.acquire(name, slots, lease_s)

    async def renew(self, lease_id: str, lease_s: float) -> bool:
        self.calls["renew"] += 1
        return await self.store.renew(lease_id, lease_s)

    async def release(self, lease_id: str) -> None:
        self.calls["release"] += 1
        await self.store.release(lease_id)

    async def aclose(self) -> None:
        await self.store.aclose()


def keeper_calls(api_url: str, limit: int, in_flight: int, seconds: float) -> dict[str, Any]:
    """Requests to a limited agent for ``seconds`` (simulated: 1 ms each), ``in_flight`` at
    once, through the keeper on Prefect: how many requests, how many API calls."""
    os.environ["PREFECT_API_URL"] = api_url
    from tasks.agent_limits import PrefectLimitStore

    async def run() -> dict[str, Any]:
        counting = CountingStore(PrefectLimitStore())
        budget = InFlightLimit(in_flight)
        slots = AgentSlots(f"bench-{limit}", limit, lambda: counting, lambda: in_flight)
        sent = 0
        stop_at = time.monotonic() + seconds

        async def one() -> None:
            nonlocal sent
            try:
                await slots.acquire()
                try:
                    await asyncio.sleep(0.001)
                    sent += 1
                finally:
                    slots.release()
            finally:
                budget.release()

        tasks: set[asyncio.Task[None]] = set()
        while time.monotonic() < stop_at:
            await budget.acquire()
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        await slots.aclose()
        await counting.aclose()
        calls = sum(counting.calls.values())
        return {"limit": limit, "requests": sent, "calls": dict(counting.calls),
                "calls_per_s": calls / seconds, "requests_per_call": sent / calls}

    return asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--parallel", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=5_000)
    ap.add_argument("--generous", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calls-s", type=float, default=20.0)
    ap.add_argument("--calls-in-flight", type=int, default=64)
    ap.add_argument("--skip-runs", action="store_true", help="measure the API calls only")
    ap.add_argument("--api-url", help="a running Prefect server to use (e.g. on PostgreSQL); "
                    "default: a `prefect server start` on SQLite of its own")
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
        server = (contextlib.nullcontext(args.api_url) if args.api_url
                  else prefect_server(d / "prefect-home", log_path=d / "server.log"))  # fmt: skip
        with server as api_url, reference_agent(0.0, request_log=d / "agent.jsonl") as agent:
            for repeat in range(0 if args.skip_runs else args.repeats):
                # Each repeat starts with another variant: a drift of the machine's load
                # favours none of them.
                order = list(variants)[repeat % 3:] + list(variants)[:repeat % 3]
                for name, limit in ((v, variants[v]) for v in order):
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
            calls = [keeper_calls(api_url, limit, args.calls_in_flight, args.calls_s)
                     for limit in (args.generous, args.calls_in_flight, args.calls_in_flight // 2)]  # fmt: skip
    if rows:
        print_table(["run", "limit", "rollouts/s", "start-up s", "CPU ms/rollout"], rows)
        summary = []
        for name in variants:
            rates = [r["rollouts_per_s"] for r in results if r["variant"] == name]
            summary.append([name, f"{statistics.median(rates):,.0f}",
                            f"{min(rates):,.0f}-{max(rates):,.0f}"])  # fmt: skip
        print_table(["variant", "median rollouts/s", "range"], summary)
    print_table(["limit", "requests", "API calls", "calls/s", "requests per call"],
                [[c["limit"], c["requests"], sum(c["calls"].values()), f"{c['calls_per_s']:.1f}",
                  f"{c['requests_per_call']:,.0f}"] for c in calls])  # fmt: skip
    write_json("agent_limits", {"machine": machine(), "args": vars(args), "runs": results,
                                "keeper_calls": calls})  # fmt: skip


if __name__ == "__main__":
    main()
