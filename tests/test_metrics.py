import math

import numpy as np
import pytest

from ccrk_ray.metrics import (chance_recall_at_k, item_ranks_for_mrv, mean_rank, mean_rank_variance, median_rank,
                              ranks_from_scores, recall_at_k, retrieval_metrics)


def test_mrv_hand_computed():
    ranks = np.array([[0, 0, 0], [0, 2, 4], [1, 3, 1]])
    # row stds: 0, sqrt(8/3), sqrt(8/9)
    expected = (0 + math.sqrt(8 / 3) + math.sqrt(8 / 9)) / 3
    assert mean_rank_variance(ranks) == pytest.approx(expected)
    assert mean_rank_variance([[5, 5], [2, 2]]) == 0.0


def test_mrv_needs_two_languages_and_a_matrix():
    with pytest.raises(ValueError, match="at least 2 languages"):
        mean_rank_variance(np.zeros((4, 1), dtype=int))
    with pytest.raises(ValueError, match="N×K"):
        mean_rank_variance(np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match=">= 0"):
        mean_rank_variance([[0, -1]])


def test_recall_at_k():
    ranks = np.array([0, 1, 4, 9, 10, 50])
    assert recall_at_k(ranks, 1) == pytest.approx(100 / 6)
    assert recall_at_k(ranks, 5) == pytest.approx(300 / 6)
    assert recall_at_k(ranks, 10) == pytest.approx(400 / 6)
    with pytest.raises(ValueError):
        recall_at_k(ranks, 0)


def test_chance_and_rank_summaries():
    assert chance_recall_at_k(500, 10) == pytest.approx(2.0)
    assert chance_recall_at_k(5, 10) == 100.0
    assert median_rank([0, 1, 2, 9]) == 2.5
    assert mean_rank([0, 1, 2, 9]) == 4.0


def test_ranks_from_scores_counts_ties_against_the_query():
    scores = np.array([[0.9, 0.1, 0.5],
                       [0.3, 0.3, 0.3],     # all tied: worst rank, not a free hit
                       [0.2, 0.7, 0.7]])    # tie with one other
    correct = np.array([0, 1, 2])
    np.testing.assert_array_equal(ranks_from_scores(scores, correct), [0, 2, 1])


def test_random_scores_give_chance_recall():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4000, 100))
    ranks = ranks_from_scores(scores, rng.integers(0, 100, size=4000))
    assert recall_at_k(ranks, 10) == pytest.approx(chance_recall_at_k(100, 10), abs=1.5)


# --- retrieval_metrics: every caption counts ------------------------------------------------------

