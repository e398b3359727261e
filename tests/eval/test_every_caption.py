"""Every caption counts: the sharded ranking (what each eval actor runs) equals the definition,
``ccrk_ray.metrics.retrieval_metrics``, on multi-caption galleries, in ITC and two-stage mode."""

import numpy as np
import pytest

from ccrk_ray.eval.ranks import RankSet
from ccrk_ray.eval.report import report_from_ranks
from ccrk_ray.eval.retrieval import Captions, rank_sharded
from ccrk_ray.metrics import caption_rivals, retrieval_metrics


def multi_caption_gallery(n=37, langs=("en", "de", "ja"), d=5, seed=0):
    """Quarter-integer embeddings (exact float32 scores, ties on purpose); 0–6 captions per image
    and language, owners shuffled, and every language missing some images."""
    rng = np.random.default_rng(seed)
    img = rng.integers(-3, 4, size=(n, d)).astype(np.float32) / 4
    img[7] = img[3]                                                   # a duplicated image
    parts, owners, offsets = [], [], [0]
    for _ in langs:
        counts = rng.integers(0, 7, size=n)
        owner = rng.permutation(np.repeat(np.arange(n), counts))
        emb = img[owner] + rng.integers(-2, 3, size=(len(owner), d)).astype(np.float32) / 4
        parts.append(emb)
        owners.append(owner)
        offsets.append(offsets[-1] + len(owner))
    return img, Captions(np.concatenate(parts).astype(np.float32), np.concatenate(owners), offsets, langs)


def dense_language(img, caps, j):
    """(scores Q×G over the language's own gallery, owner in it, gallery indices)."""
    part = caps.language(j)
    gallery, owner = np.unique(caps.owner[part], return_inverse=True)
    return caps.emb[part].astype(np.float64) @ img[gallery].astype(np.float64).T, owner, gallery


@pytest.mark.parametrize("seed", range(3))
def test_itc_shards_equal_the_definition_on_multi_caption_data(seed):
    img, caps = multi_caption_gallery(seed=seed)
    for num_shards, chunk, tile in ((1, None, None), (3, 16, 7), (4, 16, 5)):
        ranks = rank_sharded(img, caps, num_shards=num_shards, chunk=chunk, tile=tile)
        for j, lang in enumerate(caps.languages):
            scores, owner, gallery = dense_language(img, caps, j)
            got = ranks.languages[lang]
            want = caption_rivals(scores, owner)
            for name, w in zip(("t2i", "i2t", "own"), want):
                np.testing.assert_array_equal(getattr(got, name), w, err_msg=f"{lang} {name} {num_shards} {chunk}")
            assert got.metrics() == retrieval_metrics(scores, owner)
            np.testing.assert_array_equal(got.owner, gallery[owner])


def lifted(itc: np.ndarray, top: np.ndarray, new: np.ndarray) -> np.ndarray:
    """The shortlist re-scored and lifted above every other candidate (the dense reference)."""
    out = itc.copy()
    np.put_along_axis(out, top, new + itc.max() - new.min() + 1.0, axis=1)
    return out


def dense_two_stage(img, caps, itm, k_test):
    """The two-stage definition on dense matrices: per language, each caption's top k images and
    each image's top k captions (the own pair at its exact score) re-scored by ``itm`` (M×N,
    caption × image) and lifted above the rest; {language: (t2i, i2t, own)} per caption."""
    out = {}
    for j, lang in enumerate(caps.languages):
        scores, owner, gallery = dense_language(img, caps, j)
        q_idx = np.arange(caps.language(j).start, caps.language(j).stop)
        k = min(k_test, len(gallery))
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        t2i_final = lifted(scores, top, itm[q_idx[:, None], gallery[top]])
        k = min(k_test, len(owner))
        top = np.argsort(-scores.T, axis=1, kind="stable")[:, :k]
        i2t_final = lifted(scores.T, top, itm[q_idx[top], gallery[:, None]])
        out[lang] = (caption_rivals(t2i_final, owner)[0], *caption_rivals(i2t_final.T, owner)[1:])
    return out


def assert_ranks_equal(ranks, want):
    for lang, (t2i, i2t, own) in want.items():
        got = ranks.languages[lang]
        np.testing.assert_array_equal(got.t2i, t2i, err_msg=f"{lang} t2i")
        np.testing.assert_array_equal(got.i2t, i2t, err_msg=f"{lang} i2t")
        np.testing.assert_array_equal(got.own, own, err_msg=f"{lang} own")


@pytest.mark.parametrize("k_test", [1, 4, 200])
def test_two_stage_shards_equal_the_dense_two_stage_definition(k_test):
    img, caps = multi_caption_gallery(n=29, seed=4)
    rng = np.random.default_rng(1)
    itm = np.round(rng.normal(size=(len(caps.owner), len(img))), 1)     # caption × image, ties on purpose

    def rescore(direction, queries, cand):
        return itm[queries[:, None], cand] if direction == "t2i" else itm[cand, queries[:, None]]

    want = dense_two_stage(img, caps, itm, k_test)
    for num_shards, chunk in ((1, None), (3, 16)):
        assert_ranks_equal(rank_sharded(img, caps, num_shards=num_shards, chunk=chunk, k_test=k_test,
                                        rescore=rescore), want)
    if k_test == 200:
        itc_only = rank_sharded(img, caps)
        assert any((want[lang][0] != itc_only.languages[lang].t2i).any() for lang in caps.languages)


