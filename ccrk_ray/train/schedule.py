"""Step arithmetic of a run: learning-rate schedule, gradient accumulation, total optimiser steps.
Pure functions (no torch, no Ray), so configs are checked with them before anything starts."""

from __future__ import annotations

import math
from typing import Callable, Sequence

SCHEDULES = ("cosine", "linear")


def lr_factor(warmup_steps: int, total_steps: int, schedule: str = "cosine") -> Callable[[int], float]:
    """LR multiplier per optimiser step: linear warm-up, then cosine or linear decay to 0."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be 'cosine' or 'linear', got {schedule!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return factor


def accumulation(global_batch: int, batch: int, world: int) -> int:
    """Micro-batches per optimiser step so that ``batch`` × ``world`` × it = ``global_batch``."""
    if global_batch % (batch * world):
        raise ValueError(f"global_batch_size {global_batch} is not a multiple of batch_size {batch} x "
                         f"{world} workers")
    return global_batch // (batch * world)


def total_steps(row_groups: Sequence[Sequence[int]], global_batch: int, epochs: int,
                max_steps: int | None = None, passes: int = 1) -> int:
    """Optimiser steps of the run: full global batches per epoch (of ``passes`` passes over the
    rows) × epochs, capped by max_steps."""
    per_epoch = sum(map(sum, row_groups)) * int(passes) // int(global_batch)
    if per_epoch < 1:
        raise ValueError(f"the training data makes no full global batch of {global_batch}")
    steps = per_epoch * int(epochs)
    return min(steps, int(max_steps)) if max_steps else steps


def warmup_steps(warmup: float, steps: int) -> int:
    """``warmup`` as optimiser steps: a fraction of the run when < 1, else a count; at most half."""
    return min(int(warmup * steps) if warmup < 1 else int(warmup), steps // 2)
