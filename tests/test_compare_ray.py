"""``ccrk compare`` at tiny size as a user runs it (a subprocess starting its own local cluster):
every style of the full variant trained, evaluated and aggregated; resumed runs are kept, also
under another selection of arms or seeds; the ITC variant's learning rate chosen on validation, then
a second seed at that rate, aggregated with its spread."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from ccrk_ray.data.tokenizer import CaptionTokenizer
from ccrk_ray.data.transforms import load_split
from ccrk_ray.eval.report import report_from_ranks
from ccrk_ray.eval.retrieval import evaluate_in_process
from ccrk_ray.experiments.compare import STYLES, choose_lr, summarize
from ccrk_ray.model import CCRKModel
from tests.commands import ccrk, noise
from tests.conftest import RAY

pytestmark = RAY

LANGS = ("zh", "en", "de")
TINY = ["--train-images", 64, "--test-images", 24, "--languages", ",".join(LANGS), "--epochs", 1, "--batch-size", 16,
        "--warmup-steps", 1, "--text-width", 32, "--embed-dim", 16, "--vocab-size", 300, "--k-test", 6,
        "--workers", "1,1", "--omit-prob", "0.1,de=0.5"]


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    """Three commands on one folder: the experiment (every arm, one seed), the same command again,
    and another selection of its runs (two arms, at learning rates fixed per objective)."""
    out = tmp_path_factory.mktemp("compare")
    args = ["compare", "--out", out, *TINY, "--val-images", 0, "--seeds", "0", "--variants", "full"]
    res = ccrk(*args, timeout=900)
    assert noise(res) == [], "\n".join(noise(res))
    summary = json.loads((out / "compare.json").read_text())
    table = (out / "compare.md").read_text()
    # Ray's session folders go under RAY_TMPDIR: the commands that only keep runs must leave it empty
    ray_tmp = tmp_path_factory.mktemp("ray_tmp")
    again = ccrk(*args, timeout=300, env={"RAY_TMPDIR": str(ray_tmp)})
    again_summary = json.loads((out / "compare.json").read_text())
    data = {p: p.stat().st_mtime_ns for p in (out / "data").rglob("*") if p.is_file()}
    subset = ccrk("compare", "--out", out, *TINY, "--val-images", 0, "--seeds", "0", "--variants", "full",
                  "--objectives", "cross_lingual,one_to_k", "--lr", "1e-3",
                  "--objective-lrs", "one_to_k=2e-3,cross_lingual=2e-3", timeout=300, env={"RAY_TMPDIR": str(ray_tmp)})
    return SimpleNamespace(out=out, res=res, summary=summary, table=table, again=again, again_summary=again_summary,
                           data=data, subset=subset, chosen=json.loads((out / "compare.json").read_text()),
                           ray_sessions=sorted(p.name for p in ray_tmp.rglob("session_*")))


def run_report(out, variant: str, objective: str, lr: str, seed: int) -> dict:
    return json.loads((out / "runs" / variant / objective / f"lr{lr}-seed{seed}" / "report.json").read_text())


def test_every_arm_is_trained_evaluated_and_aggregated(compare_run):
    out, res, summary, table = compare_run.out, compare_run.res, compare_run.summary, compare_run.table
    assert summary["config"]["omit_prob"] == {"zh": 0.1, "en": 0.1, "de": 0.5}
    assert set(summary["results"]) == {"full", "full_two_stage"}
    for ranking, per_objective in summary["results"].items():
        assert list(per_objective) == list(STYLES)
        for objective, result in per_objective.items():
            report = run_report(out, "full", objective, "0.002", 0)
            assert report["seed"] == 0 and report["train"]["step"] == 64 // 16
            assert set(report["test"]) == {"full", "full_two_stage"}
            agg = result["aggregate"]["SumR"]
            assert agg == {"mean": summarize(report["test"][ranking])["SumR"], "std": 0.0,
                           "values": [summarize(report["test"][ranking])["SumR"]]}
            assert f"| {objective} | 0.002 | 1 |" in table
    assert summary["budget"]["full"]["one_to_one"]["captions_per_image_step"] == 1
    assert summary["budget"]["full"]["one_to_k"]["images_seen"] == 64
    assert "Captions an image meets per step: one_to_k 3, one_to_one 1, cross_lingual 3" in table
    assert (out / "compare.png").stat().st_size > 10_000
    assert "one_to_k" in res.stdout and "± " in res.stdout


def test_the_same_command_again_keeps_every_finished_run(compare_run):
    again = compare_run.again
    assert noise(again) == [], "\n".join(noise(again))
    text = again.stdout + again.stderr
    assert text.count("kept from an earlier run") == 3 and "training resnet10t" not in text
    assert compare_run.ray_sessions == []          # nothing to train: no Ray cluster started
    assert compare_run.again_summary["results"] == compare_run.summary["results"]


def test_another_selection_of_arms_keeps_the_runs_it_names(compare_run):
    """Arms and learning rates only choose runs: the folder keeps its data and runs, and reports
    the chosen (here at the rate fixed per objective, over ``--lr``)."""
    out, summary, subset, chosen = compare_run.out, compare_run.summary, compare_run.subset, compare_run.chosen
    assert noise(subset) == [], "\n".join(noise(subset))
    text = subset.stdout + subset.stderr
    assert text.count("kept from an earlier run") == 2 and "training resnet10t" not in text
    assert {p: p.stat().st_mtime_ns for p in (out / "data").rglob("*") if p.is_file()} == compare_run.data
    assert chosen["config"]["seeds"] == [0] and chosen["config"]["objectives"] == ["cross_lingual", "one_to_k"]
    for ranking in ("full", "full_two_stage"):
        assert list(chosen["results"][ranking]) == ["cross_lingual", "one_to_k"]
        for objective, result in chosen["results"][ranking].items():
            assert result["aggregate"] == summary["results"][ranking][objective]["aggregate"]
    table = (out / "compare.md").read_text()
    assert "| one_to_k | 0.002 | 1 |" in table and "| cross_lingual | 0.002 | 1 |" in table
    assert "| one_to_one |" not in table
    assert "Learning rates fixed per objective (--objective-lrs, no sweep here): one_to_k 0.002, cross_lingual 0.002." in table
    # every run stays on disk, also those this selection leaves out
    assert len(list((out / "runs").glob("*/*/*/report.json"))) == 3


def test_reports_are_reproducible_from_the_saved_models(compare_run):
    out = compare_run.out
    run = out / "runs" / "full" / "one_to_k" / "lr0.002-seed0"
    model = CCRKModel.from_pretrained(run / "model")
    assert len(model.fusion) == 1 and model.has_fusion
    batch = load_split(str(out / "data" / "test"), LANGS, CaptionTokenizer(out / "tokenizer", 32), 64)
    saved = json.loads((run / "report.json").read_text())["test"]
    assert report_from_ranks(evaluate_in_process(model, batch, k_test=6))["languages"] == saved["full_two_stage"]["languages"]
    assert report_from_ranks(evaluate_in_process(model, batch, k_test=None))["languages"] == saved["full"]["languages"]


def test_an_arms_learning_rate_is_chosen_on_validation_and_trains_the_other_seeds(tmp_path):
    """Both rates train the first seed and are scored on validation; the better one trains seed 1,
    and the arm is reported over both seeds with their spread (2 workers, bf16), or over the one
    seed a later command selects."""
    common = ["compare", "--out", tmp_path, *TINY, "--val-images", 16, "--objectives", "one_to_k", "--variants", "itc",
              "--workers", "2,2", "--chunk-rows", 16, "--precision", "bf16"]
    res = ccrk(*common, "--seeds", "0,1", "--lrs", "1e-4,3e-3", timeout=600)
    assert noise(res) == [], "\n".join(noise(res))
    summary = json.loads((tmp_path / "compare.json").read_text())
    sweep = summary["sweep"]["itc"]["one_to_k"]
    reports = {lr: run_report(tmp_path, "itc", "one_to_k", lr, 0) for lr in ("0.0001", "0.003")}
    assert sweep == {lr: r["val"]["mean"]["SumR"] for lr, r in reports.items()}
    best = f"{choose_lr({float(lr): score for lr, score in sweep.items()}):g}"
    assert summary["chosen_lr"]["itc"]["one_to_k"] == float(best)
    assert len(list((tmp_path / "runs").glob("*/*/*/report.json"))) == 3        # seed 1 at the chosen rate only
    seeds = [reports[best], run_report(tmp_path, "itc", "one_to_k", best, 1)]
    assert [r["seed"] for r in seeds] == [0, 1] and all(r["train"]["step"] == 64 // 32 for r in seeds)
    # seeds differ in initialisation and data order: the two runs of an arm are not copies
    assert seeds[0]["train"]["loss"] != seeds[1]["train"]["loss"]
    values = [summarize(r["test"]["itc"])["SumR"] for r in seeds]
    agg = summary["results"]["itc"]["one_to_k"]["aggregate"]["SumR"]
    assert agg["values"] == values and agg["mean"] == pytest.approx(np.mean(values))
    assert agg["std"] == pytest.approx(np.std(values, ddof=1))
    assert set(seeds[1]["test"]) == {"itc"}                      # the ITC variant ranks by ITC alone
    model = CCRKModel.from_pretrained(tmp_path / "runs" / "itc" / "one_to_k" / f"lr{best}-seed1" / "model")
    assert model.has_fusion                                # same model; its fusion layers unused, skipped by DDP
    table = (tmp_path / "compare.md").read_text()
    assert f"| one_to_k | {best} | 2 |" in table and "## Learning rate per arm" in table
    # a selection of the folder's seeds (here the second, at the chosen rate) reports that run alone
    one = ccrk(*common, "--seeds", "1", "--lr", best, timeout=300)
    assert noise(one) == [], "\n".join(noise(one))
    assert (one.stdout + one.stderr).count("kept from an earlier run") == 1
    chosen = json.loads((tmp_path / "compare.json").read_text())["results"]["itc"]["one_to_k"]
    assert chosen["seeds"] == [1] and chosen["aggregate"]["SumR"]["values"] == values[1:]
