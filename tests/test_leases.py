"""The lease object of rollouts/leases.py, on a real S3-compatible server on 127.0.0.1 (moto's,
tests/s3_server.py: conditional writes) and on a local directory (LocalFileSystem: the path
without them).

A second taker is refused naming the holder and the lease; a release lets the next one in; an
expired lease (its holder died: taken and never renewed) is taken over, by exactly one of two
concurrent takers; a held lease outlives several TTLs; one stolen or deleted underneath its
holder is signalled lost; the secret of the storage options is in no lease and no message.
TTLs are of a second or less, so the whole file takes seconds.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from s3_server import S3Server

from rollouts import leases
from rollouts.errors import InputError, RunLocked
from rollouts.leases import (
    BOOT,
    Lease,
    LeaseLost,
    LeaseRecord,
    acquire,
    held,
    holder_of,
    read_lease,
)
from rollouts.storage import filesystem

SECRET = "lease-secret-7f3a9c"


@dataclass
class Store:
    kind: str
    new_url: Callable[[], str]
    options: dict[str, Any]

    def write(self, url: str, data: bytes) -> None:
        """Someone else's plain write (no condition)."""
        fs, path = filesystem(url, self.options)
        if self.kind == "local":
            fs.makedirs(fs._parent(path), exist_ok=True)
        fs.pipe_file(path, data)

    def read(self, url: str) -> bytes:
        fs, path = filesystem(url, self.options)
        return bytes(fs.cat_file(path))

    def delete(self, url: str) -> None:
        fs, path = filesystem(url, self.options)
        fs.rm_file(path)


@pytest.fixture(
    # Not in the fast tier, local or not: they wait out TTLs of a second or two in real time.
    params=["s3", "local"],
)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "s3":
        server: S3Server = request.getfixturevalue("s3_server")
        bucket = server.bucket()
        return Store(
            "s3",
            lambda: f"s3://{bucket}/runs/.rollouts/{uuid.uuid4().hex[:8]}.lease",
            # s3fs's instance cache kept (one per thread): a new client costs ~0.2 s.
            {k: v for k, v in server.options(secret=SECRET).items() if k != "skip_instance_cache"},
        )
    return Store("local", lambda: str(tmp_path / "runs" / f"{uuid.uuid4().hex[:8]}.lease"), {})


def _dead(store: Store, url: str, holder: str = "deadhost:1", ttl_s: float = 0.2) -> Lease:
    """A holder that took the lease and died: never renewed, never released."""
    return acquire(url, holder, ttl_s, options=store.options)


def test_a_second_taker_is_refused_naming_the_holder_and_the_lease(store: Store) -> None:
    url = store.new_url()
    before = time.time()
    first = acquire(url, "hostA:101", 5, output="s3://b/out.jsonl", options=store.options)
    after = time.time()
    with pytest.raises(RunLocked) as e:
        acquire(url, "hostB:202", 5, output="s3://b/out.jsonl", options=store.options)
    message = str(e.value)
    assert "s3://b/out.jsonl is being collected by hostA:101 right now" in message
    assert f"(lease {url}," in message and "Two runs never write one output." in message
    assert "\n" not in message
    assert holder_of(url, options=store.options) == "hostA:101"
    record = read_lease(url, options=store.options)
    assert record is not None and record.holder == "hostA:101" and record.ttl_s == 5
    assert record.token == first.record.token and len(record.token) == 32
    assert before + 5 <= record.expires_at <= after + 5
    first.release()


def test_a_release_lets_the_next_taker_in(store: Store) -> None:
    url = store.new_url()
    first = acquire(url, "hostA:101", 5, options=store.options)
    first.release()
    first.release()  # idempotent
    assert holder_of(url, options=store.options) is None
    assert read_lease(url, options=store.options) is None
    second = acquire(url, "hostB:202", 5, options=store.options)
    assert holder_of(url, options=store.options) == "hostB:202"
    first.release()  # the first one's late release does not touch the second's lease
    assert holder_of(url, options=store.options) == "hostB:202"
    second.release()
    assert holder_of(url, options=store.options) is None


