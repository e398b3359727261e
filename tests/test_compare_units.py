"""``ccrk compare``'s experiment logic without Ray: aggregation over seeds, the learning-rate
choice, per-language omission flags, the configuration checks and the runs a folder keeps."""

from __future__ import annotations

import argparse
import contextlib
import json

import numpy as np
import pytest
import torch

from ccrk_ray.commands._args import objective_numbers, omit_probs
from ccrk_ray.core.config import ConfigError
from ccrk_ray.eval.report import report_from_ranks
from ccrk_ray.eval.retrieval import evaluate_in_process
from ccrk_ray.experiments.compare import (COMPARE_OMIT, MARKER, OUTPUTS, SELECTION, CompareConfig, Experiment, aggregate,
                                          budget_lines, captions_per_image_step, choose_lr, epochs_for, lrs_for,
                                          results_table, summarize)
from ccrk_ray.experiments.demo import prepare_experiment
from ccrk_ray.model import CCRKModel


def report(t2i, i2t, mrv=(3.0, 2.0), std=(1.0, 2.0)):
    """A ``report_from_ranks``-shaped dict with the given mean recall triples."""
    mean = {"t2i": dict(zip(("R@1", "R@5", "R@10"), t2i)), "i2t": dict(zip(("R@1", "R@5", "R@10"), i2t))}
    mean["SumR"] = sum(t2i) + sum(i2t)
    return {"mean": mean, "mrv": {"t2i": mrv[0], "i2t": mrv[1]},
            "recall_std_across_languages": {"t2i": std[0], "i2t": std[1]}}


def test_aggregate_is_mean_and_sample_std_over_seeds():
    runs = [summarize(report((10, 20, 30), (11, 21, 31), mrv=(4.0, 1.0))),
            summarize(report((14, 26, 40), (11, 21, 31), mrv=(6.0, 1.0)))]
    agg = aggregate(runs)
    assert agg["t2i_R@10"]["mean"] == 35 and agg["t2i_R@10"]["std"] == pytest.approx(np.std([30, 40], ddof=1))
    assert agg["SumR"]["values"] == [123, 143]
    assert agg["MRV_t2i"] == {"mean": 5.0, "std": pytest.approx(np.sqrt(2)), "values": [4.0, 6.0]}
    assert agg["i2t_R@1"]["std"] == 0.0
    assert aggregate(runs[:1])["SumR"]["std"] == 0.0            # one seed: no spread to report
    table = results_table({"itc": {"one_to_k": {"variant": "itc", "lr": 0.002, "seeds": [0, 1], "aggregate": agg}}},
                          {"itc": {"one_to_k": {"train_seconds_mean": 12.0}}})
    assert "| one_to_k | 0.002 | 2 | 12.0 ± 2.8 | 23.0 ± 4.2 | 35.0 ± 7.1 |" in table


def test_the_learning_rate_is_chosen_on_validation_ties_to_the_smaller():
    assert choose_lr({1e-3: 50.0, 2e-3: 61.0, 4e-3: 60.0}) == 2e-3
    assert choose_lr({4e-3: 61.0, 1e-3: 61.0}) == 1e-3


def test_captions_per_image_step():
    assert [captions_per_image_step(o, 10) for o in ("one_to_k", "one_to_one", "cross_lingual")] == [10, 1, 10]


def test_omit_prob_flag_per_language():
    assert omit_probs("0.2") == 0.2
    assert omit_probs("0.1,zh=0.5,ja=0.4") == {"*": 0.1, "zh": 0.5, "ja": 0.4}
    with pytest.raises(argparse.ArgumentTypeError, match="LANG=P"):
        omit_probs("zh=lots")
    cfg = CompareConfig(out="x", languages=("en", "de", "zh"), omit_prob={"*": 0.1, "zh": 0.5}).validate()
    assert cfg.omit_prob == {"en": 0.1, "de": 0.1, "zh": 0.5}
    # the default's controlled rates, cut to the generated languages
    cfg = CompareConfig(out="x", languages=("en", "ja")).validate()
    assert cfg.omit_prob == {"en": COMPARE_OMIT["en"], "ja": COMPARE_OMIT["ja"]}
    with pytest.raises(ConfigError, match="not in --languages: ko"):
        CompareConfig(out="x", languages=("en", "de"), omit_prob={"en": 0.1, "ko": 0.2}).validate()
    with pytest.raises(ConfigError, match="no value for de"):
        CompareConfig(out="x", languages=("en", "de"), omit_prob={"en": 0.1}).validate()


