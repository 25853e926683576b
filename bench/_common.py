"""Shared helpers of the benchmark scripts (not a benchmark itself).

- a quiet-machine gate (1-minute load average below a threshold, bounded wait),
- the reference agent as a subprocess on 127.0.0.1 (URL parsed from its banner line),
- running a command as a subprocess while sampling the peak RSS (VmHWM) of it and of every
  descendant, with its exact rusage from wait4(),
- the real `rollouts collect` command line, in an isolated environment (PREFECT_HOME,
  ROLLOUTS_WORK_DIR and the working directory in a temp dir),
- machine description, table printing, JSON results.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
LOOPWATCH = ROOT / "bench" / "_loopwatch.py"


# ------------------------------------------------------------------------------------------
# Load gate
# ------------------------------------------------------------------------------------------


def loadavg() -> tuple[float, float, float]:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


@dataclass
class LoadGate:
    """Before each measurement wait until the 1-minute load is below ``threshold``.

    Each wait is at most ``max_wait_s``; all waits of one script together at most ``budget_s``,
    so a script stays bounded on a busy machine. What was seen is recorded with each figure.
    """

    threshold: float = 1.0
    max_wait_s: float = 180.0
    budget_s: float = 300.0
    spent_s: float = 0.0
    log: list[dict[str, Any]] = field(default_factory=list)

    def wait(self, label: str) -> dict[str, Any]:
        t0 = time.monotonic()
        limit = min(self.max_wait_s, max(0.0, self.budget_s - self.spent_s))
        first = loadavg()[0]
        while loadavg()[0] >= self.threshold and time.monotonic() - t0 < limit:
            time.sleep(2.0)
        waited = time.monotonic() - t0
        self.spent_s += waited
        load = loadavg()
        entry = {
            "measurement": label,
            "load_before_wait": first,
            "load_1m": load[0],
            "load_5m": load[1],
            "waited_s": round(waited, 1),
            "quiet": load[0] < self.threshold,
        }
        self.log.append(entry)
        flag = "" if entry["quiet"] else f"  (still >= {self.threshold}: measuring anyway)"
        print(f"  [{label}] load {load[0]:.2f} after waiting {waited:.0f}s{flag}", flush=True)
        return entry


def add_gate_args(ap: Any, budget_s: float = 300.0) -> None:
    ap.add_argument(
        "--load-threshold",
        type=float,
        default=1.0,
        help="wait for the 1-minute load average below this (%(default)s)",
    )
    ap.add_argument(
        "--max-wait-s",
        type=float,
        default=180.0,
        help="longest wait for a quiet machine before one measurement (%(default)s)",
    )
    ap.add_argument("--wait-budget-s", type=float, default=budget_s,
                    help="total waiting allowed in this script, to keep it bounded (%(default)s)")  # fmt: skip


def gate_from_args(args: Any) -> LoadGate:
    return LoadGate(args.load_threshold, args.max_wait_s, args.wait_budget_s)


# ------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
                out.extend(int(x) for x in text.split())
    return out


def _descendants(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(_children(p))
    return seen


def _status_kb(pid: int, key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def _cpu_s(pid: int, reaped_children: bool = False) -> float | None:
    """utime + stime of one process so far, from /proc/PID/stat; with ``reaped_children``
    also cutime + cstime (its children that ended and were waited for)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = fields[11:15] if reaped_children else fields[11:13]
        return sum(int(x) for x in ticks) / os.sysconf("SC_CLK_TCK")
    return None


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        text = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "prefect.server.api.server" in text:
            return "prefect temporary server (uvicorn)"
        return text[:120]
    return ""


@dataclass
class RunResult:
    cmd: list[str]
    returncode: int
    start_ts: float  # time.time() just before the process was created
    end_ts: float  # time.time() when its exit was seen
    wall_s: float
    hwm_main_mb: float  # VmHWM of the process itself, last sample before it exited
    hwm_children_mb: dict[str, float]  # VmHWM of each descendant seen (by command line)
    maxrss_wait4_mb: float  # ru_maxrss from wait4(): itself and its reaped descendants
    cpu_s: float  # user + sys of the process and its reaped descendants
    cpu_children_s: dict[str, float]  # CPU of each descendant, last sample before it ended
    # (time, CPU s of the process, CPU s of all its live descendants) every sample
    cpu_series: list[tuple[float, float, float]] = field(default_factory=list)
    stdout_path: Path | None = None

    def cpu_between(self, t0: float, t1: float) -> tuple[float, float]:
        """CPU seconds (process, descendants) spent between two epoch times (sampled)."""

        def at(t: float) -> tuple[float, float]:
            best = (0.0, 0.0)
            for ts, main, kids in self.cpu_series:
                if ts > t:
                    break
                best = (main, kids)
            return best

        a, b = at(t0), at(t1)
        return b[0] - a[0], b[1] - a[1]

    def tail(self, n: int = 30) -> str:
        if self.stdout_path is None or not self.stdout_path.exists():
            return ""
        return "\n".join(self.stdout_path.read_text(errors="replace").splitlines()[-n:])


