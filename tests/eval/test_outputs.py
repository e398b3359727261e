"""Report extras, plots, TensorBoard, CLIP_benchmark files, rank files and MRV over runs."""

import json

import numpy as np
import pytest

from ccrk_ray.eval.ranks import LanguageRanks, RankSet, load_ranks, mrv_over_runs, parse_run_spec, save_ranks
from ccrk_ray.eval.report import build_report, clip_benchmark_filename, clip_benchmark_results, language_rank_correlation, rank_spread
from ccrk_ray.metrics import mean_rank_variance


def test_language_rank_correlation_is_spearman_with_average_ties():
    ranks = np.array([[0, 3, 0], [1, 2, 0], [2, 1, 0], [3, 0, 0], [3, 5, 0]])
    corr = language_rank_correlation(ranks)
    # by hand: column 0 has a tie at 3 → average ranks [1, 2, 3, 4.5, 4.5]; column 1 ranks [4, 3, 2, 1, 5]
    a, b = np.array([1, 2, 3, 4.5, 4.5]), np.array([4, 3, 2, 1, 5.0])
    assert corr[0, 1] == pytest.approx(np.corrcoef(a, b)[0, 1]) and corr[1, 0] == corr[0, 1]
    assert corr[0, 0] == pytest.approx(1.0) and corr[1, 1] == pytest.approx(1.0)
    assert np.isnan(corr[2]).all()                      # a constant language has no rank order
    monotone = np.stack([np.arange(10), np.arange(10) ** 2, 9 - np.arange(10)], axis=1)
    np.testing.assert_allclose(language_rank_correlation(monotone)[0], [1, 1, -1])


def test_rank_spread_is_what_mrv_averages():
    rng = np.random.default_rng(0)
    ranks = rng.integers(0, 30, (25, 4))
    spread = rank_spread(ranks)
    assert spread.shape == (25,) and spread[3] == pytest.approx(np.std(ranks[3]))
    assert spread.mean() == pytest.approx(mean_rank_variance(ranks))
    with pytest.raises(ValueError, match="K >= 2"):
        rank_spread(ranks[:, :1])


def small_report():
    t2i = np.array([[0, 4], [1, 0], [12, 2], [0, 0]] * 5)
    i2t = np.array([[0, 0], [3, 1], [0, 9], [5, 0]] * 5)
    return build_report(t2i, i2t, ["en", "de"]), t2i, i2t


def test_clip_benchmark_shape_and_fractions():
    report, _, _ = small_report()
    results = clip_benchmark_results(report, "xtd10", "ccrk-resnet10t", "/runs/a/model")
    assert [r["language"] for r in results] == ["en", "de"]
    for r in results:
        assert set(r) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
        assert (r["dataset"], r["model"], r["task"]) == ("xtd10", "ccrk-resnet10t", "zeroshot_retrieval")
        assert set(r["metrics"]) == {f"{d}_retrieval_{m}" for d in ("image", "text")
                                     for m in ("recall@1", "recall@5", "recall@10", "MedR", "mAP", "MRV")}
        assert r["metrics"]["image_retrieval_MRV"] == report["mrv"]["t2i"]
    en = results[0]["metrics"]
    assert en["image_retrieval_recall@1"] == pytest.approx(0.5)      # text→image, t2i ranks [0, 1, 12, 0]
    assert en["image_retrieval_recall@5"] == pytest.approx(0.75)
    assert en["text_retrieval_recall@5"] == pytest.approx(0.75)      # image→text, i2t ranks [0, 3, 0, 5]
    # CLIP_benchmark's `build` merges rows as metrics + the other keys, model + " " + pretrained
    row = {**results[1]["metrics"], **{k: v for k, v in results[1].items() if k != "metrics"}}
    assert row["model"] + " " + row["pretrained"] == "ccrk-resnet10t /runs/a/model"
    assert en["image_retrieval_MedR"] == report["languages"]["en"]["t2i"]["MedR"]
    assert en["text_retrieval_mAP"] == report["languages"]["en"]["i2t"]["mAP"]
    # CLIP_benchmark's own naming: two models' (or checkpoints') runs in one folder never collide
    assert clip_benchmark_filename(results[1]) == "xtd10_runs-a-model_ccrk-resnet10t_de_zeroshot_retrieval.json"
    other = clip_benchmark_results(report, "xtd10", "ccrk-resnet10t", "/runs/b/model")
    assert clip_benchmark_filename(other[1]) != clip_benchmark_filename(results[1])


