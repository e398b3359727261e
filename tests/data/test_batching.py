"""EpochBatcher: one worker's multi-epoch row stream back into per-epoch batches."""

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ccrk_ray.data.batching import EpochBatcher, Started
from ccrk_ray.data.plan import EPOCH_COLUMN, POS_COLUMN


def blocks_of(epoch_rows, cuts):
    """Rows of consecutive epochs (``epoch_rows[e]`` rows of epoch e, positions 0..n-1 per epoch),
    cut into blocks at the given row offsets (blocks may span epochs)."""
    epochs = torch.cat([torch.full((n,), e) for e, n in enumerate(epoch_rows)]).long()
    pos = torch.cat([torch.arange(n) for n in epoch_rows]).long()
    x = torch.arange(len(pos)).float()[:, None].repeat(1, 3)
    bounds = sorted({0, len(pos), *[c for c in cuts if 0 < c < len(pos)]})
    return [{EPOCH_COLUMN: epochs[a:b], POS_COLUMN: pos[a:b], "x": x[a:b]} for a, b in zip(bounds[:-1], bounds[1:])]


@settings(max_examples=200, deadline=None)
@given(epoch_rows=st.lists(st.integers(0, 40), min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 160), max_size=12), batch=st.integers(1, 9))
def test_every_full_batch_of_each_epoch_in_order_and_nothing_crosses_epochs(epoch_rows, cuts, batch):
    batcher = EpochBatcher(blocks_of(epoch_rows, cuts), batch)
    for e, n in enumerate(epoch_rows):
        got = []
        while (b := batcher.next(e)) is not None:
            assert len(b["x"]) == batch and set(b[EPOCH_COLUMN].tolist()) == {e}
            assert torch.equal(b["x"][:, 0], b["x"][:, 2])          # rows stay whole
            got += b[POS_COLUMN].tolist()
        assert got == list(range(n // batch * batch))                # every full batch, in order
    assert batcher.next(len(epoch_rows)) is None
    assert batcher.dropped == sum(n % batch for n in epoch_rows)     # only the short tails


def test_rows_left_in_an_epoch_are_passed_over_and_counted():
    batcher = EpochBatcher(blocks_of([10, 7], [3, 12]), 2)
    assert batcher.next(0)[POS_COLUMN].tolist() == [0, 1]
    # the caller ends epoch 0 early (another rank ran out): the next epoch starts at its own first row
    assert batcher.next(1)[POS_COLUMN].tolist() == [0, 1]
    assert batcher.dropped == 8
    assert [batcher.next(1)[POS_COLUMN].tolist() for _ in range(2)] == [[2, 3], [4, 5]]
    assert batcher.next(1) is None and batcher.dropped == 9


def test_a_batch_inside_one_block_is_a_view_not_a_copy():
    blocks = blocks_of([8], [])
    batcher = EpochBatcher(blocks, 4)
    b = batcher.next(0)
    assert b["x"].data_ptr() == blocks[0]["x"].data_ptr()


def test_started_requests_the_first_item_at_once_and_yields_everything_in_order():
    asked, release = threading.Event(), threading.Event()

    def stream():
        asked.set()                       # the first item was requested
        release.wait(10)
        yield from range(5)

    items = Started(stream())
    assert asked.wait(10)                 # before anyone called next()
    release.set()
    assert list(items) == [0, 1, 2, 3, 4]
    assert list(Started(iter(()))) == []


def test_started_raises_the_first_fetch_error_in_the_caller():
    def broken():
        raise OSError("s3://bucket/a.parquet: access denied")
        yield

    items = Started(broken())
    with pytest.raises(OSError, match="access denied"):
        next(items)