def run_measured(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 600.0,
    log_path: Path | None = None,
    sample_every_s: float = 0.1,
    on_start: Any = None,
) -> RunResult:
    """Run ``cmd`` to its end; sample peak RSS of it and its descendants; exact wait4 rusage."""
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    start_ts = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    if on_start is not None:
        on_start(proc)
    hwm_main = 0
    hwm_children: dict[str, int] = {}
    cpu_children: dict[int, tuple[str, float]] = {}
    names: dict[int, str] = {}
    cpu_series: list[tuple[float, float, float]] = []
    next_sample = 0.0
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                end = time.perf_counter()
                end_ts = time.time()
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            now = time.perf_counter()
            if now >= next_sample:
                next_sample = now + sample_every_s
                hwm_main = max(hwm_main, _status_kb(proc.pid, "VmHWM") or 0)
                for child in _descendants(proc.pid)[1:]:
                    if child not in names:
                        name = _cmdline(child)  # empty for a zombie or a process still in exec
                        if not name:
                            continue
                        names[child] = name
                    name = names[child]
                    kb = _status_kb(child, "VmHWM") or 0
                    hwm_children[name] = max(hwm_children.get(name, 0), kb)
                    cpu = _cpu_s(child)
                    if cpu is not None:
                        cpu_children[child] = (name, cpu)
                kids = sum(c for _, c in cpu_children.values())
                cpu_series.append((time.time(), _cpu_s(proc.pid) or 0.0, kids))
            if now - t0 > timeout_s:
                kill_group(proc)
                raise TimeoutError(f"{cmd[:4]}... did not finish within {timeout_s}s")
            time.sleep(0.005)
    except BaseException:
        kill_group(proc)
        raise
    finally:
        if log_path:
            out.close()  # type: ignore[union-attr]
        # A child the command left running (it should not) is ours to stop.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    return RunResult(
        cmd=cmd,
        returncode=proc.returncode,
        start_ts=start_ts,
        end_ts=end_ts,
        wall_s=end - t0,
        hwm_main_mb=hwm_main / 1024,
        hwm_children_mb={k: v / 1024 for k, v in hwm_children.items()},
        maxrss_wait4_mb=usage.ru_maxrss / 1024,
        cpu_s=usage.ru_utime + usage.ru_stime,
        cpu_children_s=_sum_by_name(cpu_children.values()),
        cpu_series=cpu_series,
        stdout_path=log_path,
    )


