"""Benchmark: the Prefect server's database, SQLite vs PostgreSQL, as a collection feels it.

For each backend (--backends), one `prefect server start` on 127.0.0.1 (its own PREFECT_HOME in
a temp dir; for PostgreSQL PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://
postgres@HOST:PORT/DB on a fresh database created for this run and dropped after it), one
zero-latency reference agent for all, and against that server, --repeats rounds of:

- start skew of three concurrent subflows: `rollouts multi --config C` with three datasets as
  examples/mix.yaml (temperatures 0.2 / 0.6 / 0.4, repeats 1 / 1 / 3, --skew-n tasks each, and
  the mix); skew = the third dataset's first /run request minus the first dataset's (the agent's
  request log, datasets told apart by temperature); also the same between the three subflow
  runs' start times as the server recorded them;
- per-chunk overhead, as bench/prefect_cost.py: `rollouts collect` of --n rollouts in one chunk
  and in chunks of --small-chunk; (total_many - total_one) / (chunks - 1), also on the
  collection phase (first request -> last rollout written);
- command to first request: bench/startup.py's plain run (`rollouts collect`, 5 tasks).

Each server first gets one unmeasured run of each kind (flow and task registration). Medians and
ranges over the rounds; the 1-minute load before each measurement is recorded with it.

    .venv/bin/python bench/prefect_backends.py [--repeats 5] [--backends sqlite postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import yaml
from _common import (
    Agent,
    add_gate_args,
    bench_dir,
    cli_env,
    gate_from_args,
    machine,
    print_table,
    reference_agent,
    run_collect,
    run_measured,
    write_json,
)
from startup import prefect_server as startup_prefect_server
from startup import run_one as startup_run_one

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
PY = sys.executable
# examples/mix.yaml's three datasets: (name, temperature, repeats)
DATASETS = [("high_quality", 0.2, 1), ("exploration", 0.6, 1), ("hard", 0.4, 3)]


class StartupAgent:
    """bench/startup.py's run_one reads its agent through these; ours is _common's."""

    def __init__(self, agent: Agent) -> None:
        self.url = agent.url
        self._agent = agent

    def offset(self) -> int:
        return self._agent.log_offset()

    def times_since(self, offset: int) -> list[float]:
        return self._agent.requests_since(offset)


def requests_since(agent: Agent, offset: int) -> list[dict[str, Any]]:
    assert agent.request_log is not None
    with open(agent.request_log, "rb") as f:
        f.seek(offset)
        return [orjson.loads(line) for line in f if line.endswith(b"\n")]


def psql(host: str, port: int, *args: str) -> None:
    subprocess.run([*args, "-h", host, "-p", str(port), "-U", "postgres"], check=True,
                   capture_output=True, text=True)  # fmt: skip


async def subflow_starts(api_url: str, since: float) -> list[float]:
    """Start times (epoch s) of the subflows of the newest collect-multi-dataset run."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    async with PrefectClient(api_url) as client:
        (parent,) = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["collect-multi-dataset"])),
            sort=FlowRunSort.START_TIME_DESC, limit=1,
        )  # fmt: skip
        assert parent.start_time and parent.start_time.timestamp() >= since, parent
        subs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])))  # fmt: skip
    return sorted(s.start_time.timestamp() for s in subs if s.start_time)


def multi_config(tmp: Path, run: Path, agent_url: str, n: int) -> Path:
    datasets = [{"name": name, "input": str(tmp / f"{name}.jsonl"),
                 "output": str(run / f"train_{name}.jsonl"), "agent_url": agent_url,
                 "responses_create_params": {"temperature": t}, "num_repeats": r}
                for name, t, r in DATASETS]  # fmt: skip
    config = {"datasets": datasets,
              "mix": {"output": str(run / "train_mixed.jsonl"), "total": n // 2, "seed": 0,
                      "proportions": {"high_quality": 0.6, "exploration": 0.3, "hard": 0.1}}}  # fmt: skip
    path = run / "mix.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def skew_run(agent: Agent, tmp: Path, label: str, api_url: str, home: Path, n: int
             ) -> dict[str, Any]:  # fmt: skip
    run = tmp / "runs" / label
    run.mkdir(parents=True)
    config = multi_config(tmp, run, agent.url, n)
    offset = agent.log_offset()
    res = run_measured([PY, "-m", "rollouts_cli", "multi", "--config", str(config)],
                       env=cli_env(home, run / "work", api_url), cwd=run,
                       log_path=run / "stdout.log", timeout_s=300)  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"{label}: rollouts multi exited {res.returncode}:\n{res.tail()}")
    firsts: dict[float, float] = {}
    for q in requests_since(agent, offset):
        firsts[q["temperature"]] = min(q["time"], firsts.get(q["temperature"], math.inf))
    assert len(firsts) == 3, firsts
    ordered = sorted(firsts.values())
    starts = asyncio.run(subflow_starts(api_url, res.start_ts - 1))
    assert len(starts) == 3, starts
    return {
        "first_request_by_dataset_s": {
            name: round(firsts[t] - res.start_ts, 3) for name, t, _ in DATASETS
        },
        "first_request_skew_s": round(ordered[-1] - ordered[0], 3),
        "subflow_start_skew_s": round(starts[-1] - starts[0], 3),
        "subflow_starts_s": [round(s - res.start_ts, 3) for s in starts],
        "total_s": round(res.wall_s, 3),
    }


