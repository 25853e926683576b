"""A lease object on any fsspec store: the lock that keeps two runs off one output when the
output (or its run state) is in a bucket, where flock does not exist.

The lease is one small JSON object (say ``s3://bucket/runs/.rollouts/out-1a2b3c4d.lease``)::

    {"holder": "host:pid", "started_at": "2026-12-03T19:20:00+00:00",
     "expires_at": 1796325660.5, "ttl_s": 60.0, "token": "<32 hex>"}

``holder`` is who runs (``run_state.worker_id()``), ``started_at`` when it took the lease (kept
across renewals), ``expires_at`` the wall clock (seconds since the epoch) until which it is
held unless renewed, ``token`` a random value of this holding that tells the holder its lease
from any other. Nothing else: never a storage option, never a credential (the URL is not
stored either, and messages show it redacted).

How the integrator uses it (``run_lock`` for an output or run state in a bucket; the lease
beside the run state as the lock file is today, e.g. ``<run dir URL>.lease``)::

    async with leases.held(lease_url, worker_id(), ttl_s=60, output=str(output)) as lease:
        # RunLocked (naming the holder and the lease URL) was raised here if another run
        # holds it; from now on a background task renews it every ttl_s / 3.
        ...  # the run; its stopper also watches ``lease.lost_event`` (or polls
             # ``lease.lost``): set when the lease was taken by someone else or could not
             # be renewed before it expired. ``lease.lost_reason`` says which, in one line;
             # ``lease.check()`` raises LeaseLost (a RunLocked) with it.
    # released (deleted, if it is still ours) on the way out, also on an exception.

The refusal reads like ``run_lock``'s: "OUTPUT is being collected by HOST:PID right now (lease
URL, held until ... unless renewed, N s from now); wait for it to finish or stop it. Two runs
never write one output." Storage errors are ``storage.storage_errors``'s one-line errors.
``holder_of(lease_url)`` is the probe of ``rollouts status``: the holder of an unexpired lease,
else None (exactly when ``acquire`` would refuse). ``acquire`` / ``Lease.renew`` /
``Lease.release`` are the same steps without asyncio (a synchronous caller renews by itself,
every ``ttl_s / 3``). A Lease is not picklable (it holds the filesystem and its credentials):
it stays in the process that took it, the flow run's; workers do not hold it.

The writes, by store:

* S3 (s3fs; AWS S3, and S3-compatible servers with conditional writes, moto included): taking
  a free lease is a create-only write (``If-None-Match: *``): of two, exactly one is created,
  the other sees FileExistsError. Taking over an expired lease, renewing and releasing are
  conditional on the ETag the taker read or the holder last wrote (``If-Match``): of two takers
  of one expired lease exactly one wins, the other is refused naming the winner; a holder
  whose lease was taken finds its renewal refused and signals the loss. A renewal whose
  response was lost (its write landed, its ETag unknown) is told from a theft by the token.
  A store that refuses a conditional delete is released by a plain delete after the token
  was checked. A store that silently ignores the conditions (some older S3-compatible
  servers) makes every write unconditional and the lease best effort, like the last case
  below: the shared-storage check is the place to refuse one (a second create-only write of
  a probe object must fail).
* A local path (LocalFileSystem): create-only is a hard link of a complete temporary file
  (atomic and exclusive: a reader never sees half a lease); a takeover moves the expired lease
  aside (an atomic rename: of two takers one moves it, the other finds it gone) and checks it
  moved the expired one (the token) before it creates its own, else it puts back what it moved;
  a renewal checks the token, then replaces the file atomically. Exact between two takers.
  The narrow race left: a renewal or a release checks the token and then writes; a taker
  that takes the lease in between (it can only when the lease expired, i.e. the holder did
  not renew for ttl_s + skew_s) is overwritten or deleted. The holder then keeps a lease it
  had lost, and the taker finds its lease gone or changed at its own next renewal, within
  ttl_s / 3, and signals the loss. (Locally, ``run_lock``'s flock stays the lock: this path
  serves the tests and a store mounted as a directory.)
* Any other fsspec store: the same steps as the local path, through fsspec: its create-only
  write (``pipe_file(mode="create")``) is exists-then-write unless the store implements it,
  and its move is copy-then-delete, so two takers can both believe they hold it until one of
  them renews (within ttl_s / 3). Best effort; prefer a store with conditional writes.

Clocks: expiry is the holder's wall clock plus ``ttl_s``, read against the reader's wall clock:
a lease counts as expired only ``skew_s`` (default 5 s) after its ``expires_at``, so clocks that
disagree by less than ``skew_s`` never let a taker in while the holder renews. A holder that
could not renew before its own ``expires_at`` (the store unreachable) signals the loss then,
``skew_s`` before anyone may take it. The store's clock (LastModified) is not used.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

from rollouts.errors import RunLocked
from rollouts.storage import filesystem, storage_errors
from rollouts.urls import redact

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

DEFAULT_TTL_S = 60.0
# How far past its expires_at a lease still counts as held: the clocks of two hosts may
# disagree by this much without letting a taker in while its holder renews.
DEFAULT_SKEW_S = 5.0
# A lease that cannot be parsed (a crash mid-write on a store whose writes are not atomic) is
# read again this many times, this far apart, before it counts as expired.
_UNREADABLE_TRIES = 5
_UNREADABLE_PAUSE_S = 0.05
# Attempts of acquire's read-decide-write loop (each lost race starts it again).
_ATTEMPTS = 8
# A renewal that finds no lease looks again once after this pause: on a store without
# conditional writes a competing taker moves it aside for a moment and puts it back.
_MISSING_PAUSE_S = 0.2

_log = logging.getLogger("rollouts.leases")

# The clock of expiry (seconds since the epoch); tests may replace it.
now = time.time


class LeaseLost(RunLocked):
    """The lease a run held was taken by another run, deleted, or not renewed in time: the
    run must stop writing."""


@dataclass(frozen=True)
class LeaseRecord:
    """One lease object as stored."""

    holder: str
    started_at: str
    expires_at: float
    ttl_s: float
    token: str
    # The holder's machine as booted (Linux's boot id; "" elsewhere): only a lease of this
    # machine's current boot may be taken over as soon as its process is gone.
    boot: str = ""

    def expired(self, skew_s: float = DEFAULT_SKEW_S) -> bool:
        return now() >= self.expires_at + skew_s

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"holder": self.holder, "started_at": self.started_at,
             "expires_at": self.expires_at, "ttl_s": self.ttl_s, "token": self.token,
             "boot": self.boot},
        ).encode()  # fmt: skip

    @classmethod
    def parse(cls, data: bytes) -> LeaseRecord | None:
        try:
            value = json.loads(data)
            record = cls(holder=str(value["holder"]), started_at=str(value["started_at"]),
                         expires_at=float(value["expires_at"]), ttl_s=float(value["ttl_s"]),
                         token=str(value["token"]), boot=str(value.get("boot", "")))  # fmt: skip
        except (ValueError, TypeError, KeyError):
            return None
        # NaN or infinity would never expire: such a lease is unreadable.
        return record if math.isfinite(record.expires_at) else None


# An unreadable lease: nobody's, expired long ago.
_UNREADABLE = LeaseRecord(holder="?", started_at="", expires_at=0.0, ttl_s=0.0, token="")


def _conditional(fs: AbstractFileSystem) -> bool:
    """Whether the store takes If-Match / If-None-Match on its writes (s3fs)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return any(p in ("s3", "s3a") for p in protocols)


