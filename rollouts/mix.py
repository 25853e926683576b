"""Balanced mix: several rollout files -> one training set with exact target proportions.

Bodies are never all in memory: each source is indexed by byte offsets (compact arrays), the
selection is made on the index, and selected rows are copied by seeking. The same inputs and
seed give a byte-identical file.

Object storage: a source in a bucket (a URL) is first copied, streamed, to a local temporary
file (removed after the mix), then indexed and read as a local file; a mix output in a bucket
is written, with its manifest beside it, as objects committed whole (rollouts/storage.py
``output_writers``).
"""

from __future__ import annotations

import hashlib
import math
import random
import shutil
import tempfile
from array import array
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from rollouts.errors import ConfigError, InputError
from rollouts.nemo_gym import NG_TASK_INDEX
from rollouts.storage import (
    READ_BLOCK,
    Location,
    check_writable,
    filesystem,
    is_url,
    local_or_url,
    output_writers,
    sibling,
    stem_of,
    storage_errors,
)

ShortfallPolicy = Literal["error", "redistribute", "allow_short"]


class MixSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    path: str
    proportion: float = Field(gt=0)


class MixRequest(BaseModel):
    """A mix of named sources by target proportions. `keep_groups=None` means: decide from the
    data (keep groups when any source has more than one rollout per task)."""

    model_config = ConfigDict(extra="forbid")

    sources: list[MixSource]
    output: str
    total: int = Field(gt=0)
    seed: int = 0
    keep_groups: bool | None = None
    shortfall: ShortfallPolicy = "error"

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, v: list[MixSource]) -> list[MixSource]:
        if not v:
            raise ValueError("at least one source is needed")
        names = [s.name for s in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)}")
        return v


class MixShortfall(ConfigError):
    """A source has fewer rollouts than its quota under the `error` policy."""


