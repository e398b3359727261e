"""Re-scorers the eval-actor tests send to actors. They live in a numpy-only module because an
actor unpickling one imports its module: the test module itself pulls in torch, timm and the
model (~11 s per actor on a quiet core, much more beside a training job)."""

import numpy as np


class ItmTable:
    """A re-scorer from a fixed caption × image table."""

    def __init__(self, table: np.ndarray):
        self.table = table

    def __call__(self, direction, queries, cand):
        t = self.table
        return t[queries[:, None], cand] if direction == "t2i" else t[cand, queries[:, None]]


class Boom:
    """A re-scorer that fails on its first call, as one whose features are missing would."""

    def __call__(self, direction, queries, candidates):
        raise ValueError(f"ITM features missing for {direction}")
