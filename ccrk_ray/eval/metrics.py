"""Retrieval metrics as pure numpy: ranks in, numbers out.

A rank is 0-based: 0 means the correct item was ranked first.
"""

from __future__ import annotations

import numpy as np


def _ranks_array(ranks) -> np.ndarray:
    arr = np.asarray(ranks)
    if arr.size == 0:
        raise ValueError("no ranks given")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError("ranks must be whole numbers")
    if np.any(arr < 0):
        raise ValueError("ranks must be >= 0 (0 = correct item ranked first)")
    return arr


def recall_at_k(ranks, k: int) -> float:
    """Percent of queries whose correct item ranks within the top ``k`` (rank < k)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    arr = _ranks_array(ranks)
    return float(100.0 * np.mean(arr < k))


def chance_recall_at_k(num_candidates: int, k: int, num_relevant: int = 1) -> float:
    """Expected Recall@k in percent of a random ranking, with ``num_relevant`` correct items among
    ``num_candidates``: 1 − C(C−r, k) / C(C, k) (k/C for one correct item)."""
    if num_candidates < 1:
        raise ValueError(f"need at least one candidate, got {num_candidates}")
    if not 1 <= num_relevant <= num_candidates:
        raise ValueError(f"num_relevant must be in [1, {num_candidates}], got {num_relevant}")
    k = min(k, num_candidates)
    if num_relevant == 1:
        return float(100.0 * k / num_candidates)
    miss = 1.0
    for j in range(k):          # probability that none of the k drawn is relevant
        miss *= max(0.0, (num_candidates - num_relevant - j) / (num_candidates - j))
    return float(100.0 * (1.0 - miss))


def mean_rank_variance(ranks) -> float:
    """MRV: mean over instances of the population std (ddof=0) of the rank across languages.

    ``ranks`` is N×K (instance × language). 0 for a model whose every language agrees on every
    instance's rank; grows when languages disagree. NaN marks a language an instance has no
    caption in: such an instance's std is over its other languages, and instances with fewer than
    2 languages are left out.
    """
    arr = np.asarray(ranks, dtype=np.float64)
    if np.isnan(arr).any():
        if arr.ndim != 2 or arr.shape[1] < 2:
            raise ValueError(f"ranks must be N×K with K >= 2, got shape {arr.shape}")
        present = (~np.isnan(arr)).sum(axis=1) >= 2
        if not present.any():
            raise ValueError("no instance has ranks in at least 2 languages")
        if np.nanmin(arr) < 0:
            raise ValueError("ranks must be >= 0 (0 = correct item ranked first)")
        return float(np.mean(np.nanstd(arr[present], axis=1, ddof=0)))
    arr = _ranks_array(ranks)
    if arr.ndim != 2:
        raise ValueError(f"ranks must be N×K (instance × language), got shape {arr.shape}")
    if arr.shape[1] < 2:
        raise ValueError(f"MRV needs at least 2 languages, got {arr.shape[1]}")
    return float(np.mean(np.std(arr.astype(np.float64), axis=1, ddof=0)))


def median_rank(ranks) -> float:
    """MedR, 1-based as is usual in the literature (1 = correct item first)."""
    return float(np.median(_ranks_array(ranks)) + 1)


def mean_rank(ranks) -> float:
    """MeanR, 1-based."""
    return float(np.mean(_ranks_array(ranks)) + 1)


def ranks_from_scores(scores: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """0-based rank of each query's correct candidate, ties counted against the query.

    ``scores`` is Q×C (query × candidate), ``correct`` the candidate index of each query. The rank
    is the number of *other* candidates scoring >= the correct one (pessimistic ties), so a model
    that scores everything equal gets the worst rank, never a free hit. Deterministic.
    """
    scores = np.asarray(scores)
    correct = np.asarray(correct, dtype=np.int64)
    if scores.ndim != 2 or correct.shape != (scores.shape[0],):
        raise ValueError(f"scores must be Q×C and correct of length Q, got {scores.shape}, {correct.shape}")
    true = scores[np.arange(scores.shape[0]), correct][:, None]
    return (scores >= true).sum(axis=1).astype(np.int64) - 1


def mean_average_precision(ranks) -> float:
    """mAP in percent for queries with one relevant item: mean of 1 / (rank + 1)."""
    return float(100.0 * np.mean(1.0 / (_ranks_array(ranks).astype(np.float64) + 1.0)))
