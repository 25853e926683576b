"""Balanced mix: several rollout files -> one training set with exact target proportions.

Bodies are never all in memory: each source is indexed by byte offsets (compact arrays), the
selection is made on the index, and selected rows are copied by seeking. The same inputs and
seed give a byte-identical file.
"""

from __future__ import annotations

import hashlib
import math
import random
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from rollouts.errors import ConfigError, InputError
from rollouts.fileio import atomic_writers

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
    offsets: array  # 'q'
    lengths: array  # 'l'
    groups: array  # 'q': _ng_task_index of each row
    sha256: str

    def __len__(self) -> int:
        return len(self.offsets)

    def group_spans(self) -> tuple[array, array, array]:
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
                task = row.get("_ng_task_index", number - 1)
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


def _select_groups(sizes: array, quota: int, rng: random.Random) -> list[int]:
    """Group numbers whose sizes add up as close to ``quota`` rows as whole groups allow:
    greedy in a seeded random order, then one more group if that lands closer."""
    order = list(range(len(sizes)))
    rng.shuffle(order)
    chosen: list[int] = []
    total = 0
    best_extra: int | None = None  # the skipped group that would land closest
    for g in order:
        size = sizes[g]
        if total + size <= quota:
            chosen.append(g)
            total += size
            if total == quota:
                return chosen
        elif best_extra is None or size < sizes[best_extra]:
            best_extra = g
    if best_extra is not None and abs(total + sizes[best_extra] - quota) < quota - total:
        chosen.append(best_extra)
    return chosen


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


@dataclass
class MixResult:
    output: Path
    manifest: Path
    rows: int
    per_source: dict[str, SourceSelection]


def mix_sources(request: MixRequest) -> MixResult:
    """Write the mixed file and `<stem>_manifest.json`. See MixRequest for the knobs."""
    indices = {s.name: index_source(s.name, Path(s.path)) for s in request.sources}
    names = [s.name for s in request.sources]
    weights = {s.name: s.proportion for s in request.sources}
    spans = {n: idx.group_spans() for n, idx in indices.items()}
    keep_groups = request.keep_groups
    if keep_groups is None:
        keep_groups = any(len(spans[n][1]) != len(indices[n]) for n in names)

    targets = largest_remainder(request.total, weights)
    available = {n: len(idx) for n, idx in indices.items()}
    quotas = _apply_shortfall(targets, available, weights, request.shortfall)

    # Blocks to write, as parallel arrays: (source, first position, rows); a block is one
    # group (contiguous in that source's order) or one row.
    b_source, b_start, b_count = array("l"), array("q"), array("l")  # "b" overflowed at 128
    selected: dict[str, int] = {}
    for si, name in enumerate(names):
        rng = _rng(request.seed, "select", name)
        _, starts, sizes = spans[name]
        if keep_groups:
            picked = sorted(_select_groups(sizes, quotas[name], rng))
            for g in picked:
                b_source.append(si)
                b_start.append(starts[g])
                b_count.append(sizes[g])
            selected[name] = sum(sizes[g] for g in picked)
        else:
            picked = sorted(rng.sample(range(len(indices[name])), quotas[name]))
            b_source.extend(si for _ in picked)
            b_start.extend(picked)
            b_count.extend(1 for _ in picked)
            selected[name] = len(picked)
    order = list(range(len(b_source)))
    _rng(request.seed, "order").shuffle(order)

    out = Path(request.output)
    per_source = {
        n: SourceSelection(
            path=str(indices[n].path), sha256=indices[n].sha256, proportion=weights[n],
            target=targets[n], quota=quotas[n], available=available[n], selected=selected[n],
            shortfall=max(0, targets[n] - available[n]),
            deviation_from_quota=selected[n] - quotas[n],
        )
        for n in names
    }  # fmt: skip
    manifest = out.with_name(f"{out.stem}_manifest.json")
    manifest_doc = {
        "output": str(out),
        "seed": request.seed,
        "total_requested": request.total,
        "total_written": sum(selected.values()),
        "keep_groups": keep_groups,
        "shortfall_policy": request.shortfall,
        "sources": {n: sel.model_dump() for n, sel in per_source.items()},
    }
    # The mix and its manifest are renamed into place together: never one without the other.
    with atomic_writers([out, manifest]) as (f, mf):
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
    return MixResult(out, manifest, sum(selected.values()), per_source)
