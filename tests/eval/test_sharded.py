"""Sharded ranking (what each eval actor runs), without Ray: equal to the dense computation."""

import numpy as np
import pytest

from ccrk_ray.data.transforms import split_from_batch
from ccrk_ray.eval.retrieval import (Captions, ItmRescorer, LanguageView, Task, check_inputs, default_chunk,
                                     encode_split, rank_sharded, rank_task, shard_bounds, topk_candidates,
                                     topk_indices, true_scores)
from ccrk_ray.metrics import ranks_from_scores
from tests.eval.test_every_caption import assert_ranks_equal, dense_two_stage
from tests.eval.test_retrieval import dense_ranks
from tests.eval.toy import ToyTwoStage, toy_batch


def planted_ties(n=70, k=3, d=6, seed=0):
    """Random embeddings of quarter-integers (every score exact in float32), with planted ties: a
    duplicated image, captions equal to another image's, and a language whose captions repeat."""
    rng = np.random.default_rng(seed)
    img = rng.integers(-4, 5, size=(n, d)).astype(np.float32) / 4
    txt = rng.integers(-4, 5, size=(n, k, d)).astype(np.float32) / 4
    img[9] = img[5]                        # two identical images: their captions tie on both
    txt[20:30, 0] = img[40:50]             # captions that describe another image exactly as well
    txt[::2, 2] = txt[1::2, 2]             # a language where pairs of images share one caption
    return img, txt


def strict_ranks(img, txt):
    """Optimistic reference (only strictly better candidates count): differs wherever ties matter."""
    n, k = txt.shape[:2]
    out = np.zeros((n, k), int)
    for lang in range(k):
        s = txt[:, lang] @ img.T
        out[:, lang] = (s > s.diagonal()[:, None]).sum(1)
    return out


def dense32_ranks(img, txt):
    """A dense float32 ranking, as the original code does: one score matrix per language."""
    n, k = txt.shape[:2]
    rows = np.arange(n)
    t2i, i2t = np.empty((n, k), np.int64), np.empty((n, k), np.int64)
    for lang in range(k):
        t2i[:, lang] = ranks_from_scores(txt[:, lang] @ img.T, rows)
        i2t[:, lang] = ranks_from_scores(img @ txt[:, lang].T, rows)
    return t2i, i2t


def test_sharded_equals_dense_reference_with_planted_ties():
    img, txt = planted_ties()
    ref = dense_ranks(img, txt)
    assert (strict_ranks(img, txt) != ref[0]).sum() > 20       # the planted ties change many ranks
    np.testing.assert_array_equal(dense32_ranks(img, txt)[0], ref[0])
    for num_shards in (1, 2, 3, 5):
        for chunk, tile in ((16, None), (32, 7), (16, 16), (4096, 64)):
            t2i, i2t = rank_sharded(img, txt, num_shards=num_shards, chunk=chunk, tile=tile).matrices()
            msg = f"{num_shards} shards, chunk {chunk}, tile {tile}"
            np.testing.assert_array_equal(t2i, ref[0], err_msg=msg)
            np.testing.assert_array_equal(i2t, ref[1], err_msg=msg)


def float64_dense_ranks(img, txt):
    img64, txt64 = img.astype(np.float64), txt.astype(np.float64)
    cols = [(ranks_from_scores(txt64[:, j] @ img64.T, np.arange(len(img))),
             ranks_from_scores(img64 @ txt64[:, j].T, np.arange(len(img)))) for j in range(txt.shape[1])]
    return np.stack([c[0] for c in cols], 1), np.stack([c[1] for c in cols], 1)