def _is_local(fs: AbstractFileSystem) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _lost_race(error: BaseException) -> bool:
    """A conditional write refused: its precondition failed (412) or it met a concurrent
    conditional write (409, ConditionalRequestConflict: S3 asks to retry)."""
    seen: BaseException | None = error
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409") or status in (412, 409):  # fmt: skip
                return True
        seen = seen.__cause__ or seen.__context__
    text = str(error).lower()
    return isinstance(error, OSError) and (
        "pre-condition" in text or "precondition" in text or error.errno == errno.EBUSY
    )


def _refused(error: BaseException) -> bool:
    """The store does not take a conditional delete (an older S3-compatible server)."""
    text = str(error).lower()
    return isinstance(error, OSError) and not _lost_race(error) and (
        error.errno in (errno.EINVAL, errno.ENOTSUP, errno.ENOSYS) or "not implemented" in text
    )  # fmt: skip


def _etag(response: Any) -> str | None:
    if isinstance(response, dict):
        value = response.get("ETag")
        return str(value) if value else None
    return None


class Lease:
    """A lease this process holds (from ``acquire`` or ``held``). Not picklable: it holds the
    store's filesystem, whose pickle holds the credentials."""

    def __init__(self, url: str, fs: AbstractFileSystem, path: str, record: LeaseRecord,
                 etag: str | None, output: str | None) -> None:  # fmt: skip
        self.url = url
        self._fs = fs
        self._path = path
        self.record = record
        self._etag = etag
        self._output = output
        self._lost_reason: str | None = None
        self._released = False
        self._writing = threading.Lock()  # one renewal or release at a time
        # Set (on the event loop of ``held``) when the lease is lost; a stopper awaits it.
        self.lost_event = asyncio.Event()

    def __repr__(self) -> str:
        state = "lost" if self.lost else "released" if self._released else "held"
        return f"Lease({redact(self.url)!r}, holder={self.holder!r}, {state})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Lease is not pickled: it holds the store's credentials")

    @property
    def holder(self) -> str:
        return self.record.holder

    @property
    def expires_at(self) -> float:
        return self.record.expires_at

    @property
    def lost(self) -> bool:
        return self._lost_reason is not None

    @property
    def lost_reason(self) -> str | None:
        """One line: who took the lease, or why it could not be renewed."""
        return self._lost_reason

    def check(self) -> None:
        """LeaseLost when the lease was lost."""
        if self._lost_reason is not None:
            raise LeaseLost(self._lost_reason)

    def _lose(self, reason: str) -> None:
        if self._lost_reason is not None:
            return
        self._lost_reason = reason
        _log.error("%s", reason)

    def _taken(self, by: LeaseRecord | None) -> str:
        what = self._output or redact(self.url)
        if by is None:
            return (f"the lease on {what} was deleted underneath this run (lease "
                    f"{redact(self.url)}); another run may write it: stopping")  # fmt: skip
        return (f"the lease on {what} was taken by {by.holder} (lease {redact(self.url)}); "
                "two runs never write one output: stopping")  # fmt: skip

    def renew(self) -> None:
        """Extend the lease by ``ttl_s`` from now. LeaseLost (and ``lost`` set) when another
        run took it or it was deleted; a storage error (unreachable, refused) is raised as
        the one-line error of ``storage_errors`` and the lease is kept: try again."""
        with self._writing:
            self._renew()

    def _renew(self) -> None:
        if self._lost_reason is not None:
            raise LeaseLost(self._lost_reason)
        if self._released:
            raise RuntimeError("renew() after release()")
        record = dataclasses.replace(self.record, expires_at=now() + self.record.ttl_s)
        with storage_errors(self.url, self._fs, self._path):
            if _conditional(self._fs):
                self._renew_conditional(record)
            else:
                self._renew_checked(record)
        self.record = record

    def _renew_conditional(self, record: LeaseRecord) -> None:
        for _ in range(2):
            try:
                response = self._fs.pipe_file(self._path, record.to_bytes(), IfMatch=self._etag)
                self._etag = _etag(response) or _info_etag(self._fs, self._path)
                return
            except FileNotFoundError:
                self._lose(self._taken(None))
                raise LeaseLost(self._taken(None)) from None
            except OSError as e:
                if not _lost_race(e):
                    raise
            # Taken, or our last write landed without its answer: the token tells.
            current = _read(self._fs, self._path)
            if current is None:
                self._lose(self._taken(None))
                raise LeaseLost(self._taken(None))
            found, etag = current
            if found.token != self.record.token:
                self._lose(self._taken(found))
                raise LeaseLost(self._taken(found))
            self._etag = etag
        raise OSError(errno.EBUSY, "the lease kept changing while it was renewed")

    def _renew_checked(self, record: LeaseRecord) -> None:
        current = _read(self._fs, self._path)
        if current is None:  # a competing taker may have moved it aside for a moment
            time.sleep(_MISSING_PAUSE_S)
            current = _read(self._fs, self._path)
        if current is None or current[0].token != self.record.token:
            reason = self._taken(None if current is None else current[0])
            self._lose(reason)
            raise LeaseLost(reason)
        _overwrite(self._fs, self._path, record.to_bytes())

    def release(self) -> None:
        """Delete the lease if it is still ours (idempotent). Another run's lease is left as
        it is; a lost lease is not touched. Waits for a renewal in flight (``held`` cancels
        its renewer while a renewal may still run in its thread)."""
        with self._writing:
            if self._released or self._lost_reason is not None:
                self._released = True
                return
            self._released = True
            with storage_errors(self.url, self._fs, self._path):
                self._delete_if_ours()

    def _delete_if_ours(self) -> None:
        if _conditional(self._fs):
            etag = self._etag
            for _ in range(2):
                if not etag:
                    break
                try:
                    self._fs.call_s3("delete_object", **_bucket_key(self._fs, self._path),
                                     IfMatch=etag)  # fmt: skip
                    return
                except FileNotFoundError:
                    return
                except OSError as e:
                    if not _lost_race(e):
                        if _refused(e):
                            break  # no conditional delete here: check the token, delete
                        raise
                finally:
                    self._fs.invalidate_cache(self._path)
                # Changed: another's now, or our last renewal landed without its answer.
                current = _read(self._fs, self._path)
                if current is None or current[0].token != self.record.token:
                    return
                etag = current[1]
        current = _read(self._fs, self._path)
        if current is not None and current[0].token == self.record.token:
            with contextlib.suppress(FileNotFoundError):
                self._fs.rm_file(self._path)


