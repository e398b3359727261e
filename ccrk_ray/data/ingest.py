"""The Ray Data side of the data path: read parquet (local, ``s3://`` or any pyarrow URI), apply the
pure batch transform in actors, and count what was read and skipped.

Only wiring lives here; the per-row work is ``ccrk_ray.data.transforms`` (CCRK) and
``ccrk_ray.data.nrccr`` (NRCCR): a training stream takes either family's row transform.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ccrk_ray.core import storage
from ccrk_ray.core.log import get_logger
from ccrk_ray.data import schema
from ccrk_ray.data.plan import CALL_FIELDS, Segment, plan_calls, read_segment, stream_items
from ccrk_ray.data.nrccr import NRCCRBatchTransform
from ccrk_ray.data.stats import stats_actor
from ccrk_ray.data.transforms import EvalCaptionsTransform, ImageTransform, OneToKBatchTransform
from ccrk_ray.data.tokenizer import CaptionTokenizer

log = get_logger(__name__)


@dataclass
class DatasetCheck:
    rows: int
    files: list[str]                         # readable files, paths within the filesystem
    unreadable: list[tuple[str, str]]        # (file, error) of files whose footer could not be read
    row_groups: list[list[int]]              # rows of each row group of each readable file


def check_dataset(uri: str, languages: Sequence[str], endpoint_url: str | None = None,
                  on_bad_file: str = "skip", check_schema=None) -> DatasetCheck:
    """Check every file's schema (footers only) before training starts.

    A schema that does not match raises ``schema.SchemaError`` naming the file and the column
    (``check_schema(arrow_schema, where)``; default CCRK's for ``languages``). A
    file whose footer cannot be read at all is reported by name and left out
    (``on_bad_file="skip"``, the default) or raises (``"raise"``).
    """
    if on_bad_file not in ("skip", "raise"):
        raise ValueError(f"on_bad_file must be 'skip' or 'raise', got {on_bad_file!r}")
    fs, files = storage.list_parquet(uri, endpoint_url)
    rows, good, bad, groups = 0, [], [], []
    for f in files:
        try:
            meta = pq.ParquetFile(fs.open_input_file(f))
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for truncated or non-parquet files
            if on_bad_file == "raise":
                raise schema.SchemaError(f"{f}: unreadable parquet file ({exc})") from None
            log.warning("skipping unreadable file %s: %s", f, exc)
            bad.append((f, str(exc)))
            continue
        if check_schema is None:
            schema.check_schema(meta.schema_arrow, languages, where=f)
        else:
            check_schema(meta.schema_arrow, f)
        rows += meta.metadata.num_rows
        good.append(f)
        groups.append([meta.metadata.row_group(g).num_rows for g in range(meta.metadata.num_row_groups)])
    if not good:
        raise FileNotFoundError(f"no readable parquet files under {uri}")
    return DatasetCheck(rows, good, bad, groups)


class _Counting:
    """Mixin for a row transform that reports rows read and skipped to the DataStats actor. Runs in
    data actors: tokenisation stays on the actor's thread (an actor is one of several on a node;
    its parallelism is the actor count, not Rayon threads over every core)."""

    def __init__(self, **kwargs):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        super().__init__(**kwargs)

    def __call__(self, batch: Mapping[str, np.ndarray], epoch: int | None = None,
                 run: str | None = None) -> dict[str, np.ndarray]:
        before_rows, before = self.rows_seen, dict(self.skipped.counts)
        out = super().__call__(batch)
        delta = {r: n - before.get(r, 0) for r, n in self.skipped.counts.items() if n != before.get(r, 0)}
        if not hasattr(self, "_stats"):
            self._stats = stats_actor()     # looked up once per actor: a name lookup is a GCS round trip
        actor = self._stats
        if actor is not None:
            examples = {r: self.skipped.example_ids.get(r, []) for r in delta}
            actor.add.remote(self.rows_seen - before_rows, delta, examples, epoch, run)
        return out


class CountingTransform(_Counting, OneToKBatchTransform):
    """OneToKBatchTransform that counts rows read and skipped in the DataStats actor."""


class CountingEvalTransform(_Counting, EvalCaptionsTransform):
    """EvalCaptionsTransform that counts rows read and skipped in the DataStats actor."""


class CountingNRCCRTransform(_Counting, NRCCRBatchTransform):
    """NRCCRBatchTransform that counts rows read and skipped in the DataStats actor."""


def read_captions(uri: str, languages: Sequence[str], shuffle_files: bool = True, endpoint_url: str | None = None,
                  files: Sequence[str] | None = None, **read_kwargs) -> ray.data.Dataset:
    """Read only the id, image and the wanted languages' caption columns (file order shuffled).

    ``files`` (paths within ``uri``'s filesystem, e.g. ``check_dataset(...).files``) restricts the
    read to those files."""
    fs, path = storage.resolve(uri, endpoint_url)
    columns = [schema.IMAGE_ID, schema.IMAGE] + [schema.caption_column(lang) for lang in languages]
    return ray.data.read_parquet(list(files) if files else path, filesystem=fs, columns=columns,
                                 shuffle="files" if shuffle_files else None, **read_kwargs)


def one_to_k_dataset(uri: str, *, languages: Sequence[str], k: int, tokenizer: CaptionTokenizer,
                     image_transform: ImageTransform, batch_size: int = 64, num_actors: int = 1,
                     cpus_per_actor: float = 1.0, shuffle_files: bool = True, with_ids: bool = True,
                     on_bad_row: str = "skip", endpoint_url: str | None = None, files: Sequence[str] | None = None,
                     **read_kwargs) -> ray.data.Dataset:
    """A dataset of 1-to-K batches (see OneToKBatchTransform) streamed from ``uri``.

    ``with_ids=False`` leaves out the string ``image_id`` column: only tensors (for training).
    ``on_bad_row="skip"`` drops unusable rows and counts them in the DataStats actor (when the
    driver created one); ``"raise"`` stops at the first, naming the row and field.
    """
    # Enough read blocks to keep every transform actor busy: Ray would otherwise read a few small
    # files into one block, which one actor then transforms alone.
    read_kwargs.setdefault("override_num_blocks", max(8, 4 * num_actors))
    ds = read_captions(uri, languages, shuffle_files=shuffle_files, endpoint_url=endpoint_url, files=files,
                       **read_kwargs)
    return ds.map_batches(
        CountingTransform,
        fn_constructor_kwargs=dict(tokenizer=tokenizer, languages=tuple(languages), k=k,
                                   image_transform=image_transform, with_ids=with_ids, on_bad_row=on_bad_row),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors),
        num_cpus=cpus_per_actor,
    )


def eval_rows(uri: str, *, languages: Sequence[str], endpoint_url: str | None = None) -> ray.data.Dataset:
    """The rows of an evaluation split (id, image, the languages' captions) streamed from ``uri`` in
    file order: what a ``CountingEvalTransform`` turns into evaluation batches (where it runs:
    ``ccrk_ray.eval.actors.embed_dataset``)."""
    return read_captions(uri, languages, shuffle_files=False, endpoint_url=endpoint_url, override_num_blocks=8)


def read_call(call_segments, epoch: int, open_file, seed: int, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """One call's segments (``ccrk_ray.data.plan.plan_calls``) → their rows as a numpy batch, in plan order
    (``ccrk_ray.data.plan.read_segment``). ``open_file(i)`` gives the
    ``pyarrow.parquet.ParquetFile`` of the plan's file ``i``."""
    tables = []
    for values in np.asarray(call_segments, dtype=np.int64).reshape(-1, CALL_FIELDS):
        segment = Segment.from_list(values[:-1])
        tables.append(read_segment(open_file(segment.file), segment, seed, epoch, int(values[-1]), columns))
    table = pa.concat_tables(tables)
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


class PlanReader:
    """Mixin for a counting row transform (``columns``: what it reads) that reads one call's plan
    segments (``ccrk_ray.data.plan.plan_calls``) *and* transforms them: the encoded images go from
    parquet straight to pixels, never through the object store. The last ``OPEN_FILES`` files stay
    open (footer parsed once; on S3 no HEAD and footer GET per segment)."""

    OPEN_FILES = 64

    def __init__(self, *, uri: str, endpoint_url: str | None, files: Sequence[str], seed: int,
                 run: str | None = None, **transform_kwargs):
        super().__init__(**transform_kwargs)
        self.fs, _ = storage.resolve(uri, endpoint_url)
        self.files, self.seed, self.run = list(files), seed, run
        self._open: dict[int, pq.ParquetFile] = {}

    def open_file(self, index: int) -> pq.ParquetFile:
        f = self._open.pop(index, None)
        if f is None:
            f = pq.ParquetFile(self.fs.open_input_file(self.files[index]))
            if len(self._open) >= self.OPEN_FILES:
                oldest = next(iter(self._open))
                self._open.pop(oldest).close(force=True)
        self._open[index] = f       # most recently used last
        return f

    def __call__(self, calls: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(calls["epoch"]) != 1:
            raise ValueError(f"a stream call is one plan call, got {len(calls['epoch'])}")
        epoch = int(calls["epoch"][0])
        rows = read_call(calls["segments"][0], epoch, self.open_file, self.seed, self.columns)
        return super().__call__(rows, epoch, self.run)


class StreamTransform(PlanReader, CountingTransform):
    """Plan segments → 1-to-K training batches (CCRK): tensors only, bad rows skipped and counted."""

    def __init__(self, *, with_ids: bool = False, on_bad_row: str = "skip", **kwargs):
        super().__init__(with_ids=with_ids, on_bad_row=on_bad_row, **kwargs)

    @property
    def columns(self) -> list[str]:
        return [schema.IMAGE_ID, schema.IMAGE] + [schema.caption_column(lang) for lang in self.languages]


class NRCCRStreamTransform(PlanReader, CountingNRCCRTransform):
    """Plan segments → NRCCR training batches (item + one caption in each training view)."""

    def __init__(self, *, on_bad_row: str = "skip", **kwargs):
        super().__init__(on_bad_row=on_bad_row, **kwargs)


MAX_BLOCKS = 512          # input blocks of one stream dataset (each costs ~1.4 ms to create)
WINDOW_SEGMENTS = 8192    # plan segments per stream dataset (~2M rows at 256 rows per segment)
ROWS_PER_CALL = 1024      # rows one data-actor call reads and transforms (one output block)
TASKS_IN_FLIGHT = 2       # calls queued per data actor (each holds its output block)


def stream_dataset(items: Sequence[Mapping[str, Any]], *, uri: str, files: Sequence[str], seed: int,
                   num_actors: int = 1, cpus_per_actor: float = 0.8, endpoint_url: str | None = None,
                   run: str | None = None, rows_per_call: int = ROWS_PER_CALL, transform: type = StreamTransform,
                   **transform_kwargs) -> ray.data.Dataset:
    """Plan items (``ccrk_ray.data.plan.stream_items``: segments of one or several epochs) as a
    dataset of training batches (``transform``, a ``PlanReader``, built with ``transform_kwargs``:
    CCRK's 1-to-K batches by default) in exactly the items' order, each row carrying its ``_pos``
    (position in its epoch's stream), ``_key`` and ``_epoch``. Rows read and skipped are counted in
    the DataStats actor under (``run``, epoch).

    Each actor call reads and transforms about ``rows_per_call`` rows (``plan.plan_calls``,
    ``StreamTransform``): Ray's cost per block (the executor in this process, the object store)
    is paid per call, not per segment. Each actor's first call is one segment, for a quick first
    batch. At most ``MAX_BLOCKS`` input blocks (a block holds consecutive calls). Sets
    ``DataContext.execution_options.preserve_order`` for the calling process."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False      # one dataset per worker and window: keep the logs readable
    # Ray Data would start and stop a thread polling the actor's memory around every call; nothing
    # here reads that estimate
    ctx.memory_usage_poll_interval_s = None
    if rows_per_call < 1:
        raise ValueError(f"rows_per_call must be >= 1, got {rows_per_call}")
    calls = plan_calls(items, rows_per_call, single=num_actors)
    if not calls:
        raise ValueError("this worker's share of the data is empty")
    return ray.data.from_items(calls, override_num_blocks=min(len(calls), MAX_BLOCKS)).map_batches(
        transform,
        fn_constructor_kwargs=dict(uri=uri, endpoint_url=endpoint_url, files=list(files), seed=seed, run=run,
                                   **transform_kwargs),
        batch_size=1, batch_format="numpy",
        # Every actor starts at once (an actor's start-up is seconds of imports: growing the pool
        # one by one costs the first epoch that much); it may still run on fewer if CPUs are short.
        # Calls of ROWS_PER_CALL rows: with one 256-row segment per call an actor idled ~25% of the
        # time between calls (the next call was submitted late) and this process's Ray Data
        # executor spent ~0.2 of a core on the blocks; 1024-row calls measured 15-20% more rows/s.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors, initial_size=num_actors,
                                           max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT),
        num_cpus=cpus_per_actor)


def stream_blocks(streams, *, window: int = WINDOW_SEGMENTS, prefetch_blocks: int = 2,
                  **dataset_kwargs) -> Iterator[dict[str, Any]]:
    """One worker's streams of several epochs (``[(epoch, segments), ...]``) as torch blocks in
    plan order, for ``ccrk_ray.data.batching.EpochBatcher``.

    The items go to Ray Data ``window`` segments at a time, one dataset per window: the data actors
    (their start-up costs seconds) live across epochs, and a long run never holds its whole plan
    as blocks. Only what is consumed (plus ``prefetch_blocks``) is read."""
    items = stream_items(streams)
    if not items:
        raise ValueError("this worker's share of the data is empty")
    for start in range(0, len(items), window):
        ds = stream_dataset(items[start:start + window], **dataset_kwargs)
        yield from ds.iter_torch_batches(batch_size=None, prefetch_batches=prefetch_blocks)