def _sum_by_name(items: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in items:
        out[name] = out.get(name, 0.0) + value
    return out


def kill_group(proc: subprocess.Popen[Any], grace_s: float = 5.0) -> None:
    """Stop a process we started (and its process group, which it leads): TERM, then KILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ------------------------------------------------------------------------------------------
# Reference agent
# ------------------------------------------------------------------------------------------


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    url: str
    request_log: Path | None

    def log_offset(self) -> int:
        if self.request_log is None or not self.request_log.exists():
            return 0
        return self.request_log.stat().st_size

    def requests_since(self, offset: int) -> list[float]:
        """Receive times of the /run requests logged after byte ``offset``."""
        if self.request_log is None:
            return []
        import orjson

        with open(self.request_log, "rb") as f:
            f.seek(offset)
            return [orjson.loads(line)["time"] for line in f if line.endswith(b"\n")]


@contextlib.contextmanager
def reference_agent(
    latency_ms: float = 0.0,
    sigma: float = 0.0,
    request_log: Path | None = None,
    seed: int = 0,
    log_path: Path | None = None,
    extra: list[str] | None = None,
) -> Iterator[Agent]:
    """``python -m reference_agent --port 0`` on 127.0.0.1 (``extra``: more of its
    flags); stopped on exit."""
    cmd = [PY, "-m", "reference_agent", "--host", "127.0.0.1", "--port", "0",
           "--latency-ms", str(latency_ms), "--latency-sigma", str(sigma), "--seed", str(seed),
           *(extra or [])]  # fmt: skip
    if request_log is not None:
        cmd += ["--request-log", str(request_log)]
    err = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=base_env(),
                            start_new_session=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        url = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            if not line:
                break
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        if url is None:
            raise RuntimeError(f"reference agent did not start (exit {proc.poll()})")
        yield Agent(proc, url, request_log)
    finally:
        kill_group(proc)
        if log_path:
            err.close()  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------
# The CLI
# ------------------------------------------------------------------------------------------


def base_env() -> dict[str, str]:
    """This environment minus anything that would redirect Prefect or the collector."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "ROLLOUTS_"))}  # fmt: skip
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env


def cli_env(prefect_home: Path, work_dir: Path, api_url: str | None = None) -> dict[str, str]:
    env = base_env()
    env["PREFECT_HOME"] = str(prefect_home)
    env["ROLLOUTS_WORK_DIR"] = str(work_dir)
    # Prefect gives its temporary server 20 s to come up; a fresh database (migrations) on a
    # loaded 2-core machine can take longer, which would fail the run rather than slow it.
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def collect_cmd(agent_url: str, input_path: Path, output_path: Path, *, parallel: int,
                chunk_size: int, extra: list[str] | None = None) -> list[str]:  # fmt: skip
    return [PY, "-m", "rollouts_cli", "collect", f"+agent_url={agent_url}",
            f"+input_jsonl_fpath={input_path}", f"+output_jsonl_fpath={output_path}",
            f"+num_samples_in_parallel={parallel}", f"+chunk_size={chunk_size}",
            *(extra or [])]  # fmt: skip


def last_rollout_written(output_path: Path, work_dir: Path) -> tuple[float, int]:
    """(max mtime of the run's chunks/*.rollouts.jsonl, their total line count)."""
    from rollouts.run_state import run_dir_for

    run_dir = run_dir_for(output_path, work_dir)
    files = sorted((run_dir / "chunks").glob("*.rollouts.jsonl"))
    if not files:
        raise RuntimeError(f"no chunk outputs under {run_dir}")
    mtime = max(f.stat().st_mtime for f in files)
    lines = 0
    for f in files:
        with open(f, "rb") as fh:
            lines += sum(buf.count(b"\n") for buf in iter(lambda fh=fh: fh.read(1 << 20), b""))
    return mtime, lines


@dataclass
class CollectTiming:
    n: int
    returncode: int
    total_s: float
    startup_s: float  # command start -> first request received by the agent
    collection_s: float  # first request -> last rollout written to a chunk file
    after_s: float  # last rollout written -> process exit (merge, metrics, shutdown)
    requests: int
    rollouts_written: int
    hwm_cli_mb: float  # peak RSS of the CLI process itself (VmHWM)
    hwm_children_mb: dict[str, float]  # e.g. Prefect's temporary server
    maxrss_wait4_mb: float  # wait4 ru_maxrss: the largest of the CLI and its reaped children
    cpu_s: float  # CLI + reaped children
    cpu_cli_s: float  # the CLI process alone
    cpu_children_s: dict[str, float]
    cpu_cli_collection_s: float  # the CLI's CPU during the collection phase
    cpu_children_collection_s: float  # its descendants' (Prefect's temporary server) meanwhile
    loopwatch: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        def r(v: Any) -> Any:
            if isinstance(v, float):
                return round(v, 3)
            if isinstance(v, dict):
                return {k: r(x) for k, x in v.items()}
            return v

        return {k: r(v) for k, v in self.__dict__.items()}


def run_collect(agent: Agent, input_path: Path, output_path: Path, *, n: int, parallel: int,
                chunk_size: int, prefect_home: Path, work_dir: Path, api_url: str | None = None,
                log_path: Path | None = None, timeout_s: float = 600.0,
                extra: list[str] | None = None, loopwatch: Path | None = None,
                env_extra: dict[str, str] | None = None,
                on_start: Any = None) -> CollectTiming:  # fmt: skip
    """One real `rollouts collect` run, split into start-up / collection / after.

    With ``loopwatch`` the CLI runs under bench/_loopwatch.py (stall watchdog, GC timing),
    which writes there; its figures for the collection window land in ``.loopwatch``.
    """
    offset = agent.log_offset()
    cmd = collect_cmd(agent.url, input_path, output_path, parallel=parallel,
                      chunk_size=chunk_size, extra=extra)  # fmt: skip
    if loopwatch is not None:
        cmd = [PY, str(LOOPWATCH), str(loopwatch), *cmd[3:]]
    env = cli_env(prefect_home, work_dir, api_url) | (env_extra or {})
    res = run_measured(cmd, env=env, cwd=work_dir.parent, timeout_s=timeout_s,
                       log_path=log_path, on_start=on_start)  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"collect exited {res.returncode}:\n{res.tail()}")
    times = agent.requests_since(offset)
    if not times:
        raise RuntimeError("the agent logged no request")
    last_write, written = last_rollout_written(output_path, work_dir)
    first = min(times)
    return CollectTiming(
        n=n,
        returncode=res.returncode,
        total_s=res.wall_s,
        startup_s=first - res.start_ts,
        collection_s=last_write - first,
        after_s=res.end_ts - last_write,
        requests=len(times),
        rollouts_written=written,
        hwm_cli_mb=res.hwm_main_mb,
        hwm_children_mb=res.hwm_children_mb,
        maxrss_wait4_mb=res.maxrss_wait4_mb,
        cpu_s=res.cpu_s,
        cpu_cli_s=res.cpu_s - sum(res.cpu_children_s.values()),
        cpu_children_s=res.cpu_children_s,
        cpu_cli_collection_s=res.cpu_between(first, last_write)[0],
        cpu_children_collection_s=res.cpu_between(first, last_write)[1],
        loopwatch=read_loopwatch(loopwatch, first, last_write) if loopwatch else None,
    )