def test_report_counts_queries_and_keeps_images_missing_a_language():
    img, caps = multi_caption_gallery(seed=2)
    ranks = rank_sharded(img, caps)
    report = report_from_ranks(ranks)
    for j, lang in enumerate(caps.languages):
        owner = caps.owner[caps.language(j)]
        m = report["languages"][lang]
        assert m["t2i"]["num_queries"] == len(owner) == report["num_captions"][lang]
        assert m["t2i"]["num_candidates"] == len(np.unique(owner)) == m["i2t"]["num_queries"]
        assert m["i2t"]["num_candidates"] == len(owner)
        assert len(np.unique(owner)) < len(img)              # some images lack this language ...
    t2i, i2t = ranks.matrices()
    assert np.isnan(t2i).any() and (~np.isnan(t2i)).all(axis=1).sum() < len(img)
    assert (~np.isnan(t2i)).any(axis=1).all()                 # ... and are kept in their others
    assert report["mrv"]["t2i"] > 0 and report["mrv"]["i2t"] > 0


def test_one_caption_per_image_is_the_usual_protocol():
    rng = np.random.default_rng(3)
    img = rng.normal(size=(20, 4)).astype(np.float32)
    txt = (img[:, None] + rng.normal(size=(20, 2, 4))).astype(np.float32)
    ranks = rank_sharded(img, txt, languages=["en", "de"])
    for j, lang in enumerate(("en", "de")):
        s = txt[:, j].astype(np.float64) @ img.T.astype(np.float64)
        assert ranks.languages[lang].metrics() == retrieval_metrics(s, np.arange(20))
    again = RankSet.from_matrices(*ranks.matrices(), ["en", "de"])
    assert report_from_ranks(again)["languages"] == report_from_ranks(ranks)["languages"]


def test_a_fold_is_ranked_as_a_gallery_of_its_own_and_folds_average():
    from ccrk_ray.eval.report import average_reports
    from ccrk_ray.eval.retrieval import SubsetRescorer

    img, caps = multi_caption_gallery(n=40, seed=6)
    rng = np.random.default_rng(3)
    itm = np.round(rng.normal(size=(len(caps.owner), len(img))), 1)

    def rescore(direction, queries, cand):
        return itm[queries[:, None], cand] if direction == "t2i" else itm[cand, queries[:, None]]

    folds = np.array_split(np.arange(len(img)), 2)
    reports = []
    for images in folds:
        sub, index = caps.subset(images)
        assert np.array_equal(index, np.flatnonzero(np.isin(caps.owner, images)))
        np.testing.assert_array_equal(images[sub.owner], caps.owner[index])
        got = rank_sharded(img[images], sub, k_test=3, rescore=SubsetRescorer(rescore, images, index))
        # the same as a split made of this fold alone, with its own slice of the ITM table
        alone = rank_sharded(img[images], Captions(sub.emb, sub.owner, sub.offsets, sub.languages), k_test=3,
                             rescore=lambda d, q, c, t=itm[np.ix_(index, images)]:
                             t[q[:, None], c] if d == "t2i" else t[c, q[:, None]])
        assert_ranks_equal(got, {lang: (r.t2i, r.i2t, r.own) for lang, r in alone.languages.items()})
        reports.append(report_from_ranks(got))
    avg = average_reports(reports)
    for lang in caps.languages:
        for d in ("t2i", "i2t"):
            assert avg["languages"][lang][d]["R@5"] == pytest.approx(
                np.mean([r["languages"][lang][d]["R@5"] for r in reports]))
        assert avg["languages"][lang]["t2i"]["num_queries"] == sum(r["languages"][lang]["t2i"]["num_queries"]
                                                                    for r in reports)
        assert avg["num_captions"][lang] == len(caps.owner[caps.language(caps.languages.index(lang))])
    assert avg["mrv"]["t2i"] == pytest.approx(np.mean([r["mrv"]["t2i"] for r in reports]))
    assert avg["num_images"] == 40


def test_folds_follow_the_split_row_order_not_the_id_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ccrk_ray.eval.evaluate import fold_images

    order = [f"img{i:02d}" for i in np.random.default_rng(0).permutation(10)]      # annotation order
    (tmp_path / "s").mkdir()
    for n, rows in enumerate((order[:6], order[6:])):
        pq.write_table(pa.table({"image_id": rows}), tmp_path / "s" / f"part-{n:05d}.parquet")
    ids = np.array(sorted(order[:9]), dtype=object)
    folds = fold_images(str(tmp_path / "s"), ids, 2)
    assert [sorted(ids[f]) for f in folds] == [sorted(order[:5]), sorted(order[5:9])]
    folds = fold_images(str(tmp_path / "s"), ids, 3)                  # 3 + 3 + the last 4 (one not evaluated)
    assert [sorted(ids[f]) for f in folds] == [sorted(order[:3]), sorted(order[3:6]), sorted(order[6:9])]
    assert all((np.diff(f) > 0).all() for f in folds)
