"""``ccrk evaluate`` end to end on a tiny saved model (with an ITM head) and the tiny test split:
ranks from the eval actors equal the in-process computation, and every output is written."""

import json

import numpy as np
import pytest

from tests.conftest import RAY, tiny_text_config

pytestmark = RAY

LANGS = ["en", "de", "ja"]


@pytest.fixture(scope="module")
def saved_model(tiny_data, tmp_path_factory):
    import torch

    from ccrk_ray.model import CCRKModel, ModelConfig
    from ccrk_ray.data.tokenizer import CaptionTokenizer

    tok = CaptionTokenizer(tiny_data["tokenizer"], 16)
    text = dict(tiny_text_config(tok.vocab_size, max_length=16), num_hidden_layers=2)
    torch.manual_seed(0)
    model = CCRKModel(ModelConfig(vision_name="resnet10t", text_config=text, text_pretrained=False, fusion_layers=1,
                                  embed_dim=16))
    out = tmp_path_factory.mktemp("model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "preprocess.json").write_text(json.dumps({"image_size": 32, "max_length": 16, "languages": LANGS}))
    return out


def test_evaluate_itc_on_actors_writes_every_output(saved_model, tiny_data, tmp_path, ray_local):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ccrk_ray.data.transforms import load_split
    from ccrk_ray.eval.ranks import load_ranks
    from ccrk_ray.eval.report import clip_benchmark_filename, report_from_ranks
    from ccrk_ray.eval.retrieval import encode_split, rank_sharded
    from ccrk_ray.metrics import mean_rank_variance
    from ccrk_ray.eval.evaluate import run_evaluate
    from ccrk_ray.model import CCRKModel
    from ccrk_ray.data.tokenizer import CaptionTokenizer

    out = tmp_path / "eval"
    report = run_evaluate(str(saved_model), str(tiny_data["test"]), str(out), actors=2, k_test=5, itc_only=True,
                          tensorboard=str(tmp_path / "tb"), save_ranks=True, dataset_name="tiny")
    assert report["num_images"] == 40 and list(report["languages"]) == LANGS and report["k_test"] is None
    # the same numbers as ranking the in-process embeddings in one process (the same tie policy)
    batch = load_split(str(tiny_data["test"]), LANGS, CaptionTokenizer(saved_model, 16), 32)
    feats = encode_split(CCRKModel.from_pretrained(saved_model), batch)
    dense = report_from_ranks(rank_sharded(feats["image_emb"], feats["captions"]))
    assert report["languages"] == dense["languages"] and report["mrv"] == dense["mrv"]
    assert report["mrv"]["t2i"] > 0                               # an untrained model: languages disagree
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["languages"] == report["languages"]
    assert len(on_disk["language_rank_correlation"]["t2i"]) == 3
    assert sorted(on_disk["outputs"]["plots"]) == ["rank_correlation.png", "rank_spread_hist.png",
                                                   "recall_per_language.png"]
    for name in on_disk["outputs"]["plots"]:
        with Image.open(out / name) as im:
            assert im.format == "PNG"
    assert "![recall_per_language](recall_per_language.png)" in (out / "report.md").read_text()
    results = {p.name: json.loads(p.read_text()) for p in (out / "clip_benchmark").iterdir()}
    assert sorted(r["language"] for r in results.values()) == sorted(LANGS)
    assert all(name == clip_benchmark_filename(r) and name.startswith("tiny_") for name, r in results.items())
    (de,) = [r for r in results.values() if r["language"] == "de"]
    assert de["metrics"]["text_retrieval_recall@5"] == pytest.approx(report["languages"]["de"]["i2t"]["R@5"] / 100)
    assert de["model"] == "ccrk-resnet10t" and de["task"] == "zeroshot_retrieval" and de["pretrained"] == str(saved_model)
    assert de["metrics"]["image_retrieval_MRV"] == report["mrv"]["t2i"] and report["language_aliases"] == {}
    ids, langs, t2i, i2t = load_ranks(out / "ranks.parquet")
    assert langs == LANGS and list(ids) == sorted(batch["image_id"])
    assert mean_rank_variance(t2i) == pytest.approx(report["mrv"]["t2i"])
    assert mean_rank_variance(i2t) == pytest.approx(report["mrv"]["i2t"])
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    assert acc.Scalars("eval/ja/i2t_R@10")[0].value == pytest.approx(report["languages"]["ja"]["i2t"]["R@10"])
    assert "eval/rank_correlation" in acc.Tags()["images"]


def test_evaluate_two_stage_on_actors_equals_in_process(saved_model, tiny_data, tmp_path, ray_local):
    from ccrk_ray.data.transforms import load_split
    from ccrk_ray.eval.report import report_from_ranks
    from ccrk_ray.eval.retrieval import evaluate_in_process
    from ccrk_ray.eval.evaluate import run_evaluate
    from ccrk_ray.model import CCRKModel
    from ccrk_ray.data.tokenizer import CaptionTokenizer

    report = run_evaluate(str(saved_model), str(tiny_data["test"]), str(tmp_path / "two"), actors=2, k_test=8)
    batch = load_split(str(tiny_data["test"]), LANGS, CaptionTokenizer(saved_model, 16), 32)
    model = CCRKModel.from_pretrained(saved_model)
    ref = report_from_ranks(evaluate_in_process(model, batch, k_test=8))
    itc = report_from_ranks(evaluate_in_process(model, batch, k_test=None))
    assert report["k_test"] == 8 and report["actors"] == 2
    assert report["languages"] == ref["languages"] and report["mrv"] == ref["mrv"]
    assert report["languages"] != itc["languages"]                 # the ITM stage re-ranked
    with pytest.raises(ValueError, match="--actors must be >= 1, got 0"):
        run_evaluate(str(saved_model), str(tiny_data["test"]), str(tmp_path / "x"), actors=0)
    assert np.isfinite(report["mrv"]["i2t"])


def test_ccrk_evaluate_with_its_default_flags_finishes_on_its_own_cluster(saved_model, tiny_data, tmp_path):
    """As a user runs it: its own local cluster on this machine's CPUs, one embedding actor and
    one ranking actor, two-stage by default for a model with an ITM head. This command once hung
    forever: its two actor pools held every CPU of the cluster it started, and Ray Data's file
    listing never ran."""
    from ccrk_ray.data.tokenizer import CaptionTokenizer
    from ccrk_ray.data.transforms import load_split
    from ccrk_ray.eval.report import report_from_ranks
    from ccrk_ray.eval.retrieval import evaluate_in_process
    from ccrk_ray.model import CCRKModel
    from tests.commands import ccrk, noise

    res = ccrk("evaluate", "--checkpoint", saved_model, "--data", tiny_data["test"], "--out", tmp_path / "e",
               timeout=300)
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["num_images"] == 40 and report["k_test"] == 128 and list(report["languages"]) == LANGS
    # two-stage at the paper's depth, capped at each language's gallery: what one process computes
    batch = load_split(str(tiny_data["test"]), LANGS, CaptionTokenizer(saved_model, 16), 32)
    model = CCRKModel.from_pretrained(saved_model)
    assert report["languages"] == report_from_ranks(evaluate_in_process(model, batch, k_test=40))["languages"]
    assert noise(res) == [], "\n".join(noise(res))
    assert res.stdout.strip().splitlines()[-1].startswith("MRV")


def test_any_language_code_is_evaluated_and_clip_benchmarks_jp_means_ja(saved_model, tiny_data, tmp_path):
    """Checked before any cluster starts: 'jp' reads the ja captions, 'ko' is a code like any other
    (the split has no ko captions: named as missing, not as an unknown code)."""
    from ccrk_ray.core.config import ConfigError
    from ccrk_ray.core.languages import canonical_languages
    from ccrk_ray.eval.evaluate import run_evaluate

    assert canonical_languages(["jp", "en", "jpn_Jpan"]) == (("ja", "en", "jpn_Jpan"), {"jp": "ja"})
    with pytest.raises(ConfigError, match=r"has no caption column for ko \(it has"):
        run_evaluate(str(saved_model), str(tiny_data["test"]), str(tmp_path / "e"), languages=["jp", "ko"])
    with pytest.raises(ConfigError, match="not a language code"):
        run_evaluate(str(saved_model), str(tiny_data["test"]), str(tmp_path / "e"), languages=["j p"])
