import math

import numpy as np
import pytest

from ccrk_ray.eval.metrics import (chance_recall_at_k, mean_rank, mean_rank_variance, median_rank,
                              ranks_from_scores, recall_at_k)


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
