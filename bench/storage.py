"""Benchmark: a run's input and output in a bucket beside the same run on local disk (issue 22).

A local S3-compatible server (moto's standalone server on 127.0.0.1, started as the tests start
it: tests/s3_server.py) holds a bucket; one reference agent (zero latency) answers. Then for
``--repeats`` rounds, alternating which goes first, the real `rollouts collect` of N rollouts
(``--tasks`` x ``--num-repeats``, chunk_size default) with
- local:  input and output on local disk,
- bucket: input and output in the bucket (AWS_* settings pointing at moto, dummy keys),
each with a fresh output, measuring the wall time (start to exit), rollouts/s, the split of it
(start-up, collection to the last rollout written in the run state, after: the merge into the
final output, metrics and shutdown), and peak RSS (VmHWM) of the CLI and of its children
(Prefect's temporary server). The run state stays local in both (ROLLOUTS_WORK_DIR).

Then one SIGKILL run with input and output in the bucket: the CLI is killed once about half the
rollouts are written, the same command is run again, and the agent's request log says what
was sent twice; the output object is checked exact (every key once, in order, the rows of the
local run's output but the agent's clock).

    .venv/bin/python bench/storage.py [--repeats 3] [--tasks 50000] [--num-repeats 2]
        [--parallel 256] [--no-kill] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))

import orjson
from _common import (
    Agent,
    bench_dir,
    cli_env,
    collect_cmd,
    kill_group,
    loadavg,
    machine,
    print_table,
    reference_agent,
    run_collect,
    write_json,
)
from s3_server import S3Server, s3_server_started  # tests/s3_server.py


def _hwm_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _count_lines(run_dir: Path) -> int:
    n = 0
    for f in (run_dir / "chunks").glob("*.rollouts.jsonl"):
        with contextlib.suppress(OSError), open(f, "rb") as fh:
            n += sum(buf.count(b"\n") for buf in iter(lambda fh=fh: fh.read(1 << 20), b""))
    return n


def _written_keys(run_dir: Path) -> set[tuple[int, int]]:
    """Keys on complete lines of the run state's chunk outputs (as tests/test_crash_resume.py)."""
    keys = set()
    for path in (run_dir / "chunks").glob("*.rollouts.jsonl"):
        data = path.read_bytes()
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            if line.strip():
                r = orjson.loads(line)
                keys.add((r["_ng_task_index"], r["_ng_rollout_index"]))
    return keys


def _logged_keys(agent: Agent, offset: int) -> list[tuple[int, int]]:
    assert agent.request_log is not None
    with open(agent.request_log, "rb") as f:
        f.seek(offset)
        rows = [orjson.loads(line) for line in f if line.endswith(b"\n")]
    return [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in rows]


def _rows_without_clock(data: bytes) -> list[dict[str, Any]]:
    rows = [orjson.loads(line) for line in data.splitlines() if line.strip()]
    for row in rows:
        if isinstance(row.get("response"), dict):
            row["response"].pop("created_at", None)
    return rows


def _object_bytes(s3: S3Server, url: str) -> bytes:
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url, **s3.options())
    return bytes(fs.cat_file(path))