def _bucket_key(fs: AbstractFileSystem, path: str) -> dict[str, str]:
    bucket, key, _ = fs.split_path(path)
    return {"Bucket": bucket, "Key": key}


def _info_etag(fs: AbstractFileSystem, path: str) -> str | None:
    info = fs.info(path, refresh=True)
    value = info.get("ETag") or info.get("etag")
    return str(value) if value else None


def _read(fs: AbstractFileSystem, path: str) -> tuple[LeaseRecord, str | None] | None:
    """The lease as stored and its ETag (None on a store without), or None when there is
    none. The ETag is read before the content, so a write conditional on it fails if the
    content read is not the version it names."""
    for attempt in range(_UNREADABLE_TRIES):
        try:
            etag = _info_etag(fs, path) if _conditional(fs) else None
            data = fs.cat_file(path)
        except FileNotFoundError:
            return None
        record = LeaseRecord.parse(data)
        if record is not None:
            return record, etag
        if attempt + 1 < _UNREADABLE_TRIES:
            time.sleep(_UNREADABLE_PAUSE_S)
    return _UNREADABLE, etag


def _create_only(fs: AbstractFileSystem, path: str, data: bytes) -> str | None:
    """Write ``data`` at ``path`` unless something is there (FileExistsError); its ETag."""
    if _conditional(fs):
        return _etag(fs.pipe_file(path, data, mode="create"))
    if _is_local(fs):
        local = fs._strip_protocol(path)
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        tmp = f"{local}.{secrets.token_hex(8)}.tmp"
        with open(tmp, "xb") as f:
            f.write(data)
        try:
            os.link(tmp, local)  # exclusive, and the file is whole when it appears
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            with open(local, "xb") as f:  # a filesystem without hard links
                f.write(data)
        finally:
            os.unlink(tmp)
        return None
    fs.pipe_file(path, data, mode="create")
    return None