def test_float_ranks_are_exact_for_any_shard_layout_and_chunk():
    """General float data with planted near-ties (below float32 resolution): the ranks follow the
    exact scores, whatever the shards and chunk size; a float32 dense computation gets them wrong."""
    rng = np.random.default_rng(3)
    img = rng.standard_normal((300, 32)).astype(np.float32)
    txt = (img[:, None] + 1.5 * rng.standard_normal((300, 4, 32))).astype(np.float32)
    for a, b in [(3, 7), (40, 41), (100, 250), (299, 0)]:
        img[b] = img[a]
        j = int(np.argmax(np.abs(txt[a, 0])))            # nudge image b's coordinate that matters most
        img[b, j] = np.nextafter(img[a, j], -np.inf if txt[a, 0, j] > 0 else np.inf)   # exactly a bit worse
    ref = float64_dense_ranks(img, txt)
    assert 0 < ref[0].mean() < 150                                   # neither trivial nor random
    for num_shards, chunk, tile in [(1, 32, None), (4, 32, 50), (10, 32, 7), (3, 16, 64), (1, 512, 300), (2, 64, 1)]:
        got = rank_sharded(img, txt, num_shards=num_shards, chunk=chunk, tile=tile).matrices()
        np.testing.assert_array_equal(got[0], ref[0], err_msg=f"{num_shards} shards, chunk {chunk}")
        np.testing.assert_array_equal(got[1], ref[1], err_msg=f"{num_shards} shards, chunk {chunk}")
    # float32 scores cannot tell the nudged image from the original: a dense float32 ranking
    # counts it as a tie against caption a, the exact one does not
    dense32 = dense32_ranks(img, txt)
    assert [dense32[0][a, 0] - ref[0][a, 0] for a in (3, 40, 100, 299)] == [1, 1, 1, 1]


def test_query_languages_pick_and_order_columns():
    img, txt = planted_ties()
    full = rank_sharded(img, txt, languages=["en", "de", "fr"], chunk=16, num_shards=2).matrices()
    some = rank_sharded(img, txt, languages=["en", "de", "fr"], query_languages=["fr", "en"], chunk=16,
                        num_shards=3)
    assert list(some.languages) == ["fr", "en"]
    some = some.matrices()
    np.testing.assert_array_equal(some[0], full[0][:, [2, 0]])
    np.testing.assert_array_equal(some[1], full[1][:, [2, 0]])


def test_topk_indices_are_the_stable_topk_sets_under_ties():
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 4, size=(50, 40)).astype(np.float32)      # ties everywhere
    for k in (1, 3, 10, 40):
        got = np.sort(topk_indices(scores, k), axis=1)
        np.testing.assert_array_equal(got, np.sort(topk_candidates(scores, k), axis=1))
    with pytest.raises(ValueError, match="k_test=41"):
        topk_indices(scores, 41)


def toy_setup(n=40, k=2, seed=1):
    rng = np.random.default_rng(seed)
    return toy_batch(rng.integers(1, 9, n), rng.integers(1, 9, (n, k)))     # repeated ids: ties in both stages


@pytest.mark.parametrize("k_test", [1, 3, 40])
def test_two_stage_with_the_itm_rescorer_equals_the_dense_definition(k_test):
    """The toy model's ITM head through ``ItmRescorer`` (global caption and image indices) gives the
    dense two-stage ranks: ITM = −|caption id − image id|."""
    batch = toy_setup()
    split = split_from_batch(batch, ["a", "b"])
    feats = encode_split(ToyTwoStage(), split)
    rescore = ItmRescorer(ToyTwoStage(), feats["image_tokens"], feats["text_hidden"], feats["text_mask"])
    image_id = batch["pixel_values"][:, 0, 0, 0].astype(np.float64)
    caption_id = split["input_ids"][:, 0].astype(np.float64)
    want = dense_two_stage(feats["image_emb"], feats["captions"], -np.abs(caption_id[:, None] - image_id[None, :]),
                           k_test)
    for num_shards in (1, 3):
        got = rank_sharded(feats["image_emb"], feats["captions"], num_shards=num_shards, chunk=16, k_test=k_test,
                           rescore=rescore)
        assert_ranks_equal(got, want)
    if k_test == 40:
        assert (got.languages["a"].t2i != rank_sharded(feats["image_emb"], feats["captions"]).languages["a"].t2i).any()


