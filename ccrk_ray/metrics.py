"""Retrieval metrics as pure numpy, free of Ray and torch.

Two entry points:

- ``retrieval_metrics(scores, owner)``: the standard report where every caption counts (a Q×G
  captions × items score matrix and the item each caption describes in, Recall@1/5/10, MedR,
  MeanR and mAP per direction and SumR out; ranks 1-based).
- ranks in, one number out (``recall_at_k``, ``mean_rank_variance``, ...): here a rank is
  0-based, 0 meaning the correct item was ranked first.

MRV with several captions per language (``item_ranks_for_mrv``): an item's text→image rank in a
language is the mean rank of its captions in that language, its image→text rank the best rank
among them (as image→text recall counts it); MRV is then the mean over items of the population
std of those ranks across the languages the item has captions in. With one caption per item and
language both are that caption's rank: the paper's definition.
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


# --- every caption counts: captions × items scores in, the standard report out -------------------

RECALL_KS = (1, 5, 10)


def _check_scores(scores, owner) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    owner = np.asarray(owner)
    if scores.ndim != 2 or owner.shape != (scores.shape[0],):
        raise ValueError(f"scores must be Q×G and owner of length Q, got {scores.shape} and {owner.shape}")
    if scores.shape[0] == 0:
        raise ValueError("no captions to rank")
    if not np.issubdtype(owner.dtype, np.integer) or owner.min() < 0 or owner.max() >= scores.shape[1]:
        raise ValueError(f"owner must give an item index in [0, {scores.shape[1]}) for every caption")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return scores, owner.astype(np.int64)


def own_at_or_above(values, owner) -> np.ndarray:
    """Per caption, how many *other* captions of the same item have a value >= its own (ties count:
    a tied caption of the same item is ranked with it)."""
    values = np.asarray(values, dtype=np.float64)
    owner = np.asarray(owner, dtype=np.int64)
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((values, owner))                 # by item, then value ascending
    so, sv = owner[order], values[order]
    pos = np.arange(len(order))
    run_start = np.maximum.accumulate(np.where(np.r_[True, (so[1:] != so[:-1]) | (sv[1:] != sv[:-1])], pos, 0))
    group_end = np.searchsorted(so, so, side="right")
    out = np.empty(len(order), dtype=np.int64)
    out[order] = group_end - run_start - 1
    return out


def caption_rivals(scores, owner) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three per-caption counts every report is reduced from (``metrics_from_rivals``), from a
    dense Q×G score matrix. For caption c of item o(c) with score s = scores[c, o(c)]:

    - ``t2i``: other items scoring >= s for c (its 0-based text→image rank, ties against it);
    - ``i2t``: captions of *other* items scoring >= s in item o(c)'s image→text list;
    - ``own``: other captions of o(c) scoring >= s there.

    Caption c then sits at place i2t + own + 1 of o(c)'s list, own + 1 of them relevant."""
    scores, owner = _check_scores(scores, owner)
    true = scores[np.arange(len(owner)), owner]
    t2i = (scores >= true[:, None]).sum(axis=1) - 1
    own = own_at_or_above(true, owner)
    i2t = np.empty(len(owner), dtype=np.int64)
    for item in np.unique(owner):
        mine = np.flatnonzero(owner == item)
        col = np.sort(scores[:, item])
        i2t[mine] = len(col) - np.searchsorted(col, true[mine], side="left") - own[mine] - 1
    return t2i.astype(np.int64), i2t, own


def item_best_and_ap(i2t, own, owner) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image→text per item with captions: (items, best 1-based rank, average precision). The best
    rank is 1 + the fewest other items' captions at or above one of its captions; AP the mean over
    its captions of (own + 1) / (i2t + own + 1), the precision at each caption's place."""
    i2t, own, owner = (np.asarray(a, dtype=np.int64) for a in (i2t, own, owner))
    items, inverse = np.unique(owner, return_inverse=True)
    best = np.full(len(items), np.iinfo(np.int64).max)
    np.minimum.at(best, inverse, i2t)
    precision = (own + 1.0) / (i2t + own + 1.0)
    ap = np.bincount(inverse, weights=precision) / np.bincount(inverse)
    return items, best + 1, ap