def _overwrite(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    if _is_local(fs):
        local = fs._strip_protocol(path)
        tmp = f"{local}.{secrets.token_hex(8)}.tmp"
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, local)
        return
    fs.pipe_file(path, data)


def _take_over(fs: AbstractFileSystem, path: str, expired: LeaseRecord, etag: str | None,
               record: LeaseRecord) -> tuple[bool, str | None]:  # fmt: skip
    """Replace the expired lease by ``record``: (True, its ETag) if this call did, (False,
    None) if another taker got there first (the caller reads again)."""
    data = record.to_bytes()
    if _conditional(fs) and etag:
        try:
            response = fs.pipe_file(path, data, IfMatch=etag)
        except FileNotFoundError:
            return False, None
        except OSError as e:
            if _lost_race(e):
                return False, None
            raise
        return True, _etag(response) or _info_etag(fs, path)
    # Move the expired lease aside, check it was the expired one, then create ours.
    aside = f"{path}.{record.token}.stale"
    try:
        fs.mv(path, aside)
    except FileNotFoundError:
        return False, None
    try:
        moved = fs.cat_file(aside)
        parsed = LeaseRecord.parse(moved)
        if (parsed is not None) if expired is _UNREADABLE else (parsed != expired):
            with contextlib.suppress(FileExistsError):  # another's fresh lease: put it back
                _create_only(fs, path, moved)
            return False, None
    finally:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(aside)
    try:
        return True, _create_only(fs, path, data)
    except FileExistsError:
        return False, None


