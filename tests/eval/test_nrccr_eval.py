"""NRCCR's evaluation over several languages: per-language fused reports and MRV over the common
items, against a direct computation (a tiny model, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ccrk_ray.eval.nrccr import evaluate_languages, split_scores
from ccrk_ray.metrics import fuse_scores, item_ranks_for_mrv, mean_rank_variance, retrieval_metrics
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
        scores = split_scores(model, s)
        fused = fuse_scores(scores["native"], scores["translated"], 0.4)
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