def loop_metrics(scores: np.ndarray, owner: np.ndarray) -> dict:
    """The definition written out as plain loops over queries (the reference for the vectorised one)."""
    q, g = scores.shape
    t2i, t2i_ap = [], []
    for c in range(q):
        rank = 1 + sum(1 for j in range(g) if j != owner[c] and scores[c, j] >= scores[c, owner[c]])
        t2i.append(rank)
        t2i_ap.append(1.0 / rank)
    i2t, i2t_ap = [], []
    for item in range(g):
        own = [c for c in range(q) if owner[c] == item]
        if not own:
            continue
        top = max(scores[c, item] for c in own)
        i2t.append(1 + sum(1 for c in range(q) if owner[c] != item and scores[c, item] >= top))
        precisions = []
        for c in own:
            at_or_above = [d for d in range(q) if scores[d, item] >= scores[c, item]]
            precisions.append(sum(1 for d in at_or_above if owner[d] == item) / len(at_or_above))
        i2t_ap.append(sum(precisions) / len(precisions))
    out = {}
    for name, ranks, aps in (("t2i", t2i, t2i_ap), ("i2t", i2t, i2t_ap)):
        ranks = sorted(ranks)
        n = len(ranks)
        median = ranks[n // 2] if n % 2 else (ranks[n // 2 - 1] + ranks[n // 2]) / 2
        out[name] = {**{f"R@{k}": 100.0 * sum(r <= k for r in ranks) / n for k in (1, 5, 10)},
                     "MedR": median, "MeanR": sum(ranks) / n, "mAP": sum(aps) / n}
    out["SumR"] = sum(out[d][f"R@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_retrieval_metrics_equals_the_loop_definition(seed):
    """Uneven caption counts (0 to 6 per item), shuffled owners, and coarse scores so ties occur."""
    rng = np.random.default_rng(seed)
    g = int(rng.integers(3, 30))
    counts = rng.integers(0, 7, size=g)
    counts[rng.integers(g)] = max(1, counts.max())
    owner = rng.permutation(np.repeat(np.arange(g), counts))
    scores = np.round(rng.normal(size=(len(owner), g)), 1)         # ties on purpose
    scores[np.arange(len(owner)), owner] += rng.uniform(0, 1.5, size=len(owner))
    got, want = retrieval_metrics(scores, owner), loop_metrics(scores, owner)
    for d in ("t2i", "i2t"):
        assert got[d] == pytest.approx(want[d], abs=1e-12), d
    assert got["SumR"] == pytest.approx(want["SumR"])


def test_retrieval_metrics_hand_computed():
    # 2 items; item 0 has captions 0 and 1, item 1 has caption 2
    scores = np.array([[0.9, 0.1],     # caption 0 (item 0): rank 1
                       [0.2, 0.5],     # caption 1 (item 0): item 1 scores higher -> rank 2
                       [0.3, 0.3]])    # caption 2 (item 1): a tie counts against it -> rank 2
    m = retrieval_metrics(scores, [0, 0, 1])
    assert m["t2i"]["R@1"] == pytest.approx(100 / 3) and m["t2i"]["MeanR"] == pytest.approx(5 / 3)
    assert m["t2i"]["MedR"] == 2 and m["t2i"]["mAP"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    # item 0 ranks captions 0 (0.9), 2 (0.3), 1 (0.2): best rank 1; AP = (1/1 + 2/3) / 2
    # item 1 ranks captions 1 (0.5), 2 (0.3), 0 (0.1): its caption at rank 2; AP = 1/2
    assert m["i2t"]["R@1"] == 50.0 and m["i2t"]["MeanR"] == 1.5 and m["i2t"]["MedR"] == 1.5
    assert m["i2t"]["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)
    assert m["SumR"] == pytest.approx(100 / 3 + 2 * 100 + 50 + 2 * 100)
    # one caption per item: the usual one-to-one numbers
    one = retrieval_metrics(np.eye(4) + 0.1, np.arange(4))
    assert one["t2i"] == one["i2t"] == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "MedR": 1.0, "MeanR": 1.0,
                                        "mAP": 1.0}
    flat = retrieval_metrics(np.zeros((3, 3)), np.arange(3))         # all tied: the worst rank, no free hit
    assert flat["t2i"]["MedR"] == 3 and flat["i2t"]["R@1"] == 0.0


def test_retrieval_metrics_refuses_bad_input():
    with pytest.raises(ValueError, match="Q×G"):
        retrieval_metrics(np.zeros((3, 2)), [0, 1])
    with pytest.raises(ValueError, match=r"item index in \[0, 2\)"):
        retrieval_metrics(np.zeros((2, 2)), [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.full((1, 1), np.nan), [0])


def test_mrv_with_several_captions_reduces_to_the_paper_with_one():
    rng = np.random.default_rng(7)
    n = 12
    one = [rng.normal(size=(n, n)) for _ in range(3)]          # 3 languages, one caption per item
    per_lang = [item_ranks_for_mrv(s, np.arange(n)) for s in one]
    t2i = np.stack([t for t, _ in per_lang], axis=1)
    i2t = np.stack([i for _, i in per_lang], axis=1)
    # the paper's: each caption's 0-based rank, std across languages, mean over items
    paper_t2i = np.stack([ranks_from_scores(s, np.arange(n)) for s in one], axis=1)
    paper_i2t = np.stack([ranks_from_scores(s.T, np.arange(n)) for s in one], axis=1)
    assert mean_rank_variance(t2i) == pytest.approx(mean_rank_variance(paper_t2i))
    assert mean_rank_variance(i2t) == pytest.approx(mean_rank_variance(paper_i2t))
    # several captions: t2i is the mean of the item's caption ranks, i2t the best; an item with no
    # caption in the language is NaN there (MRV over its other languages)
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.5, 0.0], [0.3, 0.4, 0.8]])
    t, i = item_ranks_for_mrv(scores, [0, 0, 2])
    assert t[0] == pytest.approx((0 + 1) / 2) and np.isnan(t[1]) and t[2] == 0
    assert i[0] == 0 and np.isnan(i[1]) and i[2] == 0