def test_an_expired_lease_is_taken_over_and_its_old_holder_learns_it(store: Store) -> None:
    url = store.new_url()
    dead = _dead(store, url, ttl_s=0.3)
    time.sleep(0.4)
    # Within the clock-skew margin it still counts as held.
    with pytest.raises(RunLocked, match="deadhost:1"):
        acquire(url, "hostB:202", 5, options=store.options, skew_s=5)
    assert holder_of(url, options=store.options, skew_s=5) == "deadhost:1"
    assert holder_of(url, options=store.options, skew_s=0) is None
    taker = acquire(url, "hostB:202", 5, options=store.options, skew_s=0)
    assert holder_of(url, options=store.options) == "hostB:202"
    # The old holder, back to life, finds its lease gone to another: it must stop.
    with pytest.raises(LeaseLost, match="taken by hostB:202"):
        dead.renew()
    assert dead.lost and "hostB:202" in (dead.lost_reason or "")
    dead.release()  # leaves the taker's lease alone
    assert holder_of(url, options=store.options) == "hostB:202"
    taker.renew()
    taker.release()


def test_an_unreadable_lease_counts_as_expired(store: Store) -> None:
    url = store.new_url()
    store.write(url, b'{"holder": "half-writ')
    assert holder_of(url, options=store.options) is None
    lease = acquire(url, "hostB:202", 5, options=store.options)
    assert holder_of(url, options=store.options) == "hostB:202"
    lease.release()


