"""``ccrk compare``: the three training styles on the same data, budget and seed.

Trains ``one_to_k`` (CCRK), ``one_to_one`` (cross-modal style) and ``cross_lingual``
(cross-lingual style) with the same model (dual encoder + fusion layers, ITM and MLM heads), then
evaluates each on the test split by ITC similarity and (unless ``--itc-only``) two-stage, ITC
shortlist re-ranked by ITM, and writes per-language tables of recall and MRV for all three.

    DIR/data, DIR/tokenizer            shared by every run
    DIR/runs/<objective>/              ray_results/, tensorboard/, model/, report.json
    DIR/compare.json, DIR/compare.md   the side-by-side results
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any

import torch

from ccrk_ray.core.config import ConfigError, check_range
from ccrk_ray.core.log import get_logger
from ccrk_ray.core.runtime import ray_session
from ccrk_ray.data.transforms import load_split
from ccrk_ray.eval.report import report_from_ranks
from ccrk_ray.eval.retrieval import evaluate_in_process
from ccrk_ray.experiments.demo import DemoConfig, demo_cpus, demo_model_config, prepare_experiment, pretrain
from ccrk_ray.model import CCRKModel
from ccrk_ray.objectives.styles import STYLES as STYLE_CLASSES
from ccrk_ray.train.config import objective_args

log = get_logger(__name__)
MARKER = "ccrk-compare.json"
OUTPUTS = ("data", "tokenizer", "runs", "compare.json", "compare.md", MARKER)
STYLES = tuple(STYLE_CLASSES)


@dataclass
class CompareConfig(DemoConfig):
    objectives: tuple[str, ...] = STYLES
    fusion_layers: int = 1
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    k_test: int | None = 16                  # two-stage re-ranking depth; None = ITC only

    def validate(self) -> "CompareConfig":
        super().validate()
        unknown = [o for o in self.objectives if o not in STYLES]
        if unknown or not self.objectives:
            raise ConfigError(f"--objectives must be a comma-separated subset of {', '.join(STYLES)}, "
                              f"got {','.join(self.objectives) or 'nothing'}")
        check_range("--fusion-layers", self.fusion_layers, 1, 12)
        check_range("--itm-weight", self.itm_weight, 0.0)
        check_range("--mlm-weight", self.mlm_weight, 0.0)
        if self.k_test is not None:
            check_range("--k-test", self.k_test, 1, self.test_images)
        if "cross_lingual" in self.objectives and "en" not in self.languages:
            raise ConfigError("objective cross_lingual needs 'en' among --languages")
        if "cross_lingual" in self.objectives and self.captions_per_image != len(self.languages):
            raise ConfigError("objective cross_lingual needs every language per image (--captions-per-image "
                              f"{len(self.languages)})")
        return self


def comparison_table(reports: dict[str, dict[str, Any]], languages) -> str:
    """Markdown: one row per (objective, language) with recall both ways and MRV per objective."""
    lines = ["| objective | lang | t2i R@1 | t2i R@5 | t2i R@10 | i2t R@1 | i2t R@5 | i2t R@10 | SumR |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, rep in reports.items():
        for lang in [*languages, "mean"]:
            m = rep["languages"][lang] if lang != "mean" else rep["mean"]
            cells = [m[d][f"R@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)]
            sumr = m["SumR"]
            lines.append(f"| {name} | {lang} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {sumr:.1f} |")
    lines += ["", "| objective | MRV t2i | MRV i2t | recall std across languages (t2i R@1) |", "|---|---|---|---|"]
    for name, rep in reports.items():
        lines.append(f"| {name} | {rep['mrv']['t2i']:.2f} | {rep['mrv']['i2t']:.2f} | "
                     f"{rep['recall_std_across_languages']['t2i']:.2f} |")
    return "\n".join(lines)


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    out, tokenizer, caption_tokenizer = prepare_experiment(cfg, MARKER, OUTPUTS, "compare")
    test_batch = load_split(str(out / "data" / "test"), cfg.languages, caption_tokenizer, cfg.image_size)
    model_cfg = demo_model_config(cfg, tokenizer, fusion_layers=cfg.fusion_layers)
    _, args = objective_args({"itm_weight": cfg.itm_weight, "mlm_weight": cfg.mlm_weight}, tokenizer, cfg.languages)
    reports: dict[str, dict[str, Any]] = {}
    two_stage_reports: dict[str, dict[str, Any]] = {}
    with ray_session(demo_cpus(cfg)):
        for objective in cfg.objectives:
            run_dir = out / "runs" / objective
            torch.manual_seed(cfg.seed)
            metrics = pretrain(cfg, out, run_dir, tokenizer, caption_tokenizer, model_cfg, {"name": objective, **args})
            model = CCRKModel.from_pretrained(run_dir / "model")
            report = report_from_ranks(evaluate_in_process(model, test_batch, k_test=None))
            report.update(train=metrics, objective=objective, k_test=None)
            reports[objective] = report
            if cfg.k_test is not None:
                two_stage = report_from_ranks(evaluate_in_process(model, test_batch, k_test=cfg.k_test))
                two_stage.update(objective=objective, k_test=cfg.k_test)
                report["two_stage"] = two_stage
                two_stage_reports[objective] = two_stage
            (run_dir / "report.json").write_text(json.dumps(report, indent=2))
            for label, rep in (("ITC", report), (f"ITC+ITM@{cfg.k_test}", report.get("two_stage"))):
                if rep:
                    log.info(f"{objective} [{label}]: mean t2i R@10 {rep['mean']['t2i']['R@10']:.1f}, "
                             f"MRV t2i {rep['mrv']['t2i']:.2f} / i2t {rep['mrv']['i2t']:.2f}")
    table = "## Ranking by ITC similarity\n\n" + comparison_table(reports, cfg.languages)
    if two_stage_reports:
        table += (f"\n\n## Two-stage: ITC top-{cfg.k_test} re-ranked by ITM\n\n"
                  + comparison_table(two_stage_reports, cfg.languages))

    def brief(r):
        return {"mean": r["mean"], "mrv": r["mrv"], "languages": r["languages"],
                "recall_std_across_languages": r["recall_std_across_languages"]}

    summary = {"config": dataclasses.asdict(cfg), "seconds": round(time.perf_counter() - t0, 1),
               "results": {name: brief(r) for name, r in reports.items()},
               "results_two_stage": {name: brief(r) for name, r in two_stage_reports.items()}}
    (out / "compare.json").write_text(json.dumps(summary, indent=2, default=list))
    (out / "compare.md").write_text(table + "\n")
    summary["table"] = table
    log.info("comparison written to %s", out / "compare.md")
    return summary