def metrics_from_rivals(t2i, i2t, own, owner) -> dict:
    """``retrieval_metrics`` from the per-caption counts of ``caption_rivals`` (or of the sharded
    eval actors, which compute the same counts without the score matrix)."""
    t2i = np.asarray(t2i, dtype=np.int64) + 1
    if len(t2i) == 0:
        raise ValueError("no captions to rank")
    _, best, ap = item_best_and_ap(i2t, own, owner)
    out = {"t2i": _direction(t2i, float(np.mean(1.0 / t2i))), "i2t": _direction(best, float(np.mean(ap)))}
    out["SumR"] = float(sum(out[d][f"R@{k}"] for d in ("t2i", "i2t") for k in RECALL_KS))
    return out


def retrieval_metrics(scores, owner) -> dict:
    """Recall@1/5/10, MedR, MeanR and mAP in both directions, and SumR, where every caption counts.

    ``scores`` is Q×G (captions × items, higher is better); ``owner`` gives, for each of the Q
    captions, the index of the item it describes. Text→image: every caption is a query, ranked by
    its own item's place among the G items. Image→text: every item with at least one caption is a
    query; it counts at the best-ranked of its captions among all Q captions (recall, MedR, MeanR),
    and its mAP is the average precision over all of its captions. Ties count against the query.
    Recall is in percent, MedR and MeanR 1-based, mAP a fraction in (0, 1], SumR the sum of the
    six recalls. With one caption per item this is the usual one-to-one protocol.
    """
    scores, owner = _check_scores(scores, owner)
    return metrics_from_rivals(*caption_rivals(scores, owner), owner)


def _direction(ranks: np.ndarray, m_ap: float) -> dict[str, float]:
    """One direction's block from 1-based ranks."""
    zero_based = ranks - 1
    out = {f"R@{k}": recall_at_k(zero_based, k) for k in RECALL_KS}
    out.update(MedR=median_rank(zero_based), MeanR=mean_rank(zero_based), mAP=m_ap)
    return out


def item_ranks_from_rivals(t2i, i2t, own, owner, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Per item (``num_items``), for one language: (text→image rank, image→text rank), 0-based,
    NaN for an item without a caption in the language. Text→image is the mean rank of the item's
    captions, image→text the best (see the module docstring)."""
    owner = np.asarray(owner, dtype=np.int64)
    counts = np.bincount(owner, minlength=num_items)
    sums = np.bincount(owner, weights=np.asarray(t2i, dtype=np.float64), minlength=num_items)
    t2i_item = np.full(num_items, np.nan)
    t2i_item[counts > 0] = sums[counts > 0] / counts[counts > 0]
    items, best, _ = item_best_and_ap(i2t, own, owner)
    i2t_item = np.full(num_items, np.nan)
    i2t_item[items] = best - 1.0
    return t2i_item, i2t_item


def item_ranks_for_mrv(scores, owner) -> tuple[np.ndarray, np.ndarray]:
    """``item_ranks_from_rivals`` of a dense Q×G score matrix. Stack languages as columns and pass
    each N×L matrix to ``mean_rank_variance``."""
    scores, owner = _check_scores(scores, owner)
    return item_ranks_from_rivals(*caption_rivals(scores, owner), owner, scores.shape[1])


def score_range(scores) -> tuple[float, float]:
    """(min, max) of a whole score matrix: the first pass of a fused evaluation over shards."""
    s = np.asarray(scores, dtype=np.float64)
    return float(s.min()), float(s.max())


def fuse_scores(native, translated, weight: float = 0.5, native_range: tuple[float, float] | None = None,
                translated_range: tuple[float, float] | None = None) -> np.ndarray:
    """NRCCR's test-time fusion of a native query's scores with its English translation's:
    ``weight·minmax(native) + (1 − weight)·minmax(translated)``, each min–max normalised over the
    whole query × gallery matrix (the reference's ``norm_score``). On shards, pass each matrix's
    global ``score_range`` (a first pass) so every shard is normalised alike."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fusion weight must be in [0, 1], got {weight}")
    a, b = np.asarray(native, dtype=np.float64), np.asarray(translated, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"native scores {a.shape} and translated scores {b.shape} differ in shape")

    def minmax(s, rng):
        lo, hi = rng if rng is not None else score_range(s)
        return (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)

    return weight * minmax(a, native_range) + (1.0 - weight) * minmax(b, translated_range)