def _race(store: Store, url: str, names: list[str]) -> tuple[list[Lease], list[RunLocked]]:
    """``names`` take the lease at ``url`` at once, each in a thread: who won, who was refused."""
    won: list[Lease] = []
    refused: list[RunLocked] = []
    barrier = threading.Barrier(len(names))

    def take(name: str) -> None:
        holder_of(url, options=store.options)  # this thread's client, made before the race
        barrier.wait()
        try:
            won.append(acquire(url, name, 5, options=store.options, skew_s=0))
        except RunLocked as e:
            refused.append(e)

    threads = [threading.Thread(target=take, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return won, refused


@pytest.mark.parametrize("meeting", ["free", "at the takeover"])
def test_of_two_concurrent_takers_of_an_expired_lease_exactly_one_wins(
    store: Store, meeting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10 races each. "at the takeover": both takers have read the expired lease and decided
    to take it over before either writes (a barrier in front of the write), so every race
    is decided by the store's conditional write (locally: the rename aside)."""
    met: list[threading.Barrier] = []
    if meeting == "at the takeover":
        take_over = leases._take_over

        def meet_first(*args: Any) -> Any:
            met[-1].wait(timeout=10)
            return take_over(*args)

        monkeypatch.setattr(leases, "_take_over", meet_first)
    urls = [store.new_url() for _ in range(10)]
    for url in urls:
        _dead(store, url, ttl_s=0.2)
    time.sleep(0.3)
    for race, url in enumerate(urls):
        if meeting != "free":
            met.append(threading.Barrier(2))
        won, refused = _race(store, url, [f"taker1:{race}", f"taker2:{race}"])
        assert len(won) == 1 and len(refused) == 1, (race, won, refused)
        winner = won[0].holder
        assert f"is being collected by {winner} right now" in str(refused[0])
        assert holder_of(url, options=store.options) == winner
        won[0].renew()  # the winner's lease is intact
        won[0].release()


def test_a_held_lease_is_renewed_past_several_ttls(store: Store) -> None:
    url = store.new_url()

    async def main() -> Lease:
        async with held(url, "hostA:101", ttl_s=0.8, options=store.options) as lease:
            first_expiry = lease.expires_at
            for _ in range(5):  # 2.5 s: three TTLs
                await asyncio.sleep(0.5)
                with pytest.raises(RunLocked, match="hostA:101"):
                    await asyncio.to_thread(
                        acquire, url, "hostB:202", 5, options=store.options, skew_s=0
                    )
            assert not lease.lost and not lease.lost_event.is_set()
            assert lease.expires_at > first_expiry + 1.5
        return lease

    lease = asyncio.run(main())
    assert not lease.lost
    assert holder_of(url, options=store.options, skew_s=0) is None  # released on exit
    assert read_lease(url, options=store.options) is None


@pytest.mark.parametrize("how", ["stolen", "deleted"])
def test_a_lease_stolen_or_deleted_underneath_its_holder_is_signalled_lost(
    store: Store, how: str
) -> None:
    url = store.new_url()
    thief = LeaseRecord("thief:9", "2026-01-01T00:00:00+00:00", time.time() + 60, 60, "f" * 32)
    calls: list[str] = []

    async def main() -> Lease:
        async with held(url, "hostA:101", ttl_s=0.9, options=store.options,
                        on_lost=calls.append) as lease:  # fmt: skip
            await asyncio.sleep(0.1)
            if how == "stolen":
                await asyncio.to_thread(store.write, url, thief.to_bytes())
            else:
                await asyncio.to_thread(store.delete, url)
            await asyncio.wait_for(lease.lost_event.wait(), timeout=3)
        return lease

    lease = asyncio.run(main())
    assert lease.lost and calls == [lease.lost_reason]
    reason = lease.lost_reason or ""
    assert ("taken by thief:9" if how == "stolen" else "deleted underneath") in reason
    with pytest.raises(LeaseLost):
        lease.check()
    if how == "stolen":  # the holder's release on exit left the thief's lease alone
        assert holder_of(url, options=store.options) == "thief:9"


def test_an_unreachable_store_past_the_expiry_is_signalled_lost(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = store.new_url()

    async def main() -> Lease:
        async with held(url, "hostA:101", ttl_s=0.6, options=store.options) as lease:

            def unreachable(self: Lease) -> None:
                raise ConnectionError("the storage endpoint does not answer")

            monkeypatch.setattr(Lease, "renew", unreachable)
            await asyncio.wait_for(lease.lost_event.wait(), timeout=3)
            monkeypatch.undo()
        return lease

    lease = asyncio.run(main())
    assert "could not be renewed before it expired" in (lease.lost_reason or "")
    assert "does not answer" in (lease.lost_reason or "")


def test_a_write_that_landed_without_its_answer_is_told_from_a_theft(store: Store) -> None:
    """On S3 a renewal whose response was lost leaves the holder an old ETag: its next
    renewal and its release are refused by If-Match, and the token says the lease is still
    its own."""
    url = store.new_url()
    lease = acquire(url, "hostA:101", 5, options=store.options)
    lease._etag = '"0123456789abcdef0123456789abcdef"'
    lease.renew()
    assert not lease.lost and holder_of(url, options=store.options) == "hostA:101"
    lease._etag = '"0123456789abcdef0123456789abcdef"'
    lease.release()
    assert read_lease(url, options=store.options) is None


def test_a_run_cancelled_while_it_takes_the_lease_leaves_none(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = store.new_url()
    real = leases.acquire

    def slow(*args: Any, **kwargs: Any) -> Lease:
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(leases, "acquire", slow)

    async def main() -> None:
        async def run() -> None:
            async with held(url, "hostA:101", ttl_s=5, options=store.options):
                raise AssertionError("cancelled before it held the lease")

        task = asyncio.create_task(run())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())  # the thread that takes the lease after the cancel releases it
    deadline = time.monotonic() + 5
    while read_lease(url, options=store.options) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert read_lease(url, options=store.options) is None


def test_the_storage_secret_is_in_no_lease_and_no_message(store: Store) -> None:
    url = store.new_url()
    lease = acquire(url, "hostA:101", 5, options=store.options)
    texts = [store.read(url).decode(), repr(lease), str(lease.record)]
    with pytest.raises(RunLocked) as refused:
        acquire(url, "hostB:202", 5, options=store.options)
    texts.append(str(refused.value))
    store.write(url, LeaseRecord("thief:9", "x", time.time() + 60, 60, "e" * 32).to_bytes())
    with pytest.raises(LeaseLost) as lost:
        lease.renew()
    texts += [str(lost.value), lease.lost_reason or ""]
    with pytest.raises(TypeError, match="credentials"):
        pickle.dumps(lease)
    if store.kind == "s3":  # a missing bucket: one line naming the URL
        missing = f"s3://no-such-{uuid.uuid4().hex[:8]}/runs/x.lease"
        with pytest.raises(InputError) as e:
            acquire(missing, "hostA:101", 5, options=store.options)
        assert "does not exist" in str(e.value) and missing in str(e.value)
        texts.append(str(e.value))
        assert SECRET in str(store.options)  # the options did carry it
    for text in texts:
        assert SECRET not in text, text


@pytest.mark.fast
def test_a_lease_record_round_trips_and_a_bad_ttl_is_refused(tmp_path: Path) -> None:
    record = LeaseRecord("h:1", "2026-12-03T19:00:00+00:00", 1.5, 60.0, "a" * 32)
    assert LeaseRecord.parse(record.to_bytes()) == record
    assert LeaseRecord.parse(b"[]") is None and LeaseRecord.parse(b"{") is None
    never = record.to_bytes().replace(b"1.5", b"Infinity")
    assert b"Infinity" in never and LeaseRecord.parse(never) is None
    with pytest.raises(ValueError, match="ttl_s"):
        acquire(str(tmp_path / "x.lease"), "h:1", 0)
    assert leases.DEFAULT_TTL_S == 60


@pytest.mark.fast
def test_a_store_without_conditional_writes_takes_the_same_steps() -> None:
    """memory:// (fsspec's generic create-only and move): taken, refused, renewed, released,
    taken over when expired. Not exact between concurrent takers (see the module)."""
    url = f"memory://leases/{uuid.uuid4().hex[:8]}.lease"
    first = acquire(url, "hostA:101", 5, options={})
    with pytest.raises(RunLocked, match="hostA:101"):
        acquire(url, "hostB:202", 5, options={})
    first.renew()
    first.release()
    dead = acquire(url, "deadhost:1", 0.1, options={})
    time.sleep(0.15)
    taker = acquire(url, "hostB:202", 5, options={}, skew_s=0)
    assert holder_of(url, options={}) == "hostB:202"
    with pytest.raises(LeaseLost, match="hostB:202"):
        dead.renew()
    taker.release()
    assert holder_of(url, options={}) is None


def test_a_lease_of_a_process_of_this_machine_that_is_gone_is_taken_at_once(
    store: Store,
) -> None:
    """`kill -9`, then the same command at once: it need not wait out the lease. A lease of
    another machine (or of this one before a reboot) still waits for its expiry."""
    import socket
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid no longer runs
    here = f"{socket.gethostname()}:{gone.pid}"
    later = time.time() + 60
    url = store.new_url()
    store.write(url, LeaseRecord(here, "x", later, 60.0, "a" * 32, BOOT).to_bytes())
    lease = acquire(url, "hostA:101", ttl_s=60, options=store.options)
    assert lease.holder == "hostA:101"
    lease.release()

    for holder, boot in ((here, "another boot"), (f"elsewhere:{gone.pid}", BOOT)):
        url = store.new_url()
        store.write(url, LeaseRecord(holder, "x", later, 60.0, "b" * 32, boot).to_bytes())
        with pytest.raises(RunLocked, match=f"being collected by {holder} right now"):
            acquire(url, "hostA:101", ttl_s=60, options=store.options)
