"""What we rely on inside other libraries, beyond their public APIs: each test names the
library, the private part and the module of ours that uses it, and fails on an upgrade that
moves it, before a run misbehaves quietly.

* httpx: ``AsyncClient._cookies`` (rollouts/agent_client.py: no cookie parsing per answer) and
  ``Response._content`` (rollouts/aiohttp_transport.py: the body as read, with no decoder);
* Prefect: ``TaskRunContext.__var__`` (flows/ui.py ``own_run_context``: a subflow's artifacts
  and logs on its own run);
* coolname: its bundled word lists and config layout (flows/ui.py ``is_generated_run_name``:
  the names the Prefect server makes up);
* dask-jobqueue: the SIGINT handler its runner module installs when imported
  (flows/dask_runner.py ``import_dask_jobqueue`` keeps it out).
"""

from __future__ import annotations

import asyncio
import contextvars
from pathlib import Path

import httpx
import pytest

from flows.ui import _generated_name_words, is_generated_run_name, own_run_context
from rollouts.agent_client import AgentClient, RetryPolicy, _NoCookies

pytestmark = pytest.mark.fast  # no server, no processes: `make test-fast`

URL = "http://agent.test/run"


def _sets_a_cookie(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, headers={"set-cookie": "session=1; Path=/"}, content=b"{}")


def test_httpx_keeps_the_client_cookie_store_in_its_private_cookies() -> None:
    # Unreplaced, the store fills: the test below would see a cookie if the replacement missed.
    async def plain() -> httpx.Cookies:
        async with httpx.AsyncClient(transport=httpx.MockTransport(_sets_a_cookie)) as http:
            assert isinstance(getattr(http, "_cookies", None), httpx.Cookies), (
                f"httpx {httpx.__version__}: AsyncClient no longer keeps its cookie store in "
                "`_cookies`; rollouts/agent_client.py replaces it with _NoCookies"
            )
            await http.post(URL, content=b"{}")
            return http.cookies

    assert dict(asyncio.run(plain())) == {"session": "1"}

    async def agent_client() -> httpx.Cookies:
        client = AgentClient(
            RetryPolicy(max_attempts=1), 1, transport=httpx.MockTransport(_sets_a_cookie)
        )
        try:
            outcome = await client.run(URL, b"{}")
            assert outcome.kind == "ok", outcome
            return client._http.cookies
        finally:
            await client.aclose()

    cookies = asyncio.run(agent_client())
    assert isinstance(cookies, _NoCookies) and not cookies, (
        f"httpx {httpx.__version__}: the agent client's `AsyncClient._cookies = _NoCookies()` "
        f"no longer takes (the client's store is {type(cookies).__name__}, holding "
        f"{dict(cookies)}): httpx moved its cookie store (rollouts/agent_client.py)"
    )


def test_httpx_reads_a_response_body_from_its_private_content() -> None:
    response = httpx.Response(200, stream=httpx.ByteStream(b'{"a": 1}'))
    response._content = b'{"a": 1}'  # as rollouts/aiohttp_transport.py hands over a read body
    try:
        body = response.content
    except httpx.ResponseNotRead:
        body = None
    assert body == b'{"a": 1}' and response.json() == {"a": 1}, (
        f"httpx {httpx.__version__}: Response no longer reads its body from `_content`; "
        "rollouts/aiohttp_transport.py sets it to skip the decoder chain"
    )


def test_prefect_keeps_the_task_run_context_in_its_contextvar() -> None:
    import prefect
    from prefect.context import TaskRunContext, get_run_context
    from prefect.exceptions import MissingContextError

    var = getattr(TaskRunContext, "__var__", None)
    assert isinstance(var, contextvars.ContextVar), (
        f"Prefect {prefect.__version__}: TaskRunContext no longer holds its ContextVar in "
        "`__var__`; flows/ui.py own_run_context sets it to None to hide the calling task's run"
    )
    calling_task = object()  # stands for the TaskRunContext of the task calling a subflow
    token = var.set(calling_task)
    try:
        assert TaskRunContext.get() is calling_task, (
            f"Prefect {prefect.__version__}: TaskRunContext.get() no longer reads `__var__` "
            "(flows/ui.py own_run_context)"
        )
        with own_run_context():
            assert TaskRunContext.get() is None
            with pytest.raises(MissingContextError):  # no task run seen, and no flow run here
                get_run_context()
        assert TaskRunContext.get() is calling_task  # restored after the flow's body
    finally:
        var.reset(token)


def test_coolname_word_lists_tell_prefect_made_up_run_names() -> None:
    import coolname
    from coolname.loader import load_config
    from prefect.utilities.names import generate_slug

    data = Path(coolname.__file__).parent / "data"
    assert (data / "config.json").is_file(), (
        f"coolname: no word lists in {data}; flows/ui.py reads them to tell the run names "
        "the Prefect server makes up"
    )
    two_words = load_config(data).get("an", {})
    lists = two_words.get("lists")
    assert two_words.get("type") == "cartesian" and isinstance(lists, list) and len(lists) == 2, (
        f"coolname: its config's 'an' (adjective, subject: generate(2)) is now {two_words!r}; "
        "flows/ui.py _generated_name_words reads its two lists"
    )
    adjectives, subjects = _generated_name_words()
    assert len(adjectives) > 100 and len(subjects) > 100
    missed = [s for s in (generate_slug(2) for _ in range(500)) if not is_generated_run_name(s)]
    assert missed == [], (
        f"coolname: names Prefect makes up that flows/ui.py takes for given ones: {missed[:5]}"
    )


_SIGINT_AFTER_IMPORT = """
import signal, sys, threading
before = signal.getsignal(signal.SIGINT)
{how}
print(signal.getsignal(signal.SIGINT) is before)
"""


def _sigint_kept(*hows: str) -> list[bool]:
    """For each snippet, in its own interpreter (at once: each imports dask for seconds),
    whether the SIGINT handler is still Python's afterwards."""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", _SIGINT_AFTER_IMPORT.format(how=how)],
                              stdout=subprocess.PIPE, text=True) for how in hows]  # fmt: skip
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return [out.strip().splitlines()[-1] == "True" for out in outs]


def test_dask_jobqueue_installs_a_sigint_handler_at_import_which_we_keep_out() -> None:
    import dask_jobqueue

    plain, guarded = _sigint_kept(
        "import dask_jobqueue",
        # Through the guard, from a thread other than the main one, as a multi run's subflow
        # does (a plain import there raises: signal only works in the main thread).
        "from flows.dask_runner import import_dask_jobqueue\n"
        "t = threading.Thread(target=import_dask_jobqueue); t.start(); t.join()\n"
        "import dask_jobqueue",
    )
    # Plain import: its handler (sys.exit) replaces Python's KeyboardInterrupt, and so our
    # graceful Ctrl-C. If this starts passing, the guard has nothing left to guard.
    assert not plain, (
        f"dask-jobqueue {dask_jobqueue.__version__} no longer installs a SIGINT handler when "
        "imported: flows/dask_runner.py import_dask_jobqueue can go"
    )
    assert guarded