def _refusal(url: str, output: str | None, found: LeaseRecord) -> RunLocked:
    left = max(0.0, found.expires_at - now())
    return RunLocked(
        f"{output or redact(url)} is being collected by {found.holder} right now (lease "
        f"{redact(url)}, held until {_clock(found.expires_at)} unless renewed, "
        f"{math.ceil(left)} s from now); wait for it to finish or stop it. Two runs never "
        "write one output."
    )


def _clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def acquire(
    url: str, holder: str, ttl_s: float = DEFAULT_TTL_S, *, output: str | None = None,
    options: Mapping[str, Any] | None = None, skew_s: float = DEFAULT_SKEW_S,
) -> Lease:  # fmt: skip
    """Take the lease at ``url`` for ``holder`` (``host:pid``) for ``ttl_s`` seconds, or raise
    RunLocked naming the holder of an unexpired one and the lease URL (``output``: what the
    message says is being collected; default the lease URL). An expired lease (its holder
    died without releasing it; ``skew_s`` past its expiry) is taken over: of several takers
    exactly one wins on a store with conditional writes, the others are refused naming it.
    ``options``: fsspec's (default ROLLOUTS_STORAGE_OPTIONS, else the storage library's own
    settings). Storage errors are the one-line errors of ``storage.storage_errors``. The
    caller renews (``Lease.renew``) every ``ttl_s / 3`` and releases; ``held`` does both."""
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")
    fs, path = filesystem(url, options)
    token = secrets.token_hex(16)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    found: LeaseRecord | None = None
    with storage_errors(url, fs, path):
        for _ in range(_ATTEMPTS):
            record = LeaseRecord(holder, started_at, now() + ttl_s, float(ttl_s), token, BOOT)
            try:
                etag = _create_only(fs, path, record.to_bytes())
                return Lease(url, fs, path, record, etag, output)
            except FileExistsError:
                pass
            except OSError as e:  # S3's 409: a concurrent conditional write, read again
                if not _lost_race(e):
                    raise
            current = _read(fs, path)
            if current is None:
                continue  # released meanwhile
            found, etag = current
            dead_here = found is not _UNREADABLE and holder_died_here(found)
            if not (found.expired(skew_s) or dead_here):
                raise _refusal(url, output, found)
            if dead_here:
                # `kill -9`, then the same command at once: its process is gone, this machine
                # can tell, and it need not wait out the lease.
                _log.warning("the lease on %s is held by %s, a process of this machine that "
                             "no longer runs; taking it over", output or redact(url),
                             found.holder)  # fmt: skip
            elif found is not _UNREADABLE:
                _log.warning(
                    "the lease on %s held by %s expired at %s without a release (did it "
                    "die?); taking it over", output or redact(url), found.holder,
                    _clock(found.expires_at),
                )  # fmt: skip
            won, new_etag = _take_over(fs, path, found, etag, record)
            if won:
                return Lease(url, fs, path, record, new_etag, output)
    if found is not None and found is not _UNREADABLE:
        raise _refusal(url, output, found)
    raise RunLocked(
        f"{output or redact(url)}: its lease {redact(url)} kept changing while this run tried "
        "to take it; another run is starting on it. Two runs never write one output."
    )