def test_a_single_language_run_has_no_mrv_key_and_split_folders_name_their_data_set():
    from ccrk_ray.eval.evaluate import dataset_name_of

    report = build_report(np.array([[1], [3]]), np.array([[1], [2]]), ["en"])
    (result,) = clip_benchmark_results(report, "xtd10", "m", "p")
    assert "image_retrieval_MRV" not in result["metrics"]
    assert dataset_name_of("data/xflickrco/test") == "xflickrco_test"
    assert dataset_name_of("s3://bucket/wit/test_de/") == "wit_test_de"
    assert dataset_name_of("data/xtd10.parquet") == "xtd10" and dataset_name_of("s3://test") == "test"


def test_ranks_round_trip_and_mrv_over_runs(tmp_path):
    rng = np.random.default_rng(2)
    ids = [f"img{i:03d}" for i in range(30)]
    t2i, i2t = rng.integers(0, 30, (30, 3)), rng.integers(0, 30, (30, 3))
    save_ranks(tmp_path / "all.parquet", ids[::-1], RankSet.from_matrices(t2i[::-1], i2t[::-1], ["en", "de", "fr"]), meta={"k_test": None})
    got_ids, langs, got_t2i, got_i2t = load_ranks(tmp_path / "all.parquet")
    assert got_ids.tolist() == ids and langs == ["en", "de", "fr"]          # sorted by image id
    np.testing.assert_array_equal(got_t2i, t2i)
    np.testing.assert_array_equal(got_i2t, i2t)
    one = mrv_over_runs([str(tmp_path / "all.parquet")])
    assert one["mrv"]["t2i"] == pytest.approx(mean_rank_variance(t2i)) and one["num_images"] == 30
    # per-language models: de from one run, en and fr from others
    for name, cols in (("de", [1]), ("enfr", [0, 2])):
        langs_ = [["en", "de", "fr"][c] for c in cols]
        save_ranks(tmp_path / f"{name}.parquet", ids, RankSet.from_matrices(t2i[:, cols] + 1, i2t[:, cols], langs_), meta={})
    res = mrv_over_runs([f"{tmp_path}/de.parquet", f"{tmp_path}/enfr.parquet:fr", f"{tmp_path}/all.parquet:en"])
    assert res["languages"] == ["de", "fr", "en"]
    expected = np.stack([t2i[:, 1] + 1, t2i[:, 2] + 1, t2i[:, 0]], axis=1)
    assert res["mrv"]["t2i"] == pytest.approx(mean_rank_variance(expected))
    assert res["runs"]["en"] == f"{tmp_path}/all.parquet"
    with pytest.raises(ValueError, match="language de comes from both"):
        mrv_over_runs([f"{tmp_path}/de.parquet", f"{tmp_path}/all.parquet"])
    save_ranks(tmp_path / "fewer.parquet", ids[:20], RankSet.from_matrices(t2i[:20, :1], i2t[:20, :1], ["ja"]))
    with pytest.raises(ValueError, match="ranks other images than .*10 only in"):
        mrv_over_runs([f"{tmp_path}/de.parquet", f"{tmp_path}/fewer.parquet"])
    with pytest.raises(ValueError, match="has no ranks for language"):
        mrv_over_runs([f"{tmp_path}/de.parquet:ja"])
    with pytest.raises(ValueError, match="at least 2 languages"):
        mrv_over_runs([f"{tmp_path}/de.parquet"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mrv_over_runs([f"{tmp_path}/nope.parquet"])
    assert parse_run_spec("/a/b.parquet:de,fr") == ("/a/b.parquet", ["de", "fr"])
    assert parse_run_spec("/a/b.parquet") == ("/a/b.parquet", None)


def test_plots_are_pngs_and_tensorboard_gets_scalars_and_images(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ccrk_ray.eval.plots import log_tensorboard, make_figures, write_plots

    report, t2i, i2t = small_report()
    figs = make_figures(report, t2i, i2t)
    paths = write_plots(figs, tmp_path / "out")
    assert set(paths) == {"recall_per_language", "rank_spread_hist", "rank_correlation"}
    for p in paths.values():
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] >= 600 and len(set(im.convert("L").getdata())) > 10
    log_tensorboard(tmp_path / "tb", report, t2i, i2t, figs)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "histograms": 0}).Reload()
    assert acc.Scalars("eval/de/t2i_R@1")[0].value == pytest.approx(report["languages"]["de"]["t2i"]["R@1"])
    assert acc.Scalars("eval/mrv_i2t")[0].value == pytest.approx(report["mrv"]["i2t"])
    assert set(acc.Tags()["images"]) == {f"eval/{n}" for n in paths}
    assert acc.Histograms("eval/rank_spread_t2i")[0].histogram_value.num == 20


