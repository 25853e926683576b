"""A bare collection loop, the reference point of bench/overhead.py (not a benchmark itself).

    python bench/_bare_client.py --client httpx-aiohttp|httpx-ours|aiohttp --url URL --tasks T.jsonl
        --n N --parallel C --out OUT.jsonl

The same work per rollout as the collector's hot path, and nothing else: read a task row, build
the /run body (row + _ng_task_index, _ng_rollout_index, agent_ref), orjson it, POST it with at
most C in flight (asyncio.Semaphore), parse the answer, append it as one line to a file.
Prints one JSON object: the loop's own time (first request to last answer written).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import orjson


async def run(args: argparse.Namespace) -> dict[str, Any]:
    url = args.url.rstrip("/") + "/run"
    headers = {"content-type": "application/json"}
    if args.client == "aiohttp":
        import aiohttp

        session: Any = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=args.parallel), headers=headers
        )

        async def post(body: bytes) -> bytes:
            async with session.post(url, data=body) as resp:
                data = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                return data

    else:
        import httpx

        limits = httpx.Limits(max_connections=args.parallel,
                              max_keepalive_connections=args.parallel)  # fmt: skip
        transport: httpx.AsyncBaseTransport
        if args.client == "httpx-ours":  # the collector's own transport
            from rollouts.aiohttp_transport import AiohttpSessionTransport

            transport = AiohttpSessionTransport(args.parallel)
        else:
            from httpx_aiohttp import AiohttpTransport

            transport = AiohttpTransport(limits=limits, trust_env=False)
        session = httpx.AsyncClient(transport=transport, headers=headers, limits=limits,
                                    timeout=600)  # fmt: skip

        async def post(body: bytes) -> bytes:
            resp = await session.post(url, content=body)
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}")
            return resp.content

    sem = asyncio.Semaphore(args.parallel)
    out = open(args.out, "ab")
    tasks: set[asyncio.Task[None]] = set()
    errors = 0

    async def one(index: int, row: dict[str, Any]) -> None:
        nonlocal errors
        try:
            body = dict(row)
            body["_ng_task_index"] = index
            body["_ng_rollout_index"] = 0
            body["agent_ref"] = {"name": "bare"}
            answer = orjson.loads(await post(orjson.dumps(body)))
            out.write(orjson.dumps(answer) + b"\n")
            out.flush()
        except Exception:
            errors += 1
        finally:
            sem.release()

    t0 = time.perf_counter()
    start_ts = time.time()
    with open(args.tasks, "rb") as f:
        for index, line in enumerate(f):
            if index >= args.n:
                break
            await sem.acquire()
            t = asyncio.create_task(one(index, orjson.loads(line)))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
    await asyncio.gather(*list(tasks))
    loop_s = time.perf_counter() - t0
    out.close()
    if args.client == "aiohttp":
        await session.close()
    else:
        await session.aclose()
    return {"client": args.client, "n": args.n, "parallel": args.parallel, "loop_s": loop_s,
            "start_ts": start_ts, "rps": args.n / loop_s, "errors": errors}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--client", choices=["httpx-aiohttp", "httpx-ours", "aiohttp"], required=True)
    ap.add_argument("--url", required=True)
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--parallel", type=int, default=64)
    ap.add_argument("--out", required=True)
    result = asyncio.run(run(ap.parse_args()))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