def _boot_id() -> str:
    """This boot of this machine, and this process's pid namespace: containers on one kernel
    share the boot id (and with host networking the host name) but not their pids."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


BOOT = _boot_id()


def holder_died_here(found: LeaseRecord) -> bool:
    """Whether the lease's holder (``host:pid``) was a process of this machine, in its current
    boot (a host name alone may be shared by two containers), that no longer runs. A reused
    pid counts as running (the lease then waits for its expiry: the safe side)."""
    host, _, pid = found.holder.rpartition(":")
    if not BOOT or found.boot != BOOT or host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, under another user
        return False
    return False


def read_lease(url: str, *, options: Mapping[str, Any] | None = None) -> LeaseRecord | None:
    """The lease at ``url`` as stored (expired or not), or None when there is none."""
    fs, path = filesystem(url, options)
    with storage_errors(url, fs, path):
        current = _read(fs, path)
    return None if current is None else current[0]


def holder_of(
    url: str, *, options: Mapping[str, Any] | None = None, skew_s: float = DEFAULT_SKEW_S
) -> str | None:
    """Who holds the lease at ``url`` right now (``host:pid``), or None when it is free or
    expired: exactly when ``acquire`` would refuse (``rollouts status``)."""
    record = read_lease(url, options=options)
    if record is None or record is _UNREADABLE or record.expired(skew_s):
        return None
    return record.holder


@contextlib.asynccontextmanager
async def held(
    url: str, holder: str, ttl_s: float = DEFAULT_TTL_S, *, output: str | None = None,
    options: Mapping[str, Any] | None = None, skew_s: float = DEFAULT_SKEW_S,
    on_lost: Callable[[str], None] | None = None,
) -> AsyncIterator[Lease]:  # fmt: skip
    """The lease at ``url`` held for the block: taken (``acquire``; RunLocked when another run
    holds it), renewed every ``ttl_s / 3`` by a background task, released on the way out.

    A renewal that finds the lease taken or deleted, or that could not reach the store before
    the lease's own expiry, marks it lost: ``lease.lost`` / ``lease.lost_reason`` / the
    ``lease.lost_event`` set / ``on_lost(reason)`` called (on this event loop), and renewals
    stop. The block is not interrupted: its stopper watches the lease. A storage error on a
    renewal before that is logged and the renewal tried again at the next tick."""
    # Taken in a thread of its own, not a task: a cancellation (or asyncio.run's cleanup)
    # stops waiting for it, and whatever the thread takes after that is released by it.
    acquiring: concurrent.futures.Future[Lease] = concurrent.futures.Future()

    def take() -> None:
        try:
            acquiring.set_result(
                acquire(url, holder, ttl_s, output=output, options=options, skew_s=skew_s)
            )
        except BaseException as e:
            acquiring.set_exception(e)

    threading.Thread(target=take, name=f"lease {redact(url)}").start()
    try:
        lease = await asyncio.shield(asyncio.wrap_future(acquiring))
    except asyncio.CancelledError:
        acquiring.add_done_callback(_release_when_taken)
        raise
    renewer = asyncio.create_task(
        _renew_every(lease, ttl_s / 3, on_lost), name=f"lease {redact(url)}"
    )
    try:
        yield lease
    finally:
        renewer.cancel()
        # gather, not suppress(CancelledError): a cancellation of this task meanwhile is kept
        await asyncio.gather(renewer, return_exceptions=True)
        try:
            await asyncio.shield(asyncio.to_thread(lease.release))
        except Exception as e:  # it expires by itself; the block's own error matters more
            _log.warning("could not release the lease %s (%s); it expires at %s",
                         redact(url), e, _clock(lease.expires_at))  # fmt: skip


def _release_when_taken(acquiring: concurrent.futures.Future[Lease]) -> None:
    """Run in the taking thread when it ends (or at once, if it had): not a daemon thread,
    so the interpreter waits for the release before it exits."""
    if acquiring.exception() is None:
        _release_quietly(acquiring.result())


def _release_quietly(lease: Lease) -> None:
    try:
        lease.release()
    except Exception as e:
        _log.warning("could not release the lease %s (%s); it expires at %s",
                     redact(lease.url), e, _clock(lease.expires_at))  # fmt: skip


async def _renew_every(
    lease: Lease, interval_s: float, on_lost: Callable[[str], None] | None
) -> None:
    error: str | None = None
    while not lease.lost:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(lease.renew)
            error = None
        except LeaseLost:
            break
        except Exception as e:
            error = str(e).splitlines()[0] if str(e) else type(e).__name__
            if now() >= lease.expires_at:
                lease._lose(
                    f"the lease on {lease._output or redact(lease.url)} could not be renewed "
                    f"before it expired at {_clock(lease.expires_at)} ({error}); another run "
                    "may take it: stopping"
                )
                break
            _log.warning("could not renew the lease %s (%s); trying again in %.3g s",
                         redact(lease.url), error, interval_s)  # fmt: skip
    if lease.lost_reason is not None:
        lease.lost_event.set()
        if on_lost is not None:
            try:
                on_lost(lease.lost_reason)
            except Exception:
                _log.exception("the lease's on_lost callback failed")
