"""`ccrk compare` at tiny size through a real local Ray cluster: three styles, one table."""

import json

import pytest

from ccrk_ray.experiments.compare import STYLES, CompareConfig
from tests.commands import ccrk, noise
from ccrk_ray.data.transforms import load_split
from ccrk_ray.core.config import ConfigError
from ccrk_ray.core.languages import CCRK_LANGUAGES
from tests.conftest import RAY

pytestmark = RAY

LANGS = ("zh", "en", "de")


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    """``ccrk compare`` run as a user runs it (its own local cluster)."""
    out = tmp_path_factory.mktemp("compare")
    cfg = CompareConfig(out=str(out), train_images=64, val_images=0, test_images=24, languages=LANGS, epochs=1,
                        batch_size=16, warmup_steps=1, text_width=32, embed_dim=16, vocab_size=300, k_test=6,
                        workers=(1, 1))
    res = ccrk("compare", "--out", out, "--train-images", 64, "--val-images", 0, "--test-images", 24,
               "--languages", ",".join(LANGS), "--epochs", 1, "--batch-size", 16, "--warmup-steps", 1,
               "--text-width", 32, "--embed-dim", 16, "--vocab-size", 300, "--k-test", 6, "--workers", "1,1",
               timeout=600)
    assert noise(res) == [], "\n".join(noise(res))
    assert "## Two-stage: ITC top-6 re-ranked by ITM" in res.stdout
    return out, cfg, json.loads((out / "compare.json").read_text())


def test_every_style_is_trained_evaluated_and_tabled(compare_run):
    out, cfg, summary = compare_run
    assert list(summary["results"]) == list(STYLES)
    on_disk = json.loads((out / "compare.json").read_text())
    table = (out / "compare.md").read_text()
    for style in STYLES:
        res = on_disk["results"][style]
        assert list(res["languages"]) == list(LANGS)
        assert set(res["mrv"]) == {"t2i", "i2t"}
        for lang in LANGS:
            assert table.count(f"| {style} | {lang} |") == 2          # ITC table and two-stage table
        report = json.loads((out / "runs" / style / "report.json").read_text())
        assert report["objective"] == style and report["two_stage"]["k_test"] == 6
        assert set(on_disk["results_two_stage"][style]["languages"]) == set(LANGS)
        assert report["train"]["step"] == 64 // 16          # one epoch, one worker, same budget for all
        assert report["train"]["loss"] > 0


def test_two_stage_report_is_reproducible_from_the_saved_model(compare_run):
    out, cfg, summary = compare_run
    from ccrk_ray.eval.report import report_from_ranks
    from ccrk_ray.eval.retrieval import evaluate_in_process
    from ccrk_ray.model import CCRKModel
    from ccrk_ray.data.tokenizer import CaptionTokenizer

    model = CCRKModel.from_pretrained(out / "runs" / "one_to_k" / "model")
    assert len(model.fusion) == 1 and model.has_fusion
    batch = load_split(str(out / "data" / "test"), LANGS, CaptionTokenizer(out / "tokenizer", cfg.max_length),
                      cfg.image_size)
    again = report_from_ranks(evaluate_in_process(model, batch, k_test=6))
    assert again["languages"] == summary["results_two_stage"]["one_to_k"]["languages"]
    itc = report_from_ranks(evaluate_in_process(model, batch, k_test=None))
    assert itc["languages"] == summary["results"]["one_to_k"]["languages"]


def test_bad_compare_configs(tmp_path):
    with pytest.raises(ConfigError, match="--objectives must be a comma-separated subset"):
        CompareConfig(out=str(tmp_path), objectives=("one_to_k", "clip")).validate()
    with pytest.raises(ConfigError, match="cross_lingual needs 'en'"):
        CompareConfig(out=str(tmp_path), languages=("zh", "de")).validate()
    with pytest.raises(ConfigError, match="--k-test must be in \\[1, 500\\], got 501"):
        CompareConfig(out=str(tmp_path), k_test=501).validate()
    assert CompareConfig(out=str(tmp_path), objectives=("one_to_k",), languages=CCRK_LANGUAGES).validate()