def med_range(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    return (f"{statistics.median(values):.{digits}f} "
            f"({min(values):.{digits}f}-{max(values):.{digits}f})")  # fmt: skip


def report(rows: list[dict[str, Any]], backends: list[str], repeats: int, skew_n: int, n: int,
           n_chunks: int) -> str:  # fmt: skip
    """Print (and return) the table: medians and ranges over the rounds, per backend."""
    summary: list[list[Any]] = []
    for backend in backends:
        mine = [r for r in rows if r["backend"] == backend]
        per_chunk = {k: 1000 * (statistics.median(r["many_chunks"][k] for r in mine)
                                - statistics.median(r["one_chunk"][k] for r in mine))
                     / (n_chunks - 1) for k in ("total_s", "collection_s")}  # fmt: skip
        loads = [r[k] for r in mine for k in ("load_skew", "load_startup", "load_chunks")]
        summary.append([
            backend,
            med_range([r["skew"]["first_request_skew_s"] for r in mine]),
            med_range([r["skew"]["subflow_start_skew_s"] for r in mine]),
            med_range([max(r["skew"]["first_request_by_dataset_s"].values()) for r in mine]),
            med_range([r["skew"]["total_s"] for r in mine], 1),
            round(per_chunk["total_s"], 1), round(per_chunk["collection_s"], 1),
            med_range([r["startup"]["first_request_s"] for r in mine]),
            f"{min(loads):.2f}-{max(loads):.2f}",
        ])  # fmt: skip
    print()
    print(f"{repeats} rounds per backend; median (range). Skew: three concurrent subflows, "
          f"{skew_n} tasks each. Per chunk: {n} rollouts, 1 chunk vs {n_chunks}. First "
          "request: `rollouts collect`, 5 tasks.")  # fmt: skip
    return print_table(
        ["server database", "skew of first requests s", "skew of subflow starts s",
         "command -> third dataset's first request s", "multi command s",
         "per chunk ms (total)", "per chunk ms (collection)", "command -> first request s",
         "load 1m"], summary,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgres"],
                    choices=["sqlite", "postgres"])  # fmt: skip
    ap.add_argument("--repeats", type=int, default=5, help="rounds per backend (%(default)s)")
    ap.add_argument("--skew-n", type=int, default=200, help="tasks per dataset (%(default)s)")
    ap.add_argument("--n", type=int, default=2000, help="rollouts of the per-chunk runs")
    ap.add_argument("--small-chunk", type=int, default=50, help="chunk_size of the many-chunk runs")
    ap.add_argument("--pg-host", default="127.0.0.1")
    ap.add_argument("--pg-port", type=int, default=5432)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--json", type=Path, default=None,
                    help="default bench/results/prefect_backends.json")  # fmt: skip
    ap.add_argument("--report", type=Path, default=None, metavar="JSON",
                    help="print the table of an earlier run's JSON and exit")  # fmt: skip
    add_gate_args(ap, budget_s=300.0)
    # a running Prefect server keeps a 2-core machine's load near 1 by itself: short waits
    ap.set_defaults(load_threshold=1.5, max_wait_s=30.0)
    args = ap.parse_args()
    if args.report:
        done = json.loads(args.report.read_text())
        a = done["args"]
        report(done["rounds"], a["backends"], a["repeats"], a["skew_n"], a["n"],
               math.ceil(a["n"] / a["small_chunk"]))  # fmt: skip
        return
    gate = gate_from_args(args)

    from reference_agent.server import write_tasks

    n_chunks = math.ceil(args.n / args.small_chunk)
    rows: list[dict[str, Any]] = []
    servers: dict[str, Any] = {}
    with bench_dir("prefect-backends", args.keep) as tmp:
        for i, (name, _, _) in enumerate(DATASETS):
            write_tasks(tmp / f"{name}.jsonl", args.skew_n, seed=i)
        write_tasks(tmp / "chunks.jsonl", args.n)
        startup_dir = tmp / "startup"
        startup_dir.mkdir()
        write_tasks(startup_dir / "tasks.jsonl", 5)  # startup.run_one reads it there
        with reference_agent(0, 0, tmp / "requests.jsonl") as agent:
            for backend in args.backends:
                print(f"backend {backend}", flush=True)
                db_url, db = None, None
                if backend == "postgres":
                    db = f"rollouts_bench_{int(time.time())}"
                    psql(args.pg_host, args.pg_port, "createdb", db)
                    db_url = f"postgresql+asyncpg://postgres@{args.pg_host}:{args.pg_port}/{db}"
                home = tmp / f"cli-home-{backend}"
                (tmp / f"work-{backend}").mkdir()
                shome = tmp / f"server-home-{backend}"
                shome.mkdir()
                try:
                    with startup_prefect_server(shome, tmp / f"server-{backend}.log", db_url) as (
                        url, healthy_s, _
                    ):  # fmt: skip
                        servers[backend] = {"healthy_after_s": round(healthy_s, 2)}

                        def chunked(label: str, chunk: int, i: int, url: str = url,
                                    home: Path = home, backend: str = backend) -> dict[str, Any]:  # fmt: skip
                            t = run_collect(agent, tmp / "chunks.jsonl",
                                            tmp / "out" / f"{backend}-{label}-{i}.jsonl",
                                            n=args.n, parallel=64, chunk_size=chunk,
                                            prefect_home=home, work_dir=tmp / f"work-{backend}",
                                            api_url=url)  # fmt: skip
                            assert t.rollouts_written == args.n, t
                            return t.as_dict()

                        # unmeasured: registers the flows and task keys on this server
                        skew_run(agent, tmp, f"{backend}-warmup", url, home, args.skew_n)
                        chunked("warmup", args.n, 0)
                        startup_run_one(StartupAgent(agent), startup_dir, f"{backend}-warmup", 0,
                                        home, url, 5, False, 120, ROOT)  # fmt: skip
                        for i in range(args.repeats):
                            row: dict[str, Any] = {"backend": backend, "round": i}
                            row["load_skew"] = gate.wait(f"{backend} #{i} skew")["load_1m"]
                            row["skew"] = skew_run(agent, tmp, f"{backend}-{i}", url, home,
                                                   args.skew_n)  # fmt: skip
                            row["load_startup"] = gate.wait(f"{backend} #{i} startup")["load_1m"]
                            row["startup"] = startup_run_one(
                                StartupAgent(agent), startup_dir, backend, i, home, url, 5,
                                False, 120, ROOT,
                            )  # fmt: skip
                            row["load_chunks"] = gate.wait(f"{backend} #{i} chunks")["load_1m"]
                            row["one_chunk"] = chunked("one", args.n, i)
                            row["many_chunks"] = chunked("many", args.small_chunk, i)
                            rows.append(row)
                            s = row["skew"]
                            print(f"    skew: first requests {s['first_request_skew_s']:.2f} s, "
                                  f"subflow starts {s['subflow_start_skew_s']:.2f} s; "
                                  f"first request {row['startup']['first_request_s']:.2f} s; "
                                  f"1 chunk {row['one_chunk']['total_s']:.2f} s, {n_chunks} "
                                  f"chunks {row['many_chunks']['total_s']:.2f} s", flush=True)  # fmt: skip
                finally:
                    if db:
                        psql(args.pg_host, args.pg_port, "dropdb", "--force", db)

    table = report(rows, args.backends, args.repeats, args.skew_n, args.n, n_chunks)
    write_json("prefect_backends", {"machine": machine(), "args": vars(args) | {"json": None},
                                    "servers": servers, "rounds": rows, "table": table,
                                    "load_gate": gate.log}, args.json)  # fmt: skip


if __name__ == "__main__":
    main()
