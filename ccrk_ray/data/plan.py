"""Deterministic epoch plans: which rows each training worker reads, in which order, and what is
left of an epoch after a checkpoint — the part of mid-epoch resume that open-source Ray Data lacks.

An epoch is a list of *segments*: slices of parquet row groups (``chunk_rows`` rows at most),
shuffled with a seed that depends only on (seed, epoch). Rows inside a segment are read in a
permutation of their own (seeded by the segment), so batches are shuffled without a shuffle buffer
whose content a checkpoint could not describe. ``assign`` deals the segments out to W workers
(each next segment to the worker with the fewest rows so far), so every worker's *stream* — its
segments in order — is known exactly.

Each worker counts the input rows it has consumed (bad rows skipped by the transform included).
``remaining`` turns the per-worker consumed counts back into a segment list: what is left of the
epoch, in a fixed order, ready to be dealt out again to any number of workers. A checkpoint holds
a ``Position``: the epoch, the segments of the current *phase* (the plan as of the last (re)start),
the phase's world size and each worker's consumed rows. Nothing here touches Ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

POS_COLUMN = "_pos"     # index of the row in its worker's stream for this phase
KEY_COLUMN = "_key"     # file index << 32 | row in file: identifies a row across plans
EPOCH_COLUMN = "_epoch"  # the epoch whose plan the row was read for
CYCLE_COLUMN = "_cycle"  # which of the epoch's passes over the data the row was read for


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of file ``file`` (index into the plan's file list), row group ``group``
    (whose first row is ``group_start``), read in a seeded permutation, of which the first ``skip``
    rows were consumed already; ``cycle``: which pass over the data of an epoch with several
    (``epoch_segments``' ``passes``) the segment belongs to."""
    file: int
    group: int
    group_start: int
    start: int
    stop: int
    skip: int = 0
    cycle: int = 0

    @property
    def rows(self) -> int:
        return self.stop - self.start - self.skip

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """Row numbers within the file, in this segment's read order, consumed rows left out."""
        key = f"{seed}:{epoch}:{self.file}:{self.start}:{self.stop}{f':{self.cycle}' if self.cycle else ''}".encode()
        digest = hashlib.blake2b(key, digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        return (self.start + rng.permutation(self.stop - self.start))[self.skip:]

    def to_list(self) -> list[int]:
        return [self.file, self.group, self.group_start, self.start, self.stop, self.skip, self.cycle]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> "Segment":
        return cls(*(int(v) for v in values))


def file_segments(row_groups: Sequence[Sequence[int]], chunk_rows: int) -> list[Segment]:
    """Every file's row groups cut into segments of at most ``chunk_rows`` rows (file order)."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    out = []
    for f, groups in enumerate(row_groups):
        first = 0
        for g, n in enumerate(groups):
            for s in range(first, first + int(n), chunk_rows):
                out.append(Segment(f, g, first, s, min(s + chunk_rows, first + int(n))))
            first += int(n)
    return out


def epoch_segments(row_groups: Sequence[Sequence[int]], epoch: int, seed: int, chunk_rows: int = 256,
                   passes: int = 1) -> list[Segment]:
    """The epoch's segments in a shuffled order that depends only on (seed, epoch). ``passes`` > 1:
    every row ``passes`` times (segments with ``cycle`` 0 .. passes−1, shuffled together), so that
    one epoch can show each of a row's captions once (caption-level epochs)."""
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    segments = [dataclasses.replace(s, cycle=c) for c in range(passes) for s in file_segments(row_groups, chunk_rows)]
    order = np.random.default_rng([seed, epoch]).permutation(len(segments))
    return [segments[i] for i in order]


def assign(segments: Sequence[Segment], world: int) -> list[list[Segment]]:
    """Deal segments to ``world`` workers in order, each to the worker with the fewest rows so far
    (lowest rank on ties): streams of near-equal length, fully determined by the inputs."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    streams: list[list[Segment]] = [[] for _ in range(world)]
    rows = [0] * world
    for seg in segments:
        r = min(range(world), key=lambda i: (rows[i], i))
        streams[r].append(seg)
        rows[r] += seg.rows
    return streams


def remaining(streams: Sequence[Sequence[Segment]], consumed: Sequence[int]) -> list[Segment]:
    """What is left after worker r consumed the first ``consumed[r]`` rows of ``streams[r]``:
    the unconsumed segments (a partly read one with its ``skip`` advanced), interleaved across
    workers (first left-over segment of each worker, then the second, ...)."""
    if len(consumed) != len(streams):
        raise ValueError(f"{len(consumed)} consumed counts for {len(streams)} worker streams")
    left: list[list[Segment]] = []
    for stream, n in zip(streams, consumed):
        total = sum(s.rows for s in stream)
        if not 0 <= n <= total:
            raise ValueError(f"consumed {n} rows of a stream of {total}")
        rest = []
        for seg in stream:
            if n >= seg.rows:
                n -= seg.rows
                continue
            rest.append(dataclasses.replace(seg, skip=seg.skip + n) if n else seg)
            n = 0
        left.append(rest)
    out = []
    for i in range(max((len(s) for s in left), default=0)):
        out += [s[i] for s in left if i < len(s)]
    return out


@dataclass
class Position:
    """Where training is inside an epoch (stored in every checkpoint as plain JSON)."""
    epoch: int
    segments: list[Segment]            # the plan of the current phase
    world: int                         # world size of the phase
    consumed: list[int] = field(default_factory=list)   # input rows consumed per worker in the phase

    def __post_init__(self):
        if not self.consumed:
            self.consumed = [0] * self.world

    def streams(self) -> list[list[Segment]]:
        return assign(self.segments, self.world)

    def resume(self, world: int) -> "Position":
        """The same point in the epoch as a new phase for ``world`` workers."""
        return Position(self.epoch, remaining(self.streams(), self.consumed), world)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["segments"] = [s.to_list() for s in self.segments]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Position":
        return cls(int(d["epoch"]), [Segment.from_list(s) for s in d["segments"]], int(d["world"]),
                   [int(c) for c in d["consumed"]])


def stream_items(streams: Sequence[tuple[int, Sequence[Segment]]]) -> list[dict[str, Any]]:
    """A worker's streams of several epochs, ``[(epoch, segments), ...]``, as plan items: each
    segment with its epoch and ``base``, the position of its first row in its epoch's stream."""
    items = []
    for epoch, stream in streams:
        base = 0
        for seg in stream:
            items.append({"segment": seg.to_list(), "epoch": int(epoch), "base": base})
            base += seg.rows
    return items


CALL_FIELDS = 8       # a call's segments, flattened: Segment.to_list() + [base] each


def plan_calls(items: Sequence[Mapping[str, Any]], rows_per_call: int, single: int = 0) -> list[dict[str, Any]]:
    """Plan items (``stream_items``, in stream order) grouped into data-actor
    calls: consecutive segments of one epoch, adding segments while the call has fewer than
    ``rows_per_call`` rows. The first ``single`` calls hold one segment each, so the first batch
    waits for one segment's work, not a whole call's. Each call is ``{"epoch": e, "segments":
    [file, group, group_start, start, stop, skip, base] * n}`` (flat ints: one Arrow list column)."""
    calls: list[dict[str, Any]] = []
    rows = 0
    for item in items:
        seg = Segment.from_list(item["segment"])
        last = calls[-1] if calls else None
        if last is None or last["epoch"] != int(item["epoch"]) or len(calls) <= single or rows >= rows_per_call:
            last = {"epoch": int(item["epoch"]), "segments": []}
            calls.append(last)
            rows = 0
        last["segments"] += seg.to_list() + [int(item["base"])]
        rows += seg.rows
    return calls


def read_segment(parquet_file, segment: Segment, seed: int, epoch: int, base: int,
                 columns: Sequence[str] | None = None) -> pa.Table:
    """The segment's unconsumed rows from an open ``pyarrow.parquet.ParquetFile``, in read order,
    with ``_pos`` (``base`` + position in the segment), ``_key``, ``_epoch`` and ``_cycle`` columns added."""
    table = parquet_file.read_row_group(segment.group, columns=list(columns) if columns else None)
    rows = segment.order(seed, epoch)
    table = table.take(pa.array(rows - segment.group_start))
    pos = np.arange(base, base + len(rows), dtype=np.int64)
    key = (np.int64(segment.file) << np.int64(32)) | rows.astype(np.int64)
    epochs = np.full(len(rows), epoch, dtype=np.int64)
    cycles = np.full(len(rows), segment.cycle, dtype=np.int64)
    return (table.append_column(POS_COLUMN, pa.array(pos)).append_column(KEY_COLUMN, pa.array(key))
            .append_column(EPOCH_COLUMN, pa.array(epochs)).append_column(CYCLE_COLUMN, pa.array(cycles)))
