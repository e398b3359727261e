import numpy as np
import pytest

from ccrk_ray.eval.report import build_report, format_table
from ccrk_ray.eval.retrieval import rank_sharded


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
        got = rank_sharded(img, txt, chunk=chunk).matrices()
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])


def test_perfect_and_inconsistent_models():
    n, k = 20, 3
    img = np.eye(n, dtype=np.float32)
    txt = np.repeat(img[:, None, :], k, axis=1)
    t2i, i2t = rank_sharded(img, txt).matrices()
    assert t2i.max() == 0 and i2t.max() == 0
    report = build_report(t2i, i2t, ["en", "de", "fr"])
    assert report["languages"]["de"]["t2i"]["R@1"] == 100.0
    assert report["mrv"] == {"t2i": 0.0, "i2t": 0.0}
    # language 'fr' points every caption at the next image: recall drops and ranks disagree
    txt[:, 2] = np.roll(img, 1, axis=0)
    t2i, i2t = rank_sharded(img, txt).matrices()
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


def test_sumr_rmean_and_map():
    t2i = np.array([[0, 0], [1, 3], [20, 0]])
    i2t = np.zeros((3, 2), dtype=int)
    report = build_report(t2i, i2t, ["en", "de"])
    en = report["languages"]["en"]
    assert en["t2i"]["mAP"] == pytest.approx((1 + 1 / 2 + 1 / 21) / 3)      # a fraction
    expected_sumr = (100 / 3 + 200 / 3 + 200 / 3) + 300
    assert en["SumR"] == pytest.approx(expected_sumr) and en["r_mean"] == pytest.approx(expected_sumr / 6)


def test_topk_candidates_refuses_k_beyond_the_gallery():
    from ccrk_ray.eval.retrieval import topk_candidates

    scores = np.random.default_rng(4).normal(size=(20, 30))
    assert topk_candidates(scores, 5).shape == (20, 5)
    with pytest.raises(ValueError, match="k_test=31"):
        topk_candidates(scores, 31)


def test_two_stage_equals_itc_when_itm_agrees_and_fixes_a_bad_shortlist_order():
    """evaluate_in_process with a model whose ITM score is a function we control."""
    from ccrk_ray.data.transforms import split_from_batch
    from ccrk_ray.eval.retrieval import evaluate_in_process
    from tests.eval.toy import D as d
    from tests.eval.toy import ToyTwoStage as Toy

    n, k = 6, 2

    # images: one-hot-ish ids; captions: the same ids (ITC dot products favour large ids, ITM is exact)
    ids = np.arange(1, n + 1, dtype=np.float32)
    pixels = np.repeat(ids[:, None], d, axis=1).reshape(n, 1, 1, d)
    batch = {"pixel_values": pixels, "input_ids": np.repeat(ids[:, None, None], k, 1).astype(np.int64),
             "attention_mask": np.ones((n, k, 1), dtype=np.int64)}
    split = split_from_batch(batch, ["a", "b"])
    itc_t2i, _ = evaluate_in_process(Toy(), split, k_test=None).matrices()
    assert itc_t2i[:, 0].tolist() != [0] * n            # dot products rank the largest id first
    t2i, i2t = evaluate_in_process(Toy(), split, k_test=n).matrices()
    assert t2i.max() == 0 and i2t.max() == 0            # ITM re-ranking puts every match first


def test_several_captions_per_image_best_rank_and_chance():
    from ccrk_ray.eval.report import report_from_ranks
    from ccrk_ray.eval.retrieval import Captions
    from ccrk_ray.metrics import chance_recall_at_k

    # 3 images on axes; language A: image 0 has captions [good, bad], image 1 one good, image 2 none;
    # language B: one caption each, image 1's pointing at image 2
    img = np.eye(3, dtype=np.float32)
    a = np.array([[1, 0, 0], [0, 0.25, 0.75], [0, 1, 0]], dtype=np.float32)
    b = np.array([[1, 0, 0], [0, 0.25, 0.75], [0, 0, 1]], dtype=np.float32)
    caps = Captions(np.concatenate([a, b]), [0, 0, 1, 0, 1, 2], [0, 3, 6], ["A", "B"])
    ranks = rank_sharded(img, caps)
    ra = ranks.languages["A"]
    assert ra.t2i.tolist() == [0, 1, 0]          # A's gallery is images 0 and 1: the bad caption ranks 1 above
    assert ra.i2t.tolist() == [0, 1, 0] and ra.own.tolist() == [0, 1, 0]
    rep = report_from_ranks(ranks)
    m = rep["languages"]["A"]
    assert m["t2i"]["R@1"] == pytest.approx(200 / 3) and m["i2t"]["R@1"] == 100.0
    assert (m["t2i"]["num_queries"], m["t2i"]["num_candidates"], m["i2t"]["num_queries"],
            m["i2t"]["num_candidates"]) == (3, 2, 2, 3)
    # image 0 ranks its captions at places 1 and 3 (image 1's caption between): AP (1 + 2/3) / 2
    assert m["i2t"]["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    # image→text chance with 2 relevant of 3 (image 0) and 1 of 3 (image 1), averaged
    assert m["i2t"]["chance@1"] == pytest.approx((chance_recall_at_k(3, 1, 2) + chance_recall_at_k(3, 1)) / 2)
    assert m["t2i"]["chance@1"] == 50.0
    # MRV: t2i per image = mean over its captions: A -> [0.5, 0, nan], B -> [0, 1, 0]
    expected = np.mean([np.std([0.5, 0]), np.std([0, 1])])     # image 2 has one language only: left out
    assert rep["mrv"]["t2i"] == pytest.approx(expected)


def test_embedding_under_autocast_stays_close_to_fp32_and_names_are_checked(tmp_path):
    import torch

    from ccrk_ray.eval.retrieval import Embedder
    from ccrk_ray.model import CCRKModel, ModelConfig
    from tests.conftest import tiny_text_config

    torch.manual_seed(0)
    model_dir = CCRKModel(ModelConfig(vision_name="resnet10t", text_config=tiny_text_config(100),
                                      embed_dim=16)).save_pretrained(tmp_path / "m")
    g = torch.Generator().manual_seed(1)
    batch = {"pixel_values": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g).numpy(),
             "input_ids": torch.randint(3, 100, (4, 2, 8), generator=g).numpy(),
             "attention_mask": np.ones((4, 2, 8), dtype=np.int64), "image_id": np.array(list("abcd"), dtype=object)}
    exact = Embedder(model_dir, device="cpu")(batch)
    for precision in ("amp_bf16", "bf16"):
        low = Embedder(model_dir, device="cpu", precision=precision)(batch)
        assert low["image_emb"].dtype == np.float32
        for key in ("image_emb", "text_emb"):
            cosine = (low[key] * exact[key]).sum(-1)
            assert cosine.min() > 0.98 and not np.array_equal(low[key], exact[key]), (precision, key)
    with pytest.raises(ValueError, match="precision must be one of fp32, amp_bf16"):
        Embedder(model_dir, device="cpu", precision="half")


def test_embedding_actors_reserve_one_gpu_each_on_a_gpu_cluster():
    from ccrk_ray.eval.actors import embedding_placement

    assert embedding_placement(0, 3) == (3, 0, "cpu")          # CPUs only
    assert embedding_placement(8, 3) == (3, 1, "cuda")         # one GPU each, Ray picks which
    assert embedding_placement(2, 4) == (2, 1, "cuda")         # never two actors on one GPU