def _rm_prefix(s3: S3Server, url: str) -> None:
    """Frees moto's memory (it keeps every object in RAM) between runs."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url, **s3.options())
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def task_times(prefect_db: Path, t0: float, t1: float) -> dict[str, float]:
    """Seconds of the run's split, merge and metrics tasks (Prefect's database: the task runs
    that started between the epoch times t0 and t1)."""
    import sqlite3
    from datetime import UTC, datetime

    def iso(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")

    out: dict[str, float] = {}
    with contextlib.closing(sqlite3.connect(f"file:{prefect_db}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT name, start_time, end_time FROM task_run WHERE name IN "
                          "('split', 'merge', 'metrics') AND start_time >= ? AND start_time <= ?",
                          (iso(t0), iso(t1))).fetchall()  # fmt: skip
    for name, start, end in rows:
        if start and end:
            d = datetime.fromisoformat(end) - datetime.fromisoformat(start)
            out[name] = round(out.get(name, 0.0) + d.total_seconds(), 2)
    return out


def one_run(mode: str, i: int, *, agent: Agent, s3: S3Server, bucket: str, tasks: Path,
            tasks_url: str, tmp: Path, args: argparse.Namespace,
            moto_pid: int) -> dict[str, Any]:  # fmt: skip
    n = args.tasks * args.num_repeats
    if mode == "local":
        inp: Any = tasks
        out: Any = tmp / "out" / f"local-{i}.jsonl"
        env_extra: dict[str, str] = {}
    else:
        inp = tasks_url
        out = f"s3://{bucket}/runs/bucket-{i}/rollouts.jsonl"
        env_extra = s3.env()
    load_before = loadavg()
    t_start = time.time()
    t = run_collect(agent, inp, out, n=n, parallel=args.parallel, chunk_size=args.chunk_size,
                    prefect_home=tmp / "prefect-home", work_dir=tmp / "work",
                    log_path=tmp / f"collect-{mode}-{i}.log", timeout_s=args.timeout_s,
                    extra=[f"+num_repeats={args.num_repeats}"],
                    env_extra=env_extra)  # fmt: skip
    load_after = loadavg()
    if t.rollouts_written != n:
        raise RuntimeError(f"{mode} run {i}: {t.rollouts_written} written, expected {n}")
    summary = next((line.strip() for line in (tmp / f"collect-{mode}-{i}.log").read_text(
        errors="replace").splitlines() if " written, " in line), "")  # fmt: skip
    if mode == "local":
        size = Path(out).stat().st_size
    else:
        from fsspec.core import url_to_fs

        fs, path = url_to_fs(out, **s3.options())
        size = int(fs.info(path)["size"])
    r = t.as_dict() | {
        "mode": mode, "repeat": i, "output": str(out), "output_mb": round(size / 1e6, 1),
        "rate_total": round(n / t.total_s, 1), "rate_collection": round(n / t.collection_s, 1),
        "summary": summary, "load_before": load_before, "load_after": load_after,
        "moto_hwm_mb": round(_hwm_mb(moto_pid), 1),
        "tasks_s": task_times(tmp / "prefect-home" / "prefect.db", t_start, time.time()),
    }  # fmt: skip
    print(f"  {mode:<6} #{i}: {t.total_s:6.1f} s total ({r['rate_total']:,.0f}/s), start-up "
          f"{t.startup_s:.1f} s, collection {t.collection_s:.1f} s "
          f"({r['rate_collection']:,.0f}/s), after {t.after_s:.1f} s; CLI {t.hwm_cli_mb:.0f} MB, "
          f"children {max(t.hwm_children_mb.values(), default=0):.0f} MB; {r['tasks_s']}; "
          f"load {load_before[0]:.2f}->{load_after[0]:.2f}", flush=True)  # fmt: skip
    return r


def kill_run(*, agent: Agent, s3: S3Server, bucket: str, tasks_url: str, tmp: Path,
             args: argparse.Namespace, reference: Path | None) -> dict[str, Any]:  # fmt: skip
    from rollouts.run_state import run_dir_for

    n = args.tasks * args.num_repeats
    out = f"s3://{bucket}/runs/killed/rollouts.jsonl"
    work = tmp / "work"
    run_dir = run_dir_for(out, work)
    cmd = collect_cmd(agent.url, tasks_url, out, parallel=args.parallel,  # type: ignore[arg-type]
                      chunk_size=args.chunk_size, extra=[f"+num_repeats={args.num_repeats}"])  # fmt: skip
    env = cli_env(tmp / "prefect-home", work) | s3.env()
    offset0 = agent.log_offset()
    target = int(n * args.kill_at)
    log = open(tmp / "collect-killed.log", "wb")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        while _count_lines(run_dir) < target:
            if proc.poll() is not None:
                raise RuntimeError("the run ended before it could be killed")
            if time.perf_counter() - t0 > args.timeout_s:
                raise TimeoutError("no progress to the kill point")
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)  # the CLI alone, as `kill -9 PID`
        proc.wait()
        killed_after_s = time.perf_counter() - t0
    finally:
        kill_group(proc)  # what it left (Prefect's temporary server) is ours to stop
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    time.sleep(1.0)  # the agent's log: the last answers in flight land
    sent_before = _logged_keys(agent, offset0)
    written = _written_keys(run_dir)
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(out, **s3.options())
    object_after_kill = fs.exists(path)
    print(f"  killed after {killed_after_s:.1f} s: {len(written):,} written in the run state, "
          f"{len(sent_before):,} requests sent, output object exists: {object_after_kill}",
          flush=True)  # fmt: skip

    # The same command at once: the killed run's lease names a process of this machine that
    # is gone, so it is taken over at once (docs/storage.md, "The lock"). Were it refused (a
    # lease of another machine), the bench waits for its expiry and runs it again.
    offset1 = agent.log_offset()
    t_rerun = time.perf_counter()
    at_once = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True,
                             timeout=args.timeout_s, check=False)  # fmt: skip
    rerun_s, rerun_after_s, rerun_tasks = time.perf_counter() - t_rerun, None, None
    refused_msg = (at_once.stderr.strip().splitlines() or [""])[-1]
    print(f"  the same command at once: exit {at_once.returncode} ({rerun_s:.1f} s)", flush=True)
    lease_wait_s = 0.0
    refused_requests = 0
    if at_once.returncode != 0:
        print(f"  refused: {refused_msg[:200]}", flush=True)
        fs.invalidate_cache()
        leases_found = [p for p in fs.find(f"{bucket}/runs/killed") if p.endswith(".lease")]
        if leases_found:
            record = orjson.loads(fs.cat_file(leases_found[0]))
            lease_wait_s = max(0.0, float(record["expires_at"]) + 5.0 + 1.0 - time.time())
            print(f"  waiting {lease_wait_s:.0f} s for the lease to expire", flush=True)
            time.sleep(lease_wait_s)
        refused_requests = len(_logged_keys(agent, offset1))
        offset1 = agent.log_offset()
        t = run_collect(agent, tasks_url, out, n=n, parallel=args.parallel,  # type: ignore[arg-type]
                        chunk_size=args.chunk_size, prefect_home=tmp / "prefect-home",
                        work_dir=work, log_path=tmp / "collect-rerun.log",
                        timeout_s=args.timeout_s, extra=[f"+num_repeats={args.num_repeats}"],
                        env_extra=s3.env())  # fmt: skip
        rerun_s, rerun_after_s = t.total_s, round(t.after_s, 2)
        rerun_tasks = task_times(tmp / "prefect-home" / "prefect.db",
                                 time.time() - t.total_s - 1, time.time())
    resent = _logged_keys(agent, offset1)
    resent_set = set(resent)
    all_keys = {(ti, ri) for ti in range(args.tasks) for ri in range(args.num_repeats)}
    data = _object_bytes(s3, out)
    keys = [(r["_ng_task_index"], r["_ng_rollout_index"])
            for r in (orjson.loads(line) for line in data.splitlines() if line.strip())]  # fmt: skip
    exact_keys = keys == sorted(all_keys)
    same_rows = None
    if reference is not None:
        same_rows = _rows_without_clock(data) == _rows_without_clock(reference.read_bytes())
    res = {
        "n": n, "kill_at": args.kill_at, "killed_after_s": round(killed_after_s, 2),
        "written_at_kill": len(written), "requests_before_kill": len(sent_before),
        "in_flight_at_kill": len(set(sent_before) - written),
        "object_after_kill": object_after_kill,
        "at_once_returncode": at_once.returncode, "at_once_message": refused_msg,
        "at_once_requests": refused_requests,
        "lease_wait_s": round(lease_wait_s, 1),
        "rerun_requests": len(resent), "rerun_distinct": len(resent_set),
        "written_resent": len(resent_set & written),
        "rerun_sent_what_was_missing": resent_set == all_keys - written,
        "rerun_total_s": round(rerun_s, 2), "rerun_after_s": rerun_after_s,
        "rerun_tasks_s": rerun_tasks,
        "output_rows": len(keys), "output_exact_keys": exact_keys,
        "output_same_rows_as_local_run": same_rows,
    }  # fmt: skip
    print(f"  rerun: {len(resent):,} requests ({res['written_resent']} of them written before "
          f"the kill), {len(keys):,} rows, keys exact: {exact_keys}, rows as the local run: "
          f"{same_rows}", flush=True)  # fmt: skip
    return res


def _med(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def _rng(values: list[float]) -> str:
    return f"{min(values):,.1f}-{max(values):,.1f}" if len(values) > 1 else f"{values[0]:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (local, bucket)")
    ap.add_argument("--tasks", type=int, default=50_000)
    ap.add_argument("--num-repeats", type=int, default=2, help="rollouts per task")
    ap.add_argument("--parallel", type=int, default=256, help="num_samples_in_parallel")
    ap.add_argument("--chunk-size", type=int, default=10_000, help="chunk_size (the default)")
    ap.add_argument("--kill-at", type=float, default=0.5, help="share written at the SIGKILL")
    ap.add_argument("--no-kill", action="store_true", help="skip the SIGKILL run")
    ap.add_argument("--timeout-s", type=float, default=900.0)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--json", type=Path, default=None, help="default bench/results/storage.json")
    args = ap.parse_args()
    n = args.tasks * args.num_repeats
    uptime_before = subprocess.run(
        ["uptime"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(f"uptime before: {uptime_before}", flush=True)

    runs: list[dict[str, Any]] = []
    killed: dict[str, Any] | None = None
    with bench_dir("storage", args.keep) as tmp:
        (tmp / "work").mkdir()
        from reference_agent.server import write_tasks

        tasks = tmp / "tasks.jsonl"
        write_tasks(tasks, args.tasks)
        with s3_server_started(tmp / "moto.log") as s3:
            bucket = s3.bucket()
            tasks_url = s3.put(f"s3://{bucket}/data/tasks.jsonl", tasks.read_bytes())
            with reference_agent(0, 0, tmp / "requests.jsonl", extra=None) as agent:
                # Warm-up (imports, Prefect's database), not measured.
                small = tmp / "small.jsonl"
                write_tasks(small, 20)
                run_collect(agent, small, tmp / "out" / "warm.jsonl", n=20, parallel=8,
                            chunk_size=20, prefect_home=tmp / "prefect-home",
                            work_dir=tmp / "work")  # fmt: skip
                print(f"N = {n:,} rollouts ({args.tasks:,} tasks x {args.num_repeats}), "
                      f"C = {args.parallel}, chunk_size {args.chunk_size:,}, zero latency",
                      flush=True)  # fmt: skip
                last_local: Path | None = None
                for i in range(args.repeats):
                    order = ["local", "bucket"] if i % 2 == 0 else ["bucket", "local"]
                    for mode in order:
                        r = one_run(mode, i, agent=agent, s3=s3, bucket=bucket, tasks=tasks,
                                    tasks_url=tasks_url, tmp=tmp, args=args,
                                    moto_pid=s3.process.pid)  # fmt: skip
                        runs.append(r)
                        if mode == "bucket":
                            _rm_prefix(s3, f"s3://{bucket}/runs/bucket-{i}")
                        else:
                            if last_local is not None:
                                last_local.unlink(missing_ok=True)
                            last_local = Path(r["output"])
                if not args.no_kill:
                    print("SIGKILL run (input and output in the bucket):", flush=True)
                    killed = kill_run(agent=agent, s3=s3, bucket=bucket, tasks_url=tasks_url,
                                      tmp=tmp, args=args, reference=last_local)  # fmt: skip
            moto_hwm = round(_hwm_mb(s3.process.pid), 1)
    uptime_after = subprocess.run(
        ["uptime"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(f"uptime after: {uptime_after}", flush=True)

    print()
    rows = []
    for mode in ("local", "bucket"):
        rs = [r for r in runs if r["mode"] == mode]
        rows.append([
            mode, len(rs), _med([r["rate_total"] for r in rs]),
            _rng([r["rate_total"] for r in rs]), _med([r["total_s"] for r in rs]),
            _med([r["startup_s"] for r in rs]), _med([r["collection_s"] for r in rs]),
            _med([r["after_s"] for r in rs]), max(r["hwm_cli_mb"] for r in rs),
            max(max(r["hwm_children_mb"].values(), default=0) for r in rs),
            _rng([r["load_before"][0] for r in rs] + [r["load_after"][0] for r in rs]),
        ])  # fmt: skip
    table = print_table(
        ["output", "runs", "rollouts/s (total, median)", "range", "total s", "start-up s",
         "collection s", "after (merge...) s", "CLI peak RSS MB", "children peak MB", "load 1m"],
        rows)  # fmt: skip
    write_json("storage", {"machine": machine(), "args": vars(args) | {"json": None},
                           "uptime_before": uptime_before, "uptime_after": uptime_after,
                           "moto_hwm_mb": moto_hwm, "runs": runs, "killed": killed,
                           "table": table}, args.json)  # fmt: skip


if __name__ == "__main__":
    main()
