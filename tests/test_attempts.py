"""One observer of every attempt: a chunk collected through an injected transport is counted once,
and the health file, the replicas file, the run's latency and the stopper's margin all read that
one account. No processes, no Prefect."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from rollouts.agent_client import RetryPolicy, resolve_agent_urls
from rollouts.collect import Dispatcher, DispatchPlan, collect_chunk
from rollouts.health import read_published, read_run_latency
from rollouts.models import ChunkSpec, CollectConfig
from rollouts.replicas import ReplicaRouter
from rollouts.settings import RolloutsSettings
from rollouts.split import split_input
from rollouts.stopping import StopPlan

pytestmark = pytest.mark.fast

A, B = "http://a.test:1", "http://b.test:2"
FAST = RetryPolicy(max_attempts=5, backoff_base_s=0.001, backoff_max_s=0.001)


async def never_back(url: str) -> str | None:
    return "connection refused"


def one_chunk(tmp_path: Path, rows: int) -> tuple[Path, list[ChunkSpec]]:
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"".join(
        orjson.dumps({"responses_create_params": {"input": f"q{i}"}}) + b"\n" for i in range(rows)
    ))  # fmt: skip
    run_dir = tmp_path / "run"
    return run_dir, split_input(inp, run_dir, run_id="r", chunk_size=rows).chunks


def test_a_chunk_through_an_injected_transport_is_counted_once_and_read_everywhere(
    tmp_path: Path,
) -> None:
    def agent(request: httpx.Request) -> httpx.Response:
        if request.url.host == "b.test":
            raise httpx.ConnectError("connection refused")
        return httpx.Response(200, content=b'{"reward": 1.0}')

    run_dir, (spec,) = one_chunk(tmp_path, 40)
    router = ReplicaRouter({"calc": [A, B]}, eject_after=2, probe=never_back)
    plan = DispatchPlan(agent_urls={"calc": A}, agent_name="calc")
    stop_plan = StopPlan.starting_now(None, None, 10.0)

    async def go() -> tuple[int, float]:
        dispatcher = Dispatcher(FAST, 4, None, None, replicas=router,
                                transport=httpx.MockTransport(agent))  # fmt: skip
        result = await collect_chunk(spec, plan, dispatcher, stop_plan)
        margin = dispatcher.stop.drain_margin_s()
        await dispatcher.aclose()
        return result.succeeded, margin

    succeeded, margin = asyncio.run(go())
    assert succeeded == 40
    assert margin > 0  # the stopper's margin: the p90 of the rollouts the observer timed
    a, b = router._groups["calc"].replicas
    assert a.answered == 40 and b.ejected and b.failed == {"connection_error": b.sent}
    # One file of one account: the health file holds the replicas' counts and state too.
    (health,) = (orjson.loads(p.read_bytes()) for p in run_dir.glob("health.*.json"))
    assert health["closed"] and health["worker"]
    counts = {t["url"]: (t["sent"], t["answered"], t["failures"], t["replica"], t["ejected"],
                         t["ejections"]) for t in health["targets"]}  # fmt: skip
    assert counts == {r.url: (r.sent, r.answered, r.failed, True, r.ejected, r.ejections)
                      for r in (a, b)}  # fmt: skip
    published = read_published(run_dir, running=False)
    assert published.health is None  # nothing collects now
    assert [(r.url, r.sent, r.answered, r.failed, r.ejections) for r in published.replicas] == [
        (r.url, r.sent, r.answered, r.failed, r.ejections) for r in (a, b)
    ]
    latency = read_run_latency(run_dir, stop_plan.started_at)
    assert latency is not None and latency.answered == 40 and latency.failed_attempts == b.sent
    # read, and kept for status after the run: the replicas' counts are still there
    assert len(list(run_dir.glob("health.*.json"))) == 1
    assert read_published(run_dir, running=False).replicas == published.replicas


def test_agent_names_resolve_through_the_http_client_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    asked: list[str] = []

    def head_server(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        config = {"calc": {"responses_api_agents": {"simple": {"host": "h", "port": 7}}}}
        return httpx.Response(200, json=yaml.safe_dump(config))  # a JSON string of YAML

    monkeypatch.setenv("ROLLOUTS_HEAD_SERVER_URL", "http://head.test:9")
    config = CollectConfig(input_jsonl_fpath=str(tmp_path / "in.jsonl"),
                           output_jsonl_fpath=str(tmp_path / "out.jsonl"), agent_name="calc")  # fmt: skip
    with httpx.Client(transport=httpx.MockTransport(head_server)) as http:
        urls = resolve_agent_urls(["calc"], RolloutsSettings(), http)
        plan = DispatchPlan.for_run(config, [], RolloutsSettings(), http)  # a run's plan
    assert urls == plan.agent_urls == {"calc": "http://h:7"}
    assert asked == ["http://head.test:9/global_config_dict_yaml"] * 2
