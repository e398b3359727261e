import numpy as np
import pytest

from ccrk_ray.eval.report import build_report, format_table
from ccrk_ray.eval.retrieval import rank_per_language
from ccrk_ray.metrics import ranks_from_scores


def dense_ranks(img, txt):
    """Straightforward reference: full score matrix per language, one query at a time."""
    n, k = txt.shape[:2]
    t2i, i2t = np.zeros((n, k), int), np.zeros((n, k), int)
    for lang in range(k):
        s = txt[:, lang] @ img.T
        for q in range(n):
            t2i[q, lang] = sum(1 for j in range(n) if j != q and s[q, j] >= s[q, q])
            i2t[q, lang] = sum(1 for j in range(n) if j != q and s.T[q, j] >= s.T[q, q])
    return t2i, i2t


def test_chunked_ranks_equal_dense_reference_with_ties():
    rng = np.random.default_rng(0)
    img = rng.integers(-2, 3, size=(30, 4)).astype(np.float32)      # small integers: many exact ties
    txt = rng.integers(-2, 3, size=(30, 3, 4)).astype(np.float32)
    ref = dense_ranks(img, txt)
    for chunk in (1, 7, 4096):
        got = rank_per_language(img, txt, chunk=chunk)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])


def test_perfect_and_inconsistent_models():
    n, k = 20, 3
    img = np.eye(n, dtype=np.float32)
    txt = np.repeat(img[:, None, :], k, axis=1)
    t2i, i2t = rank_per_language(img, txt)
    assert t2i.max() == 0 and i2t.max() == 0
    report = build_report(t2i, i2t, ["en", "de", "fr"])
    assert report["languages"]["de"]["t2i"]["R@1"] == 100.0
    assert report["mrv"] == {"t2i": 0.0, "i2t": 0.0}
    # language 'fr' points every caption at the next image: recall drops and ranks disagree
    txt[:, 2] = np.roll(img, 1, axis=0)
    t2i, i2t = rank_per_language(img, txt)
    report = build_report(t2i, i2t, ["en", "de", "fr"])
    assert report["languages"]["fr"]["t2i"]["R@1"] == 0.0
    assert report["languages"]["en"]["t2i"]["R@1"] == 100.0
    assert report["mrv"]["t2i"] > 0


def test_report_contract_shape():
    rng = np.random.default_rng(1)
    t2i, i2t = rng.integers(0, 50, (50, 2)), rng.integers(0, 50, (50, 2))
    report = build_report(t2i, i2t, ["zh", "en"])
    assert report["num_images"] == 50
    for lang in ("zh", "en"):
        for d in ("t2i", "i2t"):
            m = report["languages"][lang][d]
            assert {"R@1", "R@5", "R@10", "chance@1", "chance@5", "chance@10"} <= set(m)
            assert (m["chance@1"], m["chance@5"], m["chance@10"]) == (2.0, 10.0, 20.0)
    assert report["languages"]["en"]["t2i"]["R@10"] == pytest.approx(100 * np.mean(t2i[:, 1] < 10))
    assert set(report["mrv"]) == {"t2i", "i2t"}
    assert report["mrv"]["i2t"] == pytest.approx(np.mean(np.std(i2t, axis=1)))
    table = format_table(report)
    assert "zh" in table and "MRV" in table and "(20.0)" in table
    with pytest.raises(ValueError, match="do not match"):
        build_report(t2i, i2t, ["zh"])
