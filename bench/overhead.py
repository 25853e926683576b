"""Benchmark: the collector's own overhead against a zero-latency agent, beside bare loops.

In one run, against one reference agent (zero latency) on 127.0.0.1, for each N:
- our CLI (`python -m rollouts_cli collect`, chunk_size 10000, C = 64): collection phase
  (first request -> last rollout written) and total (command start -> exit), its peak RSS
  (VmHWM of the CLI process; Prefect's temporary server is a separate process, shown apart),
- bare httpx + httpx_aiohttp.AiohttpTransport loop (bench/_bare_client.py): the same HTTP stack,
  asyncio.Semaphore(C), orjson, append each answer to a file,
- bare aiohttp ClientSession loop (same structure).

With --profile, one more CLI run under py-spy (install it into the venv yourself:
`.venv/bin/pip install py-spy`; it is not a project dependency) and a breakdown of where the
CLI process spends its samples.

    .venv/bin/python bench/overhead.py [--ns 10000 100000] [--parallel 64]
    .venv/bin/python bench/overhead.py --ns 10000 --profile --gc-experiment \
        --json bench/results/overhead_profile.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    PY,
    ROOT,
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

BARE = Path(__file__).resolve().parent / "_bare_client.py"


def run_bare(client: str, url: str, tasks: Path, n: int, parallel: int, tmp: Path) -> dict:
    out = tmp / f"bare-{client}-{n}.jsonl"
    out.unlink(missing_ok=True)
    log = tmp / f"bare-{client}-{n}.log"
    cmd = [PY, str(BARE), "--client", client, "--url", url, "--tasks", str(tasks), "--n", str(n),
           "--parallel", str(parallel), "--out", str(out)]  # fmt: skip
    res = run_measured(cmd, env=base_env(), log_path=log, timeout_s=600)
    if res.returncode != 0:
        raise RuntimeError(f"{client} loop exited {res.returncode}:\n{res.tail()}")
    loop = json.loads(log.read_text().strip().splitlines()[-1])
    if loop["errors"]:
        raise RuntimeError(f"{client} loop: {loop['errors']} errors")
    with open(out, "rb") as f:
        lines = sum(1 for _ in f)
    assert lines == n, (lines, n)
    out.unlink()
    cpu_loop, _ = res.cpu_between(loop["start_ts"], loop["start_ts"] + loop["loop_s"])
    return {"client": client, "n": n, "loop_s": round(loop["loop_s"], 3),
            "loop_rps": round(loop["rps"], 1), "total_s": round(res.wall_s, 3),
            "total_rps": round(n / res.wall_s, 1), "peak_rss_mb": round(res.hwm_main_mb, 1),
            "maxrss_wait4_mb": round(res.maxrss_wait4_mb, 1), "cpu_s": round(res.cpu_s, 2),
            "cpu_loop_s": round(cpu_loop, 2), "cpu_ms_per_rollout": round(1000 * cpu_loop / n, 3),
            "server_cpu_loop_s": 0.0}  # fmt: skip


# ------------------------------------------------------------------------------------------
# Profile (py-spy raw = collapsed stacks "thread;frame;frame count")
# ------------------------------------------------------------------------------------------

# py-spy frames read "function (path/relative/to/sys.path.py:line)"; the first rule matching a
# frame, from the innermost one outwards, names the sample's category (its self time).
CATEGORIES: list[tuple[str, str]] = [
    ("imports (start-up)", r"importlib"),
    ("aiohttp (client, parser, connector)", r"\(aiohttp/"),
    ("httpx_aiohttp transport", r"\(httpx_aiohttp/"),
    ("httpx (client, models)", r"\(httpx/"),
    ("asyncio event loop, selectors", r"\((asyncio/|selectors\.py)"),
    ("rollouts (collect, agent_client, fileio)", r"\((collect|agent_client|fileio)\.py"),
    ("prefect", r"\(prefect/"),
    ("pydantic", r"\(pydantic"),
]
INCLUSIVE: list[tuple[str, str]] = [
    ("collect_chunk (the collection)", "collect_chunk ("),
    ("  one() per rollout", "collect_chunk.<locals>.one ("),
    ("    AgentClient._attempt (POST + parse)", "AgentClient._attempt ("),
    ("      httpx AsyncClient.send", "AsyncClient.send (httpx/"),
    ("        aiohttp ClientSession._request", "ClientSession._request (aiohttp/"),
    ("    _ResultWriter.write (dumps + write + flush)", "_ResultWriter.write ("),
    ("    _output_row", "_output_row ("),
    ("  DispatchPlan.body", "DispatchPlan.body ("),
    ("  _pending (read chunk rows)", "_pending ("),
    ("  scan_done", "scan_done ("),
    ("any prefect/ frame", "(prefect/"),
    ("imports", "_find_and_load ("),
]


def _source_line(frame: str) -> str:
    """The source text of a frame "func (path:line)", when the file can be found."""
    m = re.search(r"\(([^()]+\.py):(\d+)\)$", frame)
    if not m:
        return ""
    rel, line = m.group(1), int(m.group(2))
    for base in [str(ROOT / "rollouts"), str(ROOT), *sys.path]:
        path = Path(base) / rel
        if path.is_file():
            with contextlib.suppress(OSError, IndexError):
                return path.read_text().splitlines()[line - 1].strip()[:70]
    return ""


def analyse_profile(raw: Path) -> dict[str, Any]:
    threads: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    category: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    coll_category: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        thread = frames[0] if frames[0].startswith("thread") else "?"
        threads[re.sub(r"\s*\(\d+\)", "", thread)] += count
        real = [f for f in frames if not f.startswith(("thread", "process"))]
        if real:
            leaf[real[-1]] += count
        label = "other"
        for f in reversed(real):
            hit = next((c for c, rx in CATEGORIES if re.search(rx, f)), None)
            if hit:
                label = hit
                break
        category[label] += count
        for name, needle in INCLUSIVE:
            if any(needle in f for f in real):
                inclusive[name] += count
        if any("collect_chunk (" in f for f in real):
            coll_category[label] += count

    def pct(c: collections.Counter[str], n: int = 20, of: int = total) -> list[list[Any]]:
        return [[k, v, round(100 * v / max(of, 1), 1)] for k, v in c.most_common(n)]

    top_leaf = [[f"{k}  | {_source_line(k)}", v, p] for k, v, p in pct(leaf, 25)]
    coll_total = inclusive["collect_chunk (the collection)"]
    return {"samples": total, "threads": pct(threads, 10), "categories": pct(category, 20),
            "collection_samples": coll_total,
            "collection_categories": pct(coll_category, 20, coll_total),
            "inclusive": [[k, inclusive[k], round(100 * inclusive[k] / max(total, 1), 1)]
                          for k, _ in INCLUSIVE],
            "top_leaf": top_leaf}  # fmt: skip


def profile_run(agent: Any, tasks: Path, n: int, parallel: int, chunk: int, tmp: Path,
                rate: int, window_s: float) -> dict[str, Any]:  # fmt: skip
    """One CLI run under bench/_loopwatch.py, with py-spy attached for ``window_s`` seconds of
    steady-state collection (from 2 s after the first request)."""
    py_spy = shutil.which("py-spy", path=str(Path(PY).parent)) or shutil.which("py-spy")
    if py_spy is None:
        return {"skipped": "py-spy not installed (.venv/bin/pip install py-spy)"}
    raw = tmp / "profile.txt"
    offset = agent.log_offset()
    spy: dict[str, Any] = {}

    def on_start(proc: subprocess.Popen[bytes]) -> None:
        def attach() -> None:
            deadline = time.monotonic() + 300
            while agent.log_offset() <= offset and proc.poll() is None:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
            time.sleep(2.0)
            spy["started"] = time.time()
            r = subprocess.run([py_spy, "record", "--pid", str(proc.pid), "--rate", str(rate),
                                "--format", "raw", "--threads", "--gil", "--duration",
                                str(int(window_s)), "--output", str(raw)],
                               check=False, capture_output=True, text=True)  # fmt: skip
            spy["returncode"] = r.returncode
            spy["stderr"] = r.stderr[-400:]

        spy["thread"] = threading.Thread(target=attach, daemon=True)
        spy["thread"].start()

    t = run_collect(agent, tasks, tmp / "out" / "profiled.jsonl", n=n, parallel=parallel,
                    chunk_size=chunk, prefect_home=tmp / "prefect-home", work_dir=tmp / "work",
                    extra=[f"+limit={n}"], loopwatch=tmp / "profile.loopwatch.jsonl",
                    on_start=on_start, log_path=tmp / "profile.cli.log")  # fmt: skip
    spy["thread"].join(60)
    result: dict[str, Any] = {"n": n, "rate_hz": rate, "window_s": window_s,
                              "collection_s": round(t.collection_s, 3),
                              "collection_rps": round(n / t.collection_s, 1),
                              "loopwatch": t.loopwatch,
                              "py_spy_returncode": spy.get("returncode")}  # fmt: skip
    if not raw.exists():
        result["error"] = spy.get("stderr", "py-spy did not run")
        return result
    result["gil"] = analyse_profile(raw)  # samples of threads holding the GIL: CPU in Python
    return result


def gc_experiment(agent: Any, tasks: Path, n: int, parallel: int, chunk: int, tmp: Path,
                  gate: Any) -> list[dict[str, Any]]:  # fmt: skip
    """The same collection under bench/_loopwatch.py, as is and with the gc.freeze() that
    flows/collect.py makes before dispatch patched out."""
    out = []
    for label, env in (("as is", {}), ("gc.freeze() patched out", {"LOOPWATCH_GC_FREEZE": "off"})):
        load = gate.wait(f"gc experiment: {label}")
        slug = "nofreeze" if env else "asis"
        t = run_collect(agent, tasks, tmp / "out" / f"gc-{slug}.jsonl", n=n, parallel=parallel,
                        chunk_size=chunk, prefect_home=tmp / "prefect-home",
                        work_dir=tmp / "work", extra=[f"+limit={n}"],
                        loopwatch=tmp / f"gc-{slug}.loopwatch.jsonl", env_extra=env,
                        log_path=tmp / f"gc-{slug}.cli.log")  # fmt: skip
        lw = t.loopwatch or {}
        out.append({"variant": label, "n": n, "collection_s": round(t.collection_s, 3),
                    "collection_rps": round(n / t.collection_s, 1),
                    "cpu_cli_s": round(t.cpu_cli_s, 2),
                    "cpu_ms_per_rollout": round(1000 * t.cpu_cli_collection_s / n, 3),
                    "gc_ms": lw.get("gc_ms"),
                    "gc_share": lw.get("gc_share"), "gc": lw.get("gc"),
                    "stalls_over_50ms": lw.get("stalls_over_50ms"),
                    "stall_max_ms": lw.get("stall_max_ms"), "peak_rss_mb": round(t.hwm_cli_mb, 1),
                    "loopwatch": lw, "load": load})  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ns", type=int, nargs="+", default=[10_000, 100_000], help="rollouts per run")
    ap.add_argument("--parallel", type=int, default=64, help="C: requests in flight")
    ap.add_argument("--chunk-size", type=int, default=10_000)
    ap.add_argument("--profile", action="store_true", help="one more CLI run under py-spy")
    ap.add_argument("--profile-n", type=int, default=60_000)
    ap.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument(
        "--profile-window-s",
        type=float,
        default=20.0,
        help="seconds of steady-state collection to sample (%(default)s)",
    )
    ap.add_argument(
        "--gc-experiment",
        action="store_true",
        help="also run the CLI as is and with its gc.freeze() patched out (--gc-n)",
    )
    ap.add_argument("--gc-n", type=int, default=50_000)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (and the profile)")
    ap.add_argument("--json", type=Path, default=None, help="default bench/results/overhead.json")
    add_gate_args(ap)
    args = ap.parse_args()
    gate = gate_from_args(args)

    from reference_agent.server import write_tasks

    runs: list[dict[str, Any]] = []
    profile: dict[str, Any] | None = None
    with bench_dir("overhead", args.keep) as tmp:
        home, work = tmp / "prefect-home", tmp / "work"
        work.mkdir()
        n_max = max([*args.ns, args.profile_n if args.profile else 0,
                     args.gc_n if args.gc_experiment else 0])  # fmt: skip
        tasks = tmp / "tasks.jsonl"
        write_tasks(tasks, n_max)
        with reference_agent(0, 0, tmp / "requests.jsonl", log_path=tmp / "agent.log") as agent:
            # A small first run creates the Prefect database; not measured.
            run_collect(agent, tasks, tmp / "out" / "warm.jsonl", n=50, parallel=8,
                        chunk_size=50, prefect_home=home, work_dir=work,
                        extra=["+limit=50"], log_path=tmp / "warm.log")  # fmt: skip
            for n in args.ns:
                load = gate.wait(f"ours N={n}")
                t = run_collect(agent, tasks, tmp / "out" / f"ours-{n}.jsonl", n=n,
                                parallel=args.parallel, chunk_size=args.chunk_size,
                                prefect_home=home, work_dir=work, extra=[f"+limit={n}"],
                                log_path=tmp / f"ours-{n}.log")  # fmt: skip
                assert t.rollouts_written == n, t
                runs.append({"client": "rollouts collect (ours)", "n": n,
                             "loop_s": round(t.collection_s, 3),
                             "loop_rps": round(n / t.collection_s, 1),
                             "total_s": round(t.total_s, 3), "total_rps": round(n / t.total_s, 1),
                             "peak_rss_mb": round(t.hwm_cli_mb, 1),
                             "maxrss_wait4_mb": round(t.maxrss_wait4_mb, 1),
                             "cpu_s": round(t.cpu_cli_s, 2),
                             "cpu_loop_s": round(t.cpu_cli_collection_s, 2),
                             "cpu_ms_per_rollout": round(1000 * t.cpu_cli_collection_s / n, 3),
                             "server_cpu_loop_s": round(t.cpu_children_collection_s, 2),
                             "detail": t.as_dict(), "load": load})  # fmt: skip
                for client in ("httpx-aiohttp", "aiohttp"):
                    load = gate.wait(f"{client} N={n}")
                    r = run_bare(client, agent.url, tasks, n, args.parallel, tmp)
                    runs.append(r | {"client": f"bare {client}", "load": load})
            if args.profile:
                gate.wait("profile")
                profile = profile_run(agent, tasks, args.profile_n, args.parallel,
                                      args.chunk_size, tmp, args.profile_rate,
                                      args.profile_window_s)  # fmt: skip
            gc_runs = (gc_experiment(agent, tasks, args.gc_n, args.parallel, args.chunk_size,
                                     tmp, gate) if args.gc_experiment else [])  # fmt: skip
            if args.keep:
                print(f"profile and logs in {tmp}")

    print()
    print(f"zero-latency agent, C = {args.parallel}, chunk_size {args.chunk_size}; "
          "ours: 'loop' = collection phase (first request -> last rollout written)")  # fmt: skip
    table = print_table(
        ["client", "N", "loop s", "loop rollouts/s", "total s", "total rollouts/s",
         "client CPU ms/rollout (loop)", "Prefect server CPU s (loop)", "peak RSS MB", "load"],
        [[r["client"], r["n"], r["loop_s"], r["loop_rps"], r["total_s"], r["total_rps"],
          r["cpu_ms_per_rollout"], r["server_cpu_loop_s"], r["peak_rss_mb"],
          r["load"]["load_1m"]] for r in runs],
    )  # fmt: skip
    print()
    ours = [r for r in runs if r["client"].startswith("rollouts")]
    rss_table = print_table(
        ["N", "CLI peak RSS MB (VmHWM)", "temporary Prefect server MB", "wait4 maxrss MB"],
        [[r["n"], r["peak_rss_mb"],
          max(r["detail"]["hwm_children_mb"].values(), default=0.0), r["maxrss_wait4_mb"]]
         for r in ours],
    )  # fmt: skip
    ratios = []
    for n in args.ns:
        by = {r["client"]: r for r in runs if r["n"] == n}
        o, h, a = by["rollouts collect (ours)"], by["bare httpx-aiohttp"], by["bare aiohttp"]
        ratios.append({"n": n, "ours_loop_over_httpx_loop": round(o["loop_rps"] / h["loop_rps"], 3),
                       "ours_loop_over_aiohttp_loop": round(o["loop_rps"] / a["loop_rps"], 3),
                       "ours_total_over_httpx_total": round(o["total_rps"] / h["total_rps"], 3)})  # fmt: skip
    print()
    ratio_table = print_table(
        ["N", "ours / bare httpx (loop)", "ours / bare aiohttp (loop)", "ours / bare httpx (total)"],
        [[r["n"], r["ours_loop_over_httpx_loop"], r["ours_loop_over_aiohttp_loop"],
          r["ours_total_over_httpx_total"]] for r in ratios],
    )  # fmt: skip
    tables = {"rates": table, "rss": rss_table, "ratios": ratio_table}
    if profile and "gil" in profile:
        p = profile["gil"]
        lw = profile["loopwatch"] or {}
        print(f"\nprofile: CLI, N = {profile['n']:,}, {profile['window_s']:g} s of collection, "
              f"{p['samples']:,} samples with the GIL held at {profile['rate_hz']} Hz; "
              f"this run: {profile['collection_rps']:,.0f} rollouts/s")  # fmt: skip
        print(f"GC during the collection: {lw.get('gc_ms', 0):,.0f} ms = "
              f"{100 * lw.get('gc_share', 0):.1f}% of {lw.get('window_s', 0):.1f} s; "
              f"{lw.get('gc')}; loop stalls > 50 ms: {lw.get('stalls_over_50ms')} "
              f"(longest {lw.get('stall_max_ms')} ms)")  # fmt: skip
        tables["profile_threads"] = print_table(["thread", "samples", "%"], p["threads"])
        print()
        tables["profile_categories"] = print_table(["where (innermost match)", "samples", "%"],
                                                   p["categories"])  # fmt: skip
        print()
        tables["profile_inclusive"] = print_table(["inclusive", "samples", "%"], p["inclusive"])
        print()
        tables["profile_leaf"] = print_table(["leaf function | source line", "samples", "%"],
                                             p["top_leaf"][:20])  # fmt: skip
    elif profile:
        print(f"\nprofile: {profile}")
    if gc_runs:
        print()
        tables["gc_experiment"] = print_table(
            ["variant", "N", "collection s", "rollouts/s", "CLI CPU ms/rollout", "GC ms", "GC share",
             "gen2 passes", "longest gen2 ms", "stalls > 50 ms", "load"],
            [[r["variant"], r["n"], r["collection_s"], r["collection_rps"], r["cpu_ms_per_rollout"],
              r["gc_ms"], f"{100 * (r['gc_share'] or 0):.1f}%", r["gc"][2]["passes"],
              r["gc"][2]["longest_ms"], r["stalls_over_50ms"], r["load"]["load_1m"]]
             for r in gc_runs],
        )  # fmt: skip
    write_json("overhead", {"machine": machine(), "args": vars(args) | {"json": None},
                            "runs": runs, "ratios": ratios, "profile": profile,
                            "gc_experiment": gc_runs,
                            "tables": tables, "load_gate": gate.log}, args.json)  # fmt: skip


if __name__ == "__main__":
    main()