def test_plots_with_one_language_and_a_perfect_model(tmp_path):
    from ccrk_ray.eval.plots import make_figures, write_plots

    zeros = np.zeros((10, 3), dtype=int)
    report = build_report(zeros, zeros, ["en", "de", "fr"])             # perfect: correlations undefined
    assert set(write_plots(make_figures(report, zeros, zeros), tmp_path)) == {
        "recall_per_language", "rank_spread_hist", "rank_correlation"}
    single = build_report(zeros[:, :1], zeros[:, :1], ["en"])
    assert set(make_figures(single, zeros[:, :1], zeros[:, :1])) == {"recall_per_language"}
    json.dumps(single)


def test_rank_file_with_several_captions_and_a_missing_language(tmp_path):
    # image 0: two en captions (ranks 0 and 3), no de; image 1: one en, one de; image 2: de only
    ranks = RankSet(3, {"en": LanguageRanks(owner=[0, 0, 1], t2i=[0, 3, 1], i2t=[2, 0, 1], own=[0, 1, 0]),
                        "de": LanguageRanks(owner=[1, 2], t2i=[0, 1], i2t=[1, 0], own=[0, 0])})
    save_ranks(tmp_path / "r.parquet", ["a", "b", "c"], ranks)
    ids, langs, t2i, i2t = load_ranks(tmp_path / "r.parquet")
    assert ids.tolist() == ["a", "b", "c"] and langs == ["en", "de"]
    np.testing.assert_array_equal(t2i, [[1.5, np.nan], [1, 0], [np.nan, 1]])     # mean over the captions
    np.testing.assert_array_equal(i2t, [[0, np.nan], [1, 1], [np.nan, 0]])       # the best caption
    assert mrv_over_runs([str(tmp_path / "r.parquet")])["mrv"] == {"t2i": 0.5, "i2t": 0.0}   # image b alone


def test_clip_benchmark_build_merges_our_files(tmp_path):
    """CLIP_benchmark's own ``clip_benchmark build`` (the real package, as a subprocess) over the
    files two runs wrote into one folder: one CSV row per run and language, our extra metrics as
    columns."""
    import csv
    import subprocess
    import sys

    report, _, _ = small_report()
    for pretrained in ("/runs/a/model", "/runs/b/model"):
        for result in clip_benchmark_results(report, "xtd10", "ccrk-resnet10t", pretrained):
            (tmp_path / clip_benchmark_filename(result)).write_text(json.dumps(result))
    out = tmp_path / "benchmark.csv"
    code = "import sys; from clip_benchmark.cli import main; sys.exit(main())"
    subprocess.run([sys.executable, "-c", code, "build", str(tmp_path), "--output", str(out)], check=True,
                   capture_output=True, timeout=300)
    rows = list(csv.DictReader(out.open()))
    assert sorted((r["model_fullname"], r["language"]) for r in rows) == [
        (f"ccrk-resnet10t /runs/{x}/model", lang) for x in ("a", "b") for lang in ("de", "en")]
    en = next(r for r in rows if r["language"] == "en")
    assert float(en["image_retrieval_recall@1"]) == pytest.approx(0.5)
    assert float(en["image_retrieval_MRV"]) == pytest.approx(report["mrv"]["t2i"])
