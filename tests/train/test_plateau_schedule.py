"""NRCCR's per-epoch schedule against a step-by-step replay of the reference trainer's counters."""

from __future__ import annotations

import pytest

from ccrk_ray.train.schedule import PlateauSchedule


def reference(scores, lr=1e-4, decay=0.99):
    """The reference trainer's loop, transcribed: lr_counter / no_impr_counter as it keeps them."""
    best, lr_counter, no_impr, lrs, stopped = 0.0, 0, 0, [], None
    for epoch, rsum in enumerate(scores):
        is_best = rsum > best
        best = max(rsum, best)
        lr_counter += 1
        lr *= decay
        if not is_best and lr_counter > 2:
            lr *= 0.5
            lr_counter = 0
        no_impr = 0 if is_best else no_impr + 1
        lrs.append(lr)
        if no_impr > 10:
            stopped = epoch
            break
    return lrs, stopped


@pytest.mark.parametrize("scores", [
    [10, 20, 30, 25, 24, 23, 22, 40, 39, 38, 37, 36, 35],
    [5] + [4] * 20,
    [1, 2, 3, 4, 5, 6],
])
def test_the_schedule_replays_the_reference(scores):
    want_lrs, want_stop = reference(scores)
    s, lr, lrs, stop_at = PlateauSchedule(), 1e-4, [], None
    for epoch, score in enumerate(scores):
        factor, _, stop = s.after_epoch(score)
        lr *= factor
        lrs.append(lr)
        if stop:
            stop_at = epoch
            break
    assert lrs == pytest.approx(want_lrs, rel=1e-12) and stop_at == want_stop


def test_the_state_round_trips_mid_run():
    a = PlateauSchedule()
    for score in (3, 2, 1):
        a.after_epoch(score)
    b = PlateauSchedule()
    b.load(a.state())
    assert [a.after_epoch(x) for x in (0, 5, 4)] == [b.after_epoch(x) for x in (0, 5, 4)]
    assert PlateauSchedule().after_epoch(0.0)[1]          # the first epoch is the best so far