@pytest.mark.parametrize("kwargs, needle", [
    (dict(variants=("itc", "mitm")), "--variants must be a comma-separated subset"),
    (dict(seeds=(0, 0)), "--seeds must be distinct"),
    (dict(lrs=(1e-3, 2e-3), val_images=0), "--val-images must be > 0"),
    (dict(itm_weight=0.0, mlm_weight=0.0), "the full variant needs"),
    (dict(objectives=("one_to_k", "clip")), "--objectives must be a comma-separated subset"),
    (dict(languages=("zh", "de")), "cross_lingual needs 'en'"),
    (dict(k_test=501), "--k-test must be in [1, 500], got 501"),
    (dict(objective_lrs={"one_to_k": 1e-3, "clip": 1e-3}), "--objective-lrs names clip: objectives are"),
    (dict(objective_lrs={"one_to_k": 2.0}), "--objective-lrs one_to_k must be in [1e-08, 1.0], got 2.0"),
    (dict(lrs=(1e-3, 2e-3), val_images=0, objective_lrs={"one_to_k": 1e-3}), "--val-images must be > 0"),
])
def test_bad_compare_configs(kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        CompareConfig(out="x", **kwargs).validate()


def test_the_captions_budget_gives_one_to_one_k_times_the_epochs():
    cfg = CompareConfig(out="x", languages=("en", "de", "zh"), epochs=4, train_images=200, budget="captions").validate()
    assert [epochs_for(cfg, o) for o in ("one_to_k", "one_to_one", "cross_lingual")] == [4, 12, 4]
    assert "one_to_one 2400 (12 epochs)" in budget_lines(cfg, {})
    images = CompareConfig(out="x", languages=("en", "de", "zh"), epochs=4).validate()
    assert [epochs_for(images, o) for o in ("one_to_k", "one_to_one")] == [4, 4]
    with pytest.raises(ConfigError, match="--budget must be one of images, captions"):
        CompareConfig(out="x", budget="wall").validate()


def test_a_folder_keeps_its_runs_across_selections_and_starts_afresh_on_any_other_change(tmp_path):
    """Seeds, arms and learning rates only choose runs (each has its own folder); anything else
    (here the epochs) makes the runs another experiment's, so the folder is cleared."""
    base = dict(out=str(tmp_path / "c"), train_images=8, val_images=4, test_images=4, languages=("en", "de"),
                image_size=32, vocab_size=120, epochs=2, seeds=(0, 1), batch_size=4, workers=(1, 1), k_test=2)
    out, *_ = prepare_experiment(CompareConfig(**base), MARKER, OUTPUTS, "compare", True, SELECTION)
    run = out / "runs" / "itc" / "one_to_k" / "lr0.002-seed1" / "report.json"
    run.parent.mkdir(parents=True)
    run.write_text("{}")
    data = sorted((p, p.stat().st_mtime_ns) for p in (out / "data").rglob("*"))
    for selection in (dict(seeds=(1, 2)), dict(objectives=("one_to_one",), variants=("full",)), dict(lrs=(1e-3, 3e-3)),
                      dict(lr=1e-3), dict(objective_lrs={"one_to_k": 1e-3})):
        prepare_experiment(CompareConfig(**base | selection), MARKER, OUTPUTS, "compare", True, SELECTION)
        assert run.is_file() and sorted((p, p.stat().st_mtime_ns) for p in (out / "data").rglob("*")) == data
        assert CompareConfig(**base | selection).validate().seeds == tuple(
            json.loads((out / MARKER).read_text())["seeds"])                 # the marker records the last command
    prepare_experiment(CompareConfig(**base | dict(epochs=3)), MARKER, OUTPUTS, "compare", True, SELECTION)
    assert not run.exists() and (out / "data" / "test").is_dir()


def test_a_moved_folder_is_the_same_experiment(tmp_path):
    """The folder's path is not part of the experiment: runs copied or moved elsewhere are kept."""
    base = dict(train_images=8, val_images=4, test_images=4, languages=("en", "de"), image_size=32, vocab_size=120,
                epochs=2, seeds=(0,), batch_size=4, workers=(1, 1), k_test=2)
    out, *_ = prepare_experiment(CompareConfig(out=str(tmp_path / "a"), **base), MARKER, OUTPUTS, "compare", True, SELECTION)
    run = out / "runs" / "itc" / "one_to_k" / "lr0.002-seed0" / "report.json"
    run.parent.mkdir(parents=True)
    run.write_text("{}")
    moved = out.rename(tmp_path / "b")
    prepare_experiment(CompareConfig(out=str(moved), **base), MARKER, OUTPUTS, "compare", True, SELECTION)
    assert (moved / "runs" / "itc" / "one_to_k" / "lr0.002-seed0" / "report.json").read_text() == "{}"
    assert json.loads((moved / MARKER).read_text())["out"] == str(moved)


def test_learning_rates_fixed_per_objective_take_precedence_and_are_stated():
    cfg = CompareConfig(out="x", languages=("en", "de"), objectives=("one_to_k", "one_to_one", "cross_lingual"),
                        lr=5e-4, lrs=(1e-3, 3e-3), objective_lrs={"cross_lingual": 3e-3, "one_to_k": 2e-3}).validate()
    assert [lrs_for(cfg, o) for o in cfg.objectives] == [(2e-3,), (1e-3, 3e-3), (3e-3,)]
    assert lrs_for(CompareConfig(out="x", lr=5e-4).validate(), "one_to_one") == (5e-4,)
    assert ("Learning rates fixed per objective (--objective-lrs, no sweep here): cross_lingual 0.003, one_to_k 0.002."
            in budget_lines(cfg, {}))
    assert "--objective-lrs" not in budget_lines(CompareConfig(out="x").validate(), {})
    assert objective_numbers("one_to_k=1e-3, cross_lingual=3e-3") == {"one_to_k": 1e-3, "cross_lingual": 3e-3}
    for bad in ("1e-3", "one_to_k=fast", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="expected NAME=X items"):
            objective_numbers(bad)


def test_a_sweep_scores_a_run_kept_from_a_command_without_one_on_validation(tmp_path):
    """A run trained by a command that chose no learning rate has no validation score; a later
    sweep on the folder scores its saved model in place (no training, no cluster) and keeps the
    rest of its report."""
    cfg = CompareConfig(out=str(tmp_path / "c"), train_images=8, val_images=6, test_images=4, languages=("en", "de"),
                        image_size=32, vocab_size=120, text_width=32, embed_dim=16, seeds=(0,), objectives=("one_to_k",),
                        variants=("itc",), lrs=(1e-3, 3e-3), batch_size=4, workers=(1, 1), k_test=2)
    out, tokenizer, caption_tokenizer = prepare_experiment(cfg, MARKER, OUTPUTS, "compare", True, SELECTION)
    exp = Experiment(cfg, out, tokenizer, caption_tokenizer, contextlib.ExitStack())
    run = out / "runs" / "itc" / "one_to_k" / "lr0.001-seed0"
    torch.manual_seed(0)
    model = CCRKModel(exp.model_cfg).eval()
    model.save_pretrained(run / "model")
    kept = {"variant": "itc", "objective": "one_to_k", "lr": 1e-3, "seed": 0, "train": {"step": 2},
            "test": {"itc": report_from_ranks(evaluate_in_process(model, exp.test))}}
    (run / "report.json").write_text(json.dumps(kept))
    report = exp.run("itc", "one_to_k", 1e-3, 0)
    assert report["val"] == report_from_ranks(evaluate_in_process(model, exp.val, k_test=None))
    assert report["val"]["num_images"] == 6 and {k: v for k, v in report.items() if k != "val"} == kept
    assert json.loads((run / "report.json").read_text()) == report and not exp.ray_started