def test_shard_bounds_are_aligned_non_empty_and_tile():
    assert shard_bounds(100, 3, 16) == [(0, 32), (32, 64), (64, 100)]
    assert shard_bounds(40, 8, 16) == [(0, 16), (16, 32), (32, 40)]       # only 3 chunks
    assert shard_bounds(5, 2, 512) == [(0, 5)]
    assert default_chunk(2_000) == 512 and default_chunk(100_000) == 320 and default_chunk(10**8) == 16


def test_true_scores_are_exact_dot_products():
    img, txt = planted_ties()
    expected = np.einsum("nkd,nd->kn", txt.astype(np.float64), img.astype(np.float64)).ravel()
    got = true_scores(img, Captions.one_per_image(txt), rows=7)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, expected)                 # quarter-integers: exact in any order
    # and the pessimistic rank from it equals ranks_from_scores on the full matrix
    s = txt[:, 1] @ img.T
    np.testing.assert_array_equal(rank_sharded(img, txt, chunk=16).matrices()[0][:, 1],
                                  ranks_from_scores(s, np.arange(70)))


# --- bad input: a clear error naming the problem ---------------------------------------------

def test_bad_inputs_name_the_problem():
    img, txt = planted_ties()
    cases = [
        ((img[:, :4], txt), "embedding dimensions differ: images are 4-d, captions 6-d"),
        ((img[:60], txt), "captions for 70 images but 60 image embeddings"),
        ((img, txt[:, 0]), "caption embeddings must be N×K×d"),
        ((img[:0], txt[:0]), "empty gallery"),
    ]
    for args, needle in cases:
        with pytest.raises(ValueError, match=needle):
            check_inputs(*args)
    with pytest.raises(ValueError, match=r"query language\(s\) 'ja' not in the gallery, which has captions in: "
                                         "en, de, fr"):
        rank_sharded(img, txt, languages=["en", "de", "fr"], query_languages=["en", "ja"])
    with pytest.raises(ValueError, match="3 language columns but 2 language names"):
        rank_sharded(img, txt, languages=["en", "de"])
    bad = img.copy()
    bad[17, 2] = np.nan
    with pytest.raises(ValueError, match="image embeddings hold 1 NaN/inf value.*image 17"):
        rank_sharded(bad, txt)
    bad = txt.copy()
    bad[3:5, 1] = np.inf
    with pytest.raises(ValueError, match="caption embeddings in language 'de' hold 12 NaN/inf.*image 3"):
        rank_sharded(img, bad, languages=["en", "de", "fr"])


def test_empty_or_misaligned_task_and_bad_k_test_are_refused():
    img, txt = planted_ties()
    caps = Captions.one_per_image(txt)
    view = LanguageView.build(img, caps, true_scores(img, caps), 0)
    with pytest.raises(ValueError, match=r"task \[32, 32\) holds no queries of the 70 t2i queries"):
        rank_task(view, Task(0, "t2i", 32, 32, 16))
    with pytest.raises(ValueError, match="not a multiple of chunk=16"):
        rank_task(view, Task(0, "t2i", 8, 40, 16))
    with pytest.raises(ValueError, match=r"task \[64, 80\) holds no queries"):
        rank_task(view, Task(0, "t2i", 64, 80, 16))
    with pytest.raises(ValueError, match="k_test >= 1"):
        rank_task(view, Task(0, "t2i", 0, 70, 80), k_test=0, rescore=lambda *a: None)
    with pytest.raises(ValueError, match="two-stage only"):
        rank_task(view, Task(0, "i2t", 0, 70, 80))
    with pytest.raises(ValueError, match="re-scorer returned NaN"):
        rank_task(view, Task(0, "t2i", 0, 16, 16), k_test=2, rescore=lambda d, q, c: np.full(c.shape, np.nan))
    with pytest.raises(ValueError, match=r"shape \(16, 1\) for \(16, 2\)"):
        rank_task(view, Task(0, "i2t", 0, 16, 16), k_test=2, rescore=lambda d, q, c: np.zeros((len(q), 1)))
