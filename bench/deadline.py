"""Benchmark: how close to its deadline a `--max-duration` run ends, and how fast a signal stops one.

Against the reference agent at lognormal latency (--latency-ms median, --sigma) and a running
Prefect server (SQLite, started here), with the real console script:

- deadline: --runs collections of --n tasks cut by `--max-duration`; per run, from the run's
  `last_stop.json` (deadline = flow-run start + max_duration): the command's end minus the
  deadline (the overshoot), the end of collection (every rollout in flight finished or
  cancelled) minus the deadline, and the last request's arrival at the agent minus the deadline
  (negative: the drain margin at work).
- signals: --signal-runs collections each stopped by SIGINT and by SIGTERM once --wait-written
  rollouts are written (default grace ROLLOUTS_STOP_GRACE_S=10 s): the time from the signal to
  the command's exit, its status, and the rollouts cut in flight.

    .venv/bin/python bench/deadline.py [--runs 5] [--signal-runs 3] [--n 3000]
        [--max-duration 10] [--latency-ms 200] [--sigma 0.8] [--parallel 32]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import kill_group, loadavg
from startup import ROLLOUTS, clean_env, prefect_server

ROOT = Path(__file__).resolve().parents[1]


def start_agent(tmp: Path, latency_ms: float, sigma: float) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [ROLLOUTS, "serve-agent", "--host", "127.0.0.1", "--port", "0", "--latency-ms",
         str(latency_ms), "--latency-sigma", str(sigma), "--request-log", str(tmp / "req.jsonl")],
        stdout=subprocess.PIPE, env=clean_env(tmp / "agent-home"), start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    m = re.search(r"listening on (http://\S+)", proc.stdout.readline().decode())
    assert m, "agent did not start"
    return proc, m.group(1)


def request_times(log: Path, since: int) -> list[float]:
    with open(log, "rb") as f:
        f.seek(since)
        return [json.loads(line)["time"] for line in f if line.endswith(b"\n")]


def collect_cmd(agent_url: str, inp: Path, out: Path, parallel: int) -> list[str]:
    return [ROLLOUTS, "collect", f"+agent_url={agent_url}", f"+input_jsonl_fpath={inp}",
            f"+output_jsonl_fpath={out}", "+chunk_size=500",
            f"+num_samples_in_parallel={parallel}"]  # fmt: skip


def run_dir_of(out: Path) -> Path:
    return next((out.parent / ".rollouts").glob(f"{out.stem}-*[!k]"))


def written(out: Path) -> int:
    try:
        return sum(p.read_bytes().count(b"\n")
                   for p in (run_dir_of(out) / "chunks").glob("*.rollouts.jsonl"))  # fmt: skip
    except StopIteration:
        return 0


def deadline_run(tmp: Path, i: int, url: str, inp: Path, env: dict[str, str],
                 args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    out = tmp / f"deadline-{i}" / "out.jsonl"
    out.parent.mkdir()
    log = tmp / "req.jsonl"
    since = log.stat().st_size if log.exists() else 0
    cmd = [*collect_cmd(url, inp, out, args.parallel), f"+max_duration={args.max_duration}"]
    res = subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, check=False)
    ended = time.time()
    rec = json.loads((run_dir_of(out) / "last_stop.json").read_text())
    last_request = max(request_times(log, since))
    return {"status": res.returncode, "overshoot_s": ended - rec["deadline_at"],
            "collection_end_s": rec["collection_ended_at"] - rec["deadline_at"],
            "last_request_s": last_request - rec["deadline_at"],
            "cancelled_in_flight": rec["cancelled_in_flight"], "missing": rec["missing"],
            "load_1m": loadavg()[0]}  # fmt: skip


def signal_run(tmp: Path, label: str, sig: signal.Signals, url: str, inp: Path,
               env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    out = tmp / label / "out.jsonl"
    out.parent.mkdir()
    proc = subprocess.Popen(collect_cmd(url, inp, out, args.parallel), env=env, cwd=out.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    while written(out) < args.wait_written:
        assert proc.poll() is None, "the run ended before the signal"
        time.sleep(0.05)
    proc.send_signal(sig)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=120)
    took = time.monotonic() - t0
    rec = json.loads((run_dir_of(out) / "last_stop.json").read_text())
    return {"signal": sig.name, "status": proc.returncode, "stop_s": took,
            "cancelled_in_flight": rec["cancelled_in_flight"],
            "rerun_message": b"Rerun the same command" in err, "load_1m": loadavg()[0]}  # fmt: skip


def fmt(values: list[float]) -> str:
    return (f"median {statistics.median(values):+.2f}, min {min(values):+.2f}, "
            f"max {max(values):+.2f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--signal-runs", type=int, default=3)
    ap.add_argument("--n", type=int, default=3000, help="tasks per collection")
    ap.add_argument("--max-duration", type=float, default=10.0)
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--sigma", type=float, default=0.8)
    ap.add_argument("--parallel", type=int, default=32)
    ap.add_argument("--wait-written", type=int, default=300)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from reference_agent.server import write_tasks

    with tempfile.TemporaryDirectory(prefix="bench-deadline-") as d:
        tmp = Path(d)
        inp = tmp / "tasks.jsonl"
        write_tasks(inp, args.n, seed=1)
        agent, url = start_agent(tmp, args.latency_ms, args.sigma)
        try:
            with prefect_server(tmp / "home", tmp / "server.log", None) as (api, _, _):
                # This checkout's code, whichever one the venv was installed from.
                env = {**clean_env(tmp / "home", api), "PYTHONPATH": str(ROOT)}
                subprocess.run(
                    [*collect_cmd(url, inp, tmp / "warm.jsonl", args.parallel), "+limit=5"],
                    env=env,
                    cwd=tmp,
                    check=True,
                    capture_output=True,
                )  # fmt: skip  (flow registration)
                deadlines = [deadline_run(tmp, i, url, inp, env, args) for i in range(args.runs)]
                signals = [signal_run(tmp, f"{s.name}-{i}", s, url, inp, env, args)
                           for i in range(args.signal_runs)
                           for s in (signal.SIGINT, signal.SIGTERM)]  # fmt: skip
        finally:
            kill_group(agent)
    print(f"\ndeadline: max_duration {args.max_duration:g} s, {args.n} tasks, C={args.parallel}, "
          f"latency lognormal median {args.latency_ms:g} ms sigma {args.sigma:g}")  # fmt: skip
    for r in deadlines:
        print(f"  status {r['status']}  command end {r['overshoot_s']:+.2f} s  collection end "
              f"{r['collection_end_s']:+.2f} s  last request {r['last_request_s']:+.2f} s  "
              f"cut in flight {r['cancelled_in_flight']}  missing {r['missing']}  "
              f"load {r['load_1m']:.2f}")  # fmt: skip
    print(f"  command end - deadline: {fmt([r['overshoot_s'] for r in deadlines])} s")
    for r in signals:
        print(f"  {r['signal']}: status {r['status']}, exit {r['stop_s']:.2f} s after the "
              f"signal, cut in flight {r['cancelled_in_flight']}, rerun message "
              f"{r['rerun_message']}, load {r['load_1m']:.2f}")  # fmt: skip
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "deadline.json").write_text(json.dumps(
        {"args": vars(args), "deadline": deadlines, "signals": signals}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