def read_loopwatch(path: Path, t0: float, t1: float) -> dict[str, Any]:
    """GC passes and event-loop stalls that fall in [t0, t1] (the collection window)."""
    import orjson

    gc_by_gen = [[0, 0.0, 0.0], [0, 0.0, 0.0], [0, 0.0, 0.0]]
    stalls: list[dict[str, Any]] = []
    freeze = None
    for line in path.read_bytes().splitlines():
        r = orjson.loads(line)
        if r["kind"] == "gc_buckets":
            for t, gens in r["buckets"]:
                if t0 <= t and t + r["bucket_s"] <= t1:  # buckets inside the window
                    for g in range(3):
                        gc_by_gen[g][0] += gens[g][0]
                        gc_by_gen[g][1] += gens[g][1]
                        gc_by_gen[g][2] = max(gc_by_gen[g][2], gens[g][2])
        elif r["kind"] == "stall" and t0 <= r["time"] <= t1:
            stalls.append(r)
        elif r["kind"] == "freeze":
            freeze = r
    window = max(t1 - t0, 1e-9)
    gc_ms = sum(g[1] for g in gc_by_gen)
    top: dict[str, float] = {}
    for st in stalls:
        if st["stacks"]:
            where = st["stacks"][0][1].strip().splitlines()[-1].split("/site-packages/")[-1]
            top[where] = top.get(where, 0.0) + st["ms"]
    return {
        "window_s": round(window, 3),
        "gc": [{"generation": g, "passes": int(c), "ms": round(ms, 1), "longest_ms": round(mx, 1)}
               for g, (c, ms, mx) in enumerate(gc_by_gen)],
        "gc_ms": round(gc_ms, 1),
        "gc_share": round(gc_ms / 1000 / window, 4),
        "stalls_over_50ms": len(stalls),
        "stall_ms": round(sum(st["ms"] for st in stalls), 1),
        "stall_max_ms": round(max((st["ms"] for st in stalls), default=0.0), 1),
        "stall_top_frames": sorted(([k, round(v, 1)] for k, v in top.items()),
                                   key=lambda kv: -kv[1])[:5],
        "freeze": freeze,
    }  # fmt: skip


@contextlib.contextmanager
def prefect_server(home: Path, port: int = 0, log_path: Path | None = None) -> Iterator[str]:
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME; yields the API URL."""
    import socket

    import httpx

    if port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    env = base_env()
    env["PREFECT_HOME"] = str(home)
    prefect = str(Path(PY).with_name("prefect"))
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("prefect server not healthy within 90 s")
            time.sleep(0.5)
        yield url
    finally:
        kill_group(proc, grace_s=10)
        if log_path:
            out.close()  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------
# Temp dirs, machine, output
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def bench_dir(prefix: str, keep: bool, base: Path | None = None) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=f"rollouts-{prefix}-", dir=base))
    try:
        yield d
    finally:
        if keep:
            print(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    versions = {}
    for pkg in ("prefect", "httpx", "httpx-aiohttp", "aiohttp", "orjson", "pandas", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    import hashlib

    code = {}
    for rel in ("rollouts/agent_client.py", "rollouts/collect.py", "rollouts/dispatchers.py",
                "rollouts/split.py", "rollouts/merge.py", "rollouts/metrics.py", "rollouts/mix.py",
                "rollouts/fileio.py", "rollouts_cli/main.py", "flows/collect.py", "tasks/collect.py"):  # fmt: skip
        with contextlib.suppress(OSError):
            p = ROOT / rel
            code[rel] = {"sha256": hashlib.sha256(p.read_bytes()).hexdigest()[:12],
                         "mtime": time.strftime("%Y-%m-%d %H:%M:%S",
                                                time.gmtime(p.stat().st_mtime))}  # fmt: skip
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "code": code,
        "nproc": os.cpu_count(),
        "mem_gb": round(mem_kb / 1024 / 1024, 1),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "packages": versions,
    }


def print_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
             "-|-".join("-" * w for w in widths)]  # fmt: skip
    for raw, r in zip(rows, cells, strict=True):
        lines.append(" | ".join(c.ljust(w) if isinstance(v, str) else c.rjust(w)
                                for v, c, w in zip(raw, r, widths, strict=True)))  # fmt: skip
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def write_json(name: str, obj: dict[str, Any], path: Path | None = None) -> Path:
    path = path or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path
