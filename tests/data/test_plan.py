"""Epoch plans: every row once per epoch, whatever the restarts and world-size changes."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccrk_ray.data.plan import (CALL_FIELDS, EPOCH_COLUMN, KEY_COLUMN, POS_COLUMN, Position, Segment, assign,
                                epoch_segments, file_segments, plan_calls, read_segment, remaining, stream_items)

GROUPS = [[256, 256, 100], [37], [256, 5]]   # rows per row group, per file
TOTAL = sum(map(sum, GROUPS))


def stream_keys(stream, seed=0, epoch=0):
    return [(s.file, int(r)) for s in stream for r in s.order(seed, epoch)]


def test_segments_cover_every_row_once_and_respect_row_groups():
    segs = file_segments(GROUPS, chunk_rows=100)
    keys = stream_keys(segs)
    assert len(keys) == TOTAL == len(set(keys))
    assert max(s.stop - s.start for s in segs) == 100
    for s in segs:   # a segment never crosses its row group
        assert s.group_start <= s.start < s.stop <= s.group_start + GROUPS[s.file][s.group]


def test_epoch_order_depends_only_on_seed_and_epoch():
    a, b = epoch_segments(GROUPS, 0, seed=1, chunk_rows=64), epoch_segments(GROUPS, 0, seed=1, chunk_rows=64)
    assert a == b
    assert stream_keys(a, 1, 0) == stream_keys(b, 1, 0)
    c = epoch_segments(GROUPS, 1, seed=1, chunk_rows=64)
    assert sorted(stream_keys(c, 1, 1)) == sorted(stream_keys(a, 1, 0))
    assert stream_keys(c, 1, 1) != stream_keys(a, 1, 0)
    # rows inside a segment are permuted, not read in file order
    seg = a[0]
    assert list(seg.order(1, 0)) != list(range(seg.start, seg.stop))


def test_assign_balances_streams():
    segs = epoch_segments(GROUPS, 0, seed=0, chunk_rows=64)
    streams = assign(segs, 3)
    rows = [sum(s.rows for s in st_) for st_ in streams]
    assert sum(rows) == TOTAL and max(rows) - min(rows) <= 64
    assert sorted(s.to_list() for st_ in streams for s in st_) == sorted(s.to_list() for s in segs)


def test_remaining_skips_inside_a_segment():
    seg = Segment(0, 0, 0, 0, 10)
    left = remaining([[seg, Segment(0, 0, 0, 10, 20)]], [13])
    assert left == [Segment(0, 0, 0, 10, 20, skip=3)]
    assert list(left[0].order(0, 0)) == list(Segment(0, 0, 0, 10, 20).order(0, 0)[3:])
    with pytest.raises(ValueError, match="consumed 21 rows of a stream of 20"):
        remaining([[seg, Segment(0, 0, 0, 10, 20)]], [21])


@settings(max_examples=60, deadline=None)
@given(worlds=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data())
def test_restarts_and_resizes_train_every_row_exactly_once(worlds, data):
    """Consume part of each worker's stream, checkpoint, resume on another world size, ...:
    the rows trained over the epoch are each row exactly once."""
    pos = Position(0, epoch_segments(GROUPS, 0, seed=3, chunk_rows=50), worlds[0])
    trained = []
    for i, world in enumerate(worlds):
        if i:
            pos = pos.resume(world)
            pos = Position.from_dict(pos.to_dict())     # through the checkpoint's JSON
        streams = pos.streams()
        last = i == len(worlds) - 1
        for r, stream in enumerate(streams):
            total = sum(s.rows for s in stream)
            n = total if last else data.draw(st.integers(0, total))
            trained += stream_keys(stream, 3, 0)[:n]
            pos.consumed[r] = n
    assert len(trained) == TOTAL and len(set(trained)) == TOTAL


@settings(max_examples=60, deadline=None)
@given(epochs=st.integers(1, 3), chunk=st.integers(20, 300), rows_per_call=st.integers(1, 900), single=st.integers(0, 4))
def test_plan_calls_keep_stream_order_and_never_mix_epochs(epochs, chunk, rows_per_call, single):
    """Data-actor calls: the items' segments, in order, each with its base; one epoch per call;
    the first ``single`` calls one segment each; a call stops growing once it has its rows."""
    streams = [(e, assign(epoch_segments(GROUPS, e, seed=1, chunk_rows=chunk), 2)[1]) for e in range(epochs)]
    items = stream_items(streams)
    calls = plan_calls(items, rows_per_call, single)
    flat = [(c["epoch"], list(map(int, v))) for c in calls
            for v in np.asarray(c["segments"]).reshape(-1, CALL_FIELDS)]
    assert flat == [(it["epoch"], it["segment"] + [it["base"]]) for it in items]
    for i, c in enumerate(calls):
        segs = [Segment.from_list(v[:-1]) for v in np.asarray(c["segments"]).reshape(-1, CALL_FIELDS)]
        if i < single:
            assert len(segs) == 1
        assert sum(s.rows for s in segs[:-1]) < rows_per_call       # the last segment filled it
        nxt = calls[i + 1] if i + 1 < len(calls) else None
        if nxt is not None and nxt["epoch"] == c["epoch"] and i >= single:
            assert sum(s.rows for s in segs) >= rows_per_call      # closed only when full


def test_read_segment_returns_rows_in_plan_order(tmp_path):
    ids = [f"img{i}" for i in range(300)]
    pq.write_table(pa.table({"image_id": ids, "x": list(range(300))}), tmp_path / "a.parquet", row_group_size=128)
    f = pq.ParquetFile(tmp_path / "a.parquet")
    groups = [[f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)]]
    assert groups == [[128, 128, 44]]
    seg = [s for s in file_segments(groups, 50) if s.group == 1][1]      # rows 178..228 of group 1
    seg = Segment(seg.file, seg.group, seg.group_start, seg.start, seg.stop, skip=4)
    table = read_segment(f, seg, seed=5, epoch=2, base=1000)
    expected = seg.order(5, 2)
    assert table.column("x").to_pylist() == list(expected)
    assert table.column("image_id").to_pylist() == [f"img{r}" for r in expected]
    assert table.column(POS_COLUMN).to_pylist() == list(range(1000, 1000 + len(expected)))
    assert table.column(KEY_COLUMN).to_pylist() == list(expected)      # file 0: key = row
    assert set(table.column(EPOCH_COLUMN).to_pylist()) == {2}
    assert len(expected) == 46 and np.all((expected >= 178) & (expected < 228))


def test_caption_passes_read_every_row_once_per_pass_and_survive_a_checkpoint():
    one = epoch_segments(GROUPS, 3, seed=1, chunk_rows=64)
    assert one == epoch_segments(GROUPS, 3, seed=1, chunk_rows=64, passes=1)     # one pass: the plan as before
    segs = epoch_segments(GROUPS, 3, seed=1, chunk_rows=64, passes=5)
    assert sorted({s.cycle for s in segs}) == [0, 1, 2, 3, 4]
    for c in range(5):
        keys = stream_keys([s for s in segs if s.cycle == c], seed=1, epoch=3)
        assert len(keys) == TOTAL == len(set(keys))
    first = [s.cycle for s in segs[:12]]
    assert len(set(first)) > 1                                  # the passes are shuffled together
    # the same rows of a segment are read in another order in another pass
    a = next(s for s in segs if s.cycle == 0)
    b = next(s for s in segs if s.cycle == 1 and (s.file, s.start) == (a.file, a.start))
    assert sorted(a.order(1, 3)) == sorted(b.order(1, 3)) and list(a.order(1, 3)) != list(b.order(1, 3))
    # a checkpoint's position keeps each segment's pass
    pos = Position(3, segs, 2, [100, 300])
    again = Position.from_dict(pos.to_dict())
    assert again.segments == segs
    left = remaining(assign(segs, 2), [100, 300])
    assert sum(s.rows for s in left) == 5 * TOTAL - 400 and {s.cycle for s in left} == set(range(5))
