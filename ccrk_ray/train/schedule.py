"""Step arithmetic of a run: learning-rate schedule, gradient accumulation, total optimiser steps.
Pure functions (no torch, no Ray), so configs are checked with them before anything starts."""

from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass
class PlateauSchedule:
    """NRCCR's per-epoch learning-rate schedule and early stop (the reference's trainer): after each
    validation, the LR is multiplied by ``decay`` (0.99); when the score did not improve and the LR
    has been held at least ``min_epochs`` (3) epochs since the last halving, it is also multiplied
    by ``plateau_factor`` (0.5); training stops once more than ``patience`` (10) consecutive
    epochs brought no improvement. The state is plain numbers (a checkpoint's progress holds it)."""
    decay: float = 0.99
    plateau_factor: float = 0.5
    min_epochs: int = 3
    patience: int = 10
    best: float | None = None
    since_change: int = 0
    without_gain: int = 0

    def after_epoch(self, score: float) -> tuple[float, bool, bool]:
        """(LR multiplier for the next epoch, this epoch is the best so far, stop now)."""
        improved = self.best is None or score > self.best
        if improved:
            self.best = score
        self.since_change += 1
        factor = self.decay
        if not improved and self.since_change >= self.min_epochs:
            factor *= self.plateau_factor
            self.since_change = 0
        self.without_gain = 0 if improved else self.without_gain + 1
        return factor, improved, self.without_gain > self.patience

    def state(self) -> dict:
        return {"best": self.best, "since_change": self.since_change, "without_gain": self.without_gain}

    def load(self, state: dict | None) -> None:
        if state:
            self.best, self.since_change, self.without_gain = state["best"], state["since_change"], state["without_gain"]
