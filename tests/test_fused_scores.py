"""NRCCR's fused evaluation: min–max normalised native and translated scores, mixed."""

from __future__ import annotations

import numpy as np
import pytest

from ccrk_ray.metrics import fuse_scores, retrieval_metrics, score_range


def loop_metrics(scores, owner):
    """Straightforward per-query loops: rank = 1 + number of candidates scoring >= the correct
    one (ties against the query); image→text uses the best-ranked of the item's captions."""
    q, g = scores.shape
    t2i = [1 + sum(scores[i, j] >= scores[i, owner[i]] for j in range(g) if j != owner[i]) for i in range(q)]
    i2t = []
    for j in range(g):
        own = [i for i in range(q) if owner[i] == j]
        ranks = [1 + sum(scores[k, j] >= scores[i, j] for k in range(q) if k != i) for i in own]
        i2t.append(min(ranks))
    return np.array(t2i), np.array(i2t)


@pytest.mark.parametrize("seed", range(4))
def test_fused_scores_rank_as_a_loop_over_the_reference_formula(seed):
    rng = np.random.default_rng(seed)
    g = 7
    owner = np.concatenate([np.arange(g), rng.integers(0, g, 9)])       # every item has 1..n captions
    native, translated = rng.normal(size=(len(owner), g)), 3 * rng.normal(size=(len(owner), g)) + 5
    w = 0.5
    fused = fuse_scores(native, translated, w)
    # the reference's norm_score on errors (= −scores), by hand
    want = np.empty_like(native)
    for i in range(native.shape[0]):
        for j in range(g):
            a = (native[i, j] - native.min()) / (native.max() - native.min())
            b = (translated[i, j] - translated.min()) / (translated.max() - translated.min())
            want[i, j] = w * a + (1 - w) * b
    np.testing.assert_allclose(fused, want, atol=1e-12)
    t2i, i2t = loop_metrics(fused, owner)
    m = retrieval_metrics(fused, owner)
    assert m["t2i"]["R@1"] == pytest.approx(100 * np.mean(t2i <= 1))
    assert m["t2i"]["R@5"] == pytest.approx(100 * np.mean(t2i <= 5))
    assert m["t2i"]["MedR"] == pytest.approx(np.median(t2i))
    assert m["i2t"]["R@1"] == pytest.approx(100 * np.mean(i2t <= 1))
    assert m["i2t"]["MeanR"] == pytest.approx(np.mean(i2t))
    # weight 1 is the native query alone, 0 the translation alone (min–max keeps each one's order)
    assert retrieval_metrics(fuse_scores(native, translated, 1.0), owner) == retrieval_metrics(native, owner)
    assert retrieval_metrics(fuse_scores(native, translated, 0.0), owner) == retrieval_metrics(translated, owner)


def test_shards_normalised_by_the_global_range_equal_the_whole():
    rng = np.random.default_rng(5)
    native, translated = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) * 4
    whole = fuse_scores(native, translated, 0.3)
    ranges = score_range(native), score_range(translated)
    parts = [fuse_scores(native[s], translated[s], 0.3, *ranges) for s in (slice(0, 5), slice(5, 12))]
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-12)
    # without the first pass, a shard's own min/max would differ
    assert not np.allclose(fuse_scores(native[:5], translated[:5], 0.3), whole[:5])
    with pytest.raises(ValueError, match="weight must be in"):
        fuse_scores(native, translated, 1.5)
    with pytest.raises(ValueError, match="differ in shape"):
        fuse_scores(native, translated[:3])
