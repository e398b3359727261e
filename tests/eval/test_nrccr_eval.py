"""NRCCR's evaluation: the two-pass fused ranking against the dense fused matrix on random
multi-caption cases, and per-language reports with MRV over the common items against a direct
computation (a tiny model, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ccrk_ray.eval.nrccr import embed_split, evaluate_languages, fused_queries, language_report, rank_split
from ccrk_ray.eval.retrieval import Captions, score_ranges_sharded
from ccrk_ray.metrics import fuse_scores, item_ranks_for_mrv, mean_rank_variance, retrieval_metrics, score_range
from ccrk_ray.model.nrccr import NRCCRConfig, NRCCRModel


def split(ids, seed, captions=2, length=7):
    g = np.random.default_rng(seed)
    q = len(ids) * captions
    tokens = lambda: g.integers(5, 50, (q, length))  # noqa: E731
    return {"image_id": np.asarray(ids, dtype=object), "owner": np.repeat(np.arange(len(ids)), captions),
            "visual": g.normal(size=(len(ids), 1, 12)).astype(np.float32),
            "visual_mask": np.ones((len(ids), 1), dtype=np.int64),
            "native_ids": tokens(), "native_mask": np.ones((q, length), dtype=np.int64),
            "native_en_ids": tokens(), "native_en_mask": np.ones((q, length), dtype=np.int64)}


def test_languages_are_reported_and_mrv_covers_the_common_items():
    torch.manual_seed(0)
    model = NRCCRModel(NRCCRConfig(text_name_or_path=None, text_pretrained=False, train_layers=None,
                                   text_config=dict(model_type="bert", vocab_size=50, hidden_size=16,
                                                    num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=32, max_position_embeddings=16),
                                   text_hidden=16, text_heads=2, key_query_size=8, visual="vector", visual_dim=12,
                                   common_dim=24)).eval()
    de = split(["a", "b", "c", "d", "e"], 1)
    ja = split(["b", "c", "d", "e", "f", "g"], 2)
    ja["visual"][:4] = de["visual"][1:]                    # the same items, the same features
    report = evaluate_languages(model, {"de": de, "ja": ja}, weight=0.4)
    ranks = {}
    for lang, s in (("de", de), ("ja", ja)):
        emb = embed_split(model, s)
        fused = fuse_scores(emb["native"] @ emb["items"].T, emb["native_en"] @ emb["items"].T, 0.4)
        want = retrieval_metrics(fused, s["owner"])
        assert report["languages"][lang]["SumR"] == pytest.approx(want["SumR"])
        assert report["languages"][lang]["t2i"]["num_queries"] == 2 * len(s["image_id"])
        t2i, i2t = item_ranks_for_mrv(fused, s["owner"])
        ranks[lang] = {"t2i": dict(zip(s["image_id"], t2i)), "i2t": dict(zip(s["image_id"], i2t))}
    common = ["b", "c", "d", "e"]
    assert report["mrv"]["num_items"] == 4
    for d in ("t2i", "i2t"):
        matrix = [[ranks["de"][d][i], ranks["ja"][d][i]] for i in common]
        assert report["mrv"][d] == pytest.approx(mean_rank_variance(np.array(matrix)))
    assert report["mean"]["SumR"] == pytest.approx(np.mean([report["languages"][x]["SumR"] for x in ("de", "ja")]))


def multi_caption_case(seed, items=23, dim=8):
    """Random embeddings, 1..4 captions per item, owners shuffled; translated queries on another
    scale, so the two min–max ranges differ."""
    g = np.random.default_rng(seed)
    owner = np.concatenate([np.arange(items), g.integers(0, items, 2 * items)])
    owner = owner[g.permutation(len(owner))]
    return (g.normal(size=(items, dim)).astype(np.float32), g.normal(size=(len(owner), dim)).astype(np.float32),
            (3 * g.normal(size=(len(owner), dim)) + 1).astype(np.float32), owner)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("weight", [0.0, 0.3, 0.5, 1.0])
def test_two_pass_fused_ranking_equals_the_dense_fused_matrix(seed, weight):
    items, native, translated, owner = multi_caption_case(seed)
    s1, s2 = native.astype(np.float64) @ items.T.astype(np.float64), translated.astype(np.float64) @ items.T
    ranks = rank_split(items, native, translated, owner, weight)
    report = language_report(ranks, weight)
    dense = retrieval_metrics(fuse_scores(s1, s2, weight), owner)
    for d in ("t2i", "i2t"):
        for key, value in dense[d].items():
            assert report[d][key] == pytest.approx(value, abs=1e-9), (d, key)
    assert report["SumR"] == pytest.approx(dense["SumR"])
    assert report["native"] == retrieval_metrics(s1, owner)
    assert report["translated"] == retrieval_metrics(s2, owner)
    assert report["t2i"]["num_queries"] == len(owner) and report["i2t"]["num_queries"] == len(items)
    # MRV's per-item ranks too
    want_t2i, want_i2t = item_ranks_for_mrv(fuse_scores(s1, s2, weight), owner)
    got_t2i, got_i2t = ranks.matrices()
    np.testing.assert_allclose(got_t2i[:, 2], want_t2i)
    np.testing.assert_allclose(got_i2t[:, 2], want_i2t)


def test_fused_queries_score_as_the_fused_matrix_up_to_one_constant():
    items, native, translated, owner = multi_caption_case(7)
    s1, s2 = native.astype(np.float64) @ items.T, translated.astype(np.float64) @ items.T
    q = fused_queries(native, translated, 0.3, score_range(s1), score_range(s2))
    diff = fuse_scores(s1, s2, 0.3) - q.astype(np.float64) @ items.T
    assert np.ptp(diff) < 1e-5 and abs(diff.mean()) > 0.01           # a real constant, the same everywhere
    # a matrix without spread contributes nothing, as in fuse_scores
    flat = fused_queries(native, translated, 0.3, (1.0, 1.0), score_range(s2))
    np.testing.assert_allclose(flat, fused_queries(np.zeros_like(native), translated, 0.3, (0, 1), score_range(s2)))
    with pytest.raises(ValueError, match="fusion weight"):
        fused_queries(native, translated, 1.2, (0, 1), (0, 1))


def test_score_ranges_over_shards_equal_the_whole_matrix():
    items, native, translated, owner = multi_caption_case(3, items=40)
    m = len(owner)
    pair = Captions(np.concatenate([native, translated]), np.r_[owner, owner], [0, m, 2 * m], ("native", "translated"))
    for shards, chunk in ((1, None), (3, 16), (5, 16)):
        ranges = score_ranges_sharded(items, pair, num_shards=shards, chunk=chunk)
        assert ranges["native"] == pytest.approx(score_range(native.astype(np.float64) @ items.T), abs=1e-12)
        assert ranges["translated"] == pytest.approx(score_range(translated.astype(np.float64) @ items.T), abs=1e-12)