def largest_remainder(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Integer quotas proportional to ``weights`` that sum exactly to ``total``.

    Floors first, then one more to the largest fractional parts (ties: name order).
    """
    wsum = sum(weights.values())
    exact = {k: total * w / wsum for k, w in weights.items()}
    quotas = {k: math.floor(x) for k, x in exact.items()}
    left = total - sum(quotas.values())
    for k in sorted(exact, key=lambda k: (-(exact[k] - quotas[k]), k))[:left]:
        quotas[k] += 1
    return quotas


@dataclass
class SourceIndex:
    """Where each row of one source starts and ends, and its group (task index)."""

    name: str
    path: Path
    offsets: array[int]  # 'q'
    lengths: array[int]  # 'l'
    groups: array[int]  # 'q': _ng_task_index of each row
    sha256: str

    def __len__(self) -> int:
        return len(self.offsets)

    def group_spans(self) -> tuple[array[int], array[int], array[int]]:
        """(row order, group starts, group sizes) over that order: rows of one task are
        contiguous in it. Our merged outputs are sorted by task, so the order is usually the
        identity; otherwise rows are sorted by task (ints only, never bodies)."""
        n = len(self.groups)
        g = self.groups
        if all(g[i] <= g[i + 1] for i in range(n - 1)):
            order = array("q", range(n))
        else:
            order = array("q", sorted(range(n), key=g.__getitem__))
        starts, sizes = array("q"), array("l")
        for pos in range(n):
            if pos == 0 or g[order[pos]] != g[order[pos - 1]]:
                starts.append(pos)
                sizes.append(0)
            sizes[-1] += 1
        return order, starts, sizes


def index_source(name: str, path: Path) -> SourceIndex:
    """One streaming pass: offsets, lengths, task index per row, and the file's SHA-256."""
    offsets, lengths, groups = array("q"), array("l"), array("q")
    sha = hashlib.sha256()
    if not path.exists():
        raise InputError(path, [(None, f"mix source {name!r}: file not found")])
    pos = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            sha.update(line)
            n = len(line)
            if line.strip():
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError as e:
                    raise InputError(path, [(number, f"malformed JSON: {e}")]) from None
                if not isinstance(row, dict):
                    raise InputError(path, [(number, "expected a JSON object")])
                task = row.get(NG_TASK_INDEX, number - 1)
                if not isinstance(task, int):
                    raise InputError(path, [(number, "field '_ng_task_index' must be an integer")])
                offsets.append(pos)
                lengths.append(n)
                groups.append(task)
            pos += n
    return SourceIndex(name, path, offsets, lengths, groups, sha.hexdigest())


def _rng(seed: int, *parts: str) -> random.Random:
    digest = hashlib.sha256(orjson.dumps([seed, *parts])).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _apply_shortfall(
    quotas: dict[str, int],
    available: dict[str, int],
    weights: dict[str, float],
    policy: ShortfallPolicy,
) -> dict[str, int]:
    short = {k: quotas[k] - available[k] for k in quotas if available[k] < quotas[k]}
    if not short:
        return quotas
    if policy == "error":
        detail = "; ".join(
            f"{k}: {available[k]} available, {quotas[k]} needed" for k in sorted(short)
        )
        raise MixShortfall(
            f"not enough rollouts for the mix ({detail}). Collect more, lower the total, or "
            "choose shortfall: redistribute (fill from the others) or allow_short."
        )
    if policy == "allow_short":
        return {k: min(q, available[k]) for k, q in quotas.items()}
    # redistribute: water-filling. Capped sources give what they have; the deficit goes to the
    # others in proportion to their weights, again with exact integer rounding.
    final = dict(quotas)
    capped: set[str] = set()
    while True:
        over = {k for k in final if k not in capped and final[k] > available[k]}
        if not over:
            return final
        for k in over:
            final[k] = available[k]
            capped.add(k)
        open_ = {k: weights[k] for k in final if k not in capped}
        remaining = sum(quotas.values()) - sum(final[k] for k in capped)
        if not open_ or remaining <= 0:
            return final
        final.update(largest_remainder(remaining, open_))


class Reachable:
    """Which row counts whole groups can make: bit ``n`` set when some groups add up to ``n``
    rows. A bounded knapsack over the group sizes (each size's count split in powers of two),
    so it costs a few shifts of an integer of ``limit`` bits, not one step per group."""

    def __init__(self, sizes: dict[int, int], limit: int) -> None:
        mask = (1 << (limit + 1)) - 1
        bits = 1
        for size, count in sorted(sizes.items()):
            piece, left = 1, count
            while left > 0:
                take = min(piece, left)
                bits |= (bits << (size * take)) & mask
                left -= take
                piece *= 2
        self.limit = limit
        self._bytes = bits.to_bytes(limit // 8 + 1, "little")  # O(1) tests

    def __contains__(self, n: int) -> bool:
        return 0 <= n <= self.limit and bool(self._bytes[n >> 3] >> (n & 7) & 1)

    def nearest(self, n: int) -> tuple[int | None, int | None]:
        """The closest reachable counts below and above ``n`` (None where there is none)."""
        below = next((m for m in range(min(n, self.limit + 1) - 1, -1, -1) if m in self), None)
        above = next((m for m in range(max(n, -1) + 1, self.limit + 1) if m in self), None)
        return below, above


def _merged(sizes: list[dict[int, int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for counts in sizes:
        for size, count in counts.items():
            out[size] = out.get(size, 0) + count
    return out


@dataclass
class MixPlan:
    """Rows to take from each source, and why the plan differs where it does."""

    rows: dict[str, int]
    total: int  # what whole groups can make closest to the quotas' sum
    notes: dict[str, str]  # source -> why its rows differ from its quota ("" where they don't)
    groups_note: str  # why `total` is not the quotas' sum ("" where it is)


def plan_rows(quotas: dict[str, int], sizes: dict[str, dict[int, int]]) -> MixPlan:
    """Rows per source, each made of whole groups, that add up to the quotas' sum exactly
    whenever some combination of whole groups does (another source gives the rows one source's
    groups cannot), else to the closest sum they make (ties: the smaller).

    Among the plans that reach it: the fewest rows away from the quotas, then the smallest
    relative change (a row more weighs less on a large source), then source order. Exact: a
    search within a window of +-W rows around every quota, widened until its best plan is
    within W rows of the quotas in all (no plan outside the window can then do better)."""
    names = list(quotas)
    available = {n: sum(k * c for k, c in sizes[n].items()) for n in names}
    reach = {n: Reachable(sizes[n], available[n]) for n in names}
    wanted = sum(quotas.values())
    if all(quotas[n] in reach[n] for n in names):
        return MixPlan(dict(quotas), wanted, dict.fromkeys(names, ""), "")

    every = Reachable(_merged([sizes[n] for n in names]), sum(available.values()))
    total, groups_note = wanted, ""
    if wanted not in every:
        below, above = every.nearest(wanted)
        assert below is not None  # no rows at all is always reachable
        total = below if above is None or wanted - below <= above - wanted else above
        groups_note = _no_combination(wanted, below, above, _merged([sizes[n] for n in names]))
    shift = total - wanted  # what the deviations from the quotas must add up to
    widest = max(max(quotas[n], available[n] - quotas[n]) for n in names)
    window = max(*(max(sizes[n], default=1) for n in names), abs(shift), 1)
    while True:
        found = _window_plan(names, quotas, reach, shift, window)
        if found is not None and (found[0] <= window or window >= widest):
            break
        if window >= widest:
            raise AssertionError("a reachable total has a plan")  # the full window is exact
        window = min(2 * window, widest)
    rows = {n: quotas[n] + d for n, d in zip(names, found[1], strict=True)}
    short = [n for n in names if quotas[n] not in reach[n]]
    notes = {}
    for n in names:
        d = rows[n] - quotas[n]
        if d == 0:
            notes[n] = ""
        elif n in short:
            below, above = reach[n].nearest(quotas[n])
            made = " or ".join(str(m) for m in (below, above) if m is not None)
            notes[n] = f"whole {_sizes_text(sizes[n])} make {made}, not {quotas[n]}"
            if rows[n] not in (below, above):  # farther: the only way to the total
                notes[n] += f"; {rows[n]} lets the others make the total"
        else:
            whose = f"{short[0]}'s whole groups" if len(short) == 1 else (
                f"the whole groups of {', '.join(short)}")  # fmt: skip
            notes[n] = f"for {whose}"  # the rows it gives or leaves: deviation_from_quota
    return MixPlan(rows, total, notes, groups_note)


def _window_plan(
    names: list[str], quotas: dict[str, int], reach: dict[str, Reachable], shift: int,
    window: int,
) -> tuple[int, list[int]] | None:  # fmt: skip
    """The best deviations d (quota + d reachable, |d| <= window) adding up to ``shift``:
    (rows away from the quotas, the deviations), or None. A DP over the running sum."""
    # state: running sum of deviations -> (rows away, relative change); back: per source
    states: dict[int, tuple[int, float]] = {0: (0, 0.0)}
    back: list[dict[int, tuple[int, int]]] = []
    for i, name in enumerate(names):
        q = quotas[name]
        moves = sorted((d for d in range(-window, window + 1) if q + d in reach[name]),
                       key=lambda d: (abs(d), d))  # fmt: skip
        room = window * (len(names) - i - 1)  # what the sources after this one can still move
        new: dict[int, tuple[int, float]] = {}
        came: dict[int, tuple[int, int]] = {}
        for at in sorted(states):
            away, rel = states[at]
            for d in moves:
                to = at + d
                if abs(shift - to) > room:
                    continue
                cost = (away + abs(d), rel + d * d / max(q, 1))
                if to not in new or cost < new[to]:
                    new[to], came[to] = cost, (at, d)
        if not new:
            return None
        states = new
        back.append(came)
    if shift not in states:
        return None
    deviations, at = [], shift
    for came in reversed(back):
        at, d = came[at]
        deviations.append(d)
    return states[shift][0], deviations[::-1]


def _sizes_text(counts: dict[int, int]) -> str:
    """`groups of 3`, `groups of 2 or 3`, `groups of 1 to 8` (rows each)."""
    sizes = sorted(counts)
    if not sizes:
        return "groups"
    if len(sizes) == 1:
        return f"groups of {sizes[0]}"
    if len(sizes) <= 3:
        return f"groups of {', '.join(map(str, sizes[:-1]))} or {sizes[-1]}"
    return f"groups of {sizes[0]} to {sizes[-1]}"


def _no_combination(wanted: int, below: int | None, above: int | None,
                    counts: dict[int, int]) -> str:  # fmt: skip
    step = 0
    for size in counts:
        step = math.gcd(step, size)
    why = f"no combination of whole groups makes {wanted} rows"
    if step > 1:
        why += f" (every group has a multiple of {step} rows)"
    closest = " and ".join(str(m) for m in (below, above) if m is not None)
    return f"{why}; the closest {'are' if ' and ' in closest else 'is'} {closest}"


def _outward(start: int, top: int) -> Iterator[int]:
    """start, start - 1, start + 1, start - 2, ... within [0, top]."""
    for step in range(top + 1):
        for k in (start - step, start + step) if step else (start,):
            if 0 <= k <= top:
                yield k


def _pick_groups(by_size: dict[int, array[int]], rows: int, rng: random.Random) -> list[int]:
    """Group numbers adding up to exactly ``rows`` (reachable): of each size about the same
    share (so that, say, tasks with a failed rollout are neither favoured nor avoided), the
    groups of each size drawn at random."""
    sizes = sorted(by_size, reverse=True)
    available = sum(s * len(by_size[s]) for s in sizes)
    share = rows / available if available else 0.0
    # rest[j]: what the sizes from j on can make
    rest = [Reachable({s: len(by_size[s]) for s in sizes[j:]}, rows) for j in range(len(sizes))]
    rest.append(Reachable({}, rows))
    picked: list[int] = []
    left = rows
    for j, size in enumerate(sizes):
        count = len(by_size[size])
        ideal = round(share * count)
        take = next(k for k in _outward(ideal, count) if left - size * k in rest[j + 1])
        picked += rng.sample(list(by_size[size]), take)
        left -= size * take
    assert left == 0
    return picked


class SourceSelection(BaseModel):
    """What the mix took from one source (one entry of the manifest's `sources`)."""

    path: str
    sha256: str
    proportion: float
    target: int
    quota: int
    available: int
    selected: int
    shortfall: int  # rows the source lacked for its target
    deviation_from_quota: int  # selected - quota: whole groups round it
    note: str = ""  # why selected is not the quota ("" where it is)


@dataclass
class MixResult:
    output: Location  # a local path, or a URL (a str)
    manifest: Location
    rows: int
    per_source: dict[str, SourceSelection]
    total_requested: int = 0
    note: str = ""  # why rows is not total_requested ("" where it is)


def mix_sources(request: MixRequest) -> MixResult:
    """Write the mixed file and `<stem>_manifest.json`. See MixRequest for the knobs.

    Sources and output may be in object storage (URLs): a source is copied to a local
    temporary file first (it is read at random offsets), the output and its manifest are
    objects committed together."""
    out = local_or_url(request.output)
    if isinstance(out, str):  # before copying any source: a bucket that cannot take it
        check_writable(out)
    with ExitStack() as stack:
        local: dict[str, Path] = {}
        urls = {s.name: s.path for s in request.sources if is_url(s.path)}
        if urls:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rollouts-mix-")))
            local = {name: copy_to_local(url, tmp / f"{i}.jsonl")
                     for i, (name, url) in enumerate(urls.items())}  # fmt: skip
        return _mix(request, out, local)


def copy_to_local(url: str, path: Path) -> Path:
    """The object at ``url`` copied, a block at a time, to ``path`` (its bytes unchanged)."""
    fs, key = filesystem(url)
    with storage_errors(url, fs, key), fs.open(key, "rb", block_size=READ_BLOCK) as src, \
            open(path, "wb") as dst:  # fmt: skip
        shutil.copyfileobj(src, dst, READ_BLOCK)
    return path


def _mix(request: MixRequest, out: Location, local: Mapping[str, Path]) -> MixResult:
    """The mix, its sources in object storage read from their local copies (``local``: name
    -> copy); the manifest names every source as given."""
    given = {s.name: s.path for s in request.sources}
    indices: dict[str, SourceIndex] = {}
    for s in request.sources:
        try:
            indices[s.name] = index_source(s.name, local.get(s.name, Path(s.path)))
        except InputError as e:
            if s.name not in local:
                raise
            raise InputError(given[s.name], e.problems) from None  # the URL, not its copy
    names = [s.name for s in request.sources]
    weights = {s.name: s.proportion for s in request.sources}
    spans = {n: idx.group_spans() for n, idx in indices.items()}
    keep_groups = request.keep_groups
    if keep_groups is None:
        keep_groups = any(len(spans[n][1]) != len(indices[n]) for n in names)

    targets = largest_remainder(request.total, weights)
    available = {n: len(idx) for n, idx in indices.items()}
    quotas = _apply_shortfall(targets, available, weights, request.shortfall)
    sizes: dict[str, dict[int, int]] = {}
    for n in names:
        sizes[n] = dict(Counter(spans[n][2])) if keep_groups else {1: available[n]}
    plan = plan_rows(quotas, sizes)

    # Blocks to write, as parallel arrays: (source, first position, rows); a block is one
    # group (contiguous in that source's order) or one row.
    b_source, b_start, b_count = array("l"), array("q"), array("l")  # "b" overflowed at 128
    for si, name in enumerate(names):
        rng = _rng(request.seed, "select", name)
        _, starts, group_sizes = spans[name]
        if keep_groups:
            by_size: dict[int, array[int]] = {}
            for g, size in enumerate(group_sizes):
                by_size.setdefault(size, array("q")).append(g)
            for g in sorted(_pick_groups(by_size, plan.rows[name], rng)):
                b_source.append(si)
                b_start.append(starts[g])
                b_count.append(group_sizes[g])
        else:
            picked = sorted(rng.sample(range(len(indices[name])), plan.rows[name]))
            b_source.extend(si for _ in picked)
            b_start.extend(picked)
            b_count.extend(1 for _ in picked)
    selected = plan.rows
    order = list(range(len(b_source)))
    _rng(request.seed, "order").shuffle(order)

    per_source = {
        n: SourceSelection(
            path=given[n] if n in local else str(indices[n].path), sha256=indices[n].sha256, proportion=weights[n],
            target=targets[n], quota=quotas[n], available=available[n], selected=selected[n],
            shortfall=max(0, targets[n] - available[n]),
            deviation_from_quota=selected[n] - quotas[n], note=plan.notes[n],
        )
        for n in names
    }  # fmt: skip
    note = total_note(request.total, per_source, plan)
    manifest = mix_manifest(out)
    manifest_doc = {
        "output": str(out),
        "seed": request.seed,
        "total_requested": request.total,
        "total_written": sum(selected.values()),
        "note": note,
        "keep_groups": keep_groups,
        "shortfall_policy": request.shortfall,
        "sources": {n: sel.model_dump() for n, sel in per_source.items()},
    }
    # The mix and its manifest are renamed into place (or committed) together: never one
    # without the other.
    with output_writers([out, manifest]) as (f, mf):
        handles = [open(indices[n].path, "rb") for n in names]
        try:
            for b in order:
                si = b_source[b]
                idx, h, row_order = indices[names[si]], handles[si], spans[names[si]][0]
                for pos in range(b_start[b], b_start[b] + b_count[b]):
                    r = row_order[pos]
                    h.seek(idx.offsets[r])
                    row = orjson.loads(h.read(idx.lengths[r]))
                    row["_mix_source"] = names[si]
                    f.write(orjson.dumps(row) + b"\n")
        finally:
            for h in handles:
                h.close()
        mf.write(orjson.dumps(manifest_doc, option=orjson.OPT_INDENT_2) + b"\n")
    return MixResult(out, manifest, sum(selected.values()), per_source, request.total, note)


def mix_manifest(output: Location) -> Location:
    """``<stem>_manifest.json`` beside the mix's output (a URL's beside it in its bucket)."""
    return sibling(output, f"{stem_of(output)}_manifest.json")


def total_note(total: int, per_source: dict[str, SourceSelection], plan: MixPlan) -> str:
    """Why the mix has fewer or more rows than asked, in one line ("" when it has them all)."""
    if plan.total == total:
        return ""
    reasons = []
    lacking = {n: s for n, s in per_source.items() if s.shortfall}
    if lacking:
        reasons.append("the sources have fewer rows than asked (" + "; ".join(
            f"{n}: {s.available} of {s.target}" for n, s in lacking.items()) + ")")  # fmt: skip
    if plan.groups_note:
        reasons.append(plan.groups_note)
    return f"{plan.total} rows, not {total}: " + "; ".join(reasons)
