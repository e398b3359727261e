"""``ccrk compare``: the paper's claim as an experiment a reviewer can check.

Three training styles on the same data, model and budget:

- ``one_to_k`` (CCRK): each image against all K of its captions at once;
- ``one_to_one`` (cross-modal style): each image with one caption in a drawn language per step;
- ``cross_lingual`` (cross-lingual style): image–English ITC plus English–other-language pairs.

Two variants of each: ``itc`` (ITC alone, ranked by ITC similarity) and ``full`` (ITC + MITM +
CMLM, ranked by ITC and two-stage: ITC top ``k_test`` re-scored by ITM). Each arm's learning rate
is chosen on the validation split among ``lrs`` (the first seed's runs; the best mean SumR by
ITC), or fixed per objective by ``objective_lrs`` (a rate an earlier sweep chose: no sweep), then
the arm trains once per seed (initialisation, data order and augmentation follow the
seed; the data set is one). Reported per ranking: mean ± sample std over seeds of recall
(averaged over languages), SumR, MRV and the spread of recall across languages, with the budget
in images seen, captions seen and training seconds.

    DIR/data, DIR/tokenizer                          shared by every run
    DIR/runs/<variant>/<objective>/lr<LR>-seed<S>/   ray_results/, tensorboard/, model/, report.json
    DIR/compare.json, compare.md, compare.png        the sweep, every run, the aggregates, the plot

Runs that wrote their report.json are kept when the command runs again on the same folder, also
with other ``--objectives``, ``--variants``, ``--seeds``, ``--lr``, ``--lrs`` or ``--objective-lrs``
(every run has its own folder): an interrupted experiment resumes where it stopped, and one can
grow by seeds or arms.
Any other change (data, model, schedule) starts the folder afresh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

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
OUTPUTS = ("data", "tokenizer", "runs", "compare.json", "compare.md", "compare.png", MARKER)
STYLES = tuple(STYLE_CLASSES)
VARIANTS = ("itc", "full")
BUDGETS = ("images", "captions")
# Config fields that only choose which runs to train and report: a folder keeps its runs across them.
SELECTION = ("objectives", "variants", "seeds", "lrs", "lr", "objective_lrs")
RANKINGS = {"itc": "ITC objective, ranked by ITC", "full": "full objective (ITC + MITM + CMLM), ranked by ITC",
            "full_two_stage": "full objective, two-stage (ITC top-k re-scored by ITM)"}
# Controlled data: languages leave details out at different rates (English the most complete,
# as a source language; the rest as lossier translations), so that what one language's caption
# says about an image differs from another's and rank disagreement between languages can appear.
COMPARE_OMIT = {"en": 0.05, "de": 0.1, "fr": 0.1, "es": 0.1, "ru": 0.2, "cs": 0.2, "id": 0.3, "tr": 0.3,
                "ja": 0.4, "zh": 0.4, "*": 0.2}
SUMMARY_KEYS = ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10", "SumR", "MRV_t2i", "MRV_i2t",
                "recall_std_t2i", "recall_std_i2t")


@dataclass
class CompareConfig(DemoConfig):
    objectives: tuple[str, ...] = STYLES
    variants: tuple[str, ...] = VARIANTS
    seeds: tuple[int, ...] = (0, 1, 2)           # training seeds (the data set follows ``seed``)
    lrs: tuple[float, ...] = ()                  # per-arm sweep on validation; empty: ``lr`` for every arm
    objective_lrs: dict[str, float] = field(default_factory=dict)  # fixed per objective, over ``lrs``/``lr``
    omit_prob: float | dict[str, float] = field(default_factory=lambda: dict(COMPARE_OMIT))
    fusion_layers: int = 1
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    k_test: int | None = 16                      # two-stage re-ranking depth of the full variant; None = ITC only
    budget: str = "images"                       # images: every arm the same epochs (images and steps);
                                                 # captions: an arm meeting fewer captions per image-step
                                                 # trains proportionally longer, to the same captions seen

    def validate(self) -> "CompareConfig":
        if self.omit_prob == COMPARE_OMIT:
            # the default's languages that are not generated drop out
            self.omit_prob = {k: v for k, v in self.omit_prob.items() if k == "*" or k in self.languages}
        super().validate()
        unknown = [o for o in self.objectives if o not in STYLES]
        if unknown or not self.objectives:
            raise ConfigError(f"--objectives must be a comma-separated subset of {', '.join(STYLES)}, "
                              f"got {','.join(self.objectives) or 'nothing'}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ConfigError(f"--variants must be a comma-separated subset of {', '.join(VARIANTS)}, "
                              f"got {','.join(self.variants) or 'nothing'}")
        if self.budget not in BUDGETS:
            raise ConfigError(f"--budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ConfigError(f"--seeds must be distinct integers >= 0, got {list(self.seeds)}")
        for lr in self.lrs:
            check_range("--lrs", lr, 1e-8, 1.0)
        unknown = [o for o in self.objective_lrs if o not in STYLES]
        if unknown:
            raise ConfigError(f"--objective-lrs names {', '.join(unknown)}: objectives are {', '.join(STYLES)}")
        for objective, lr in self.objective_lrs.items():
            check_range(f"--objective-lrs {objective}", lr, 1e-8, 1.0)
        if sweeps_any(self) and not self.val_images:
            raise ConfigError("--lrs with several values chooses on validation: --val-images must be > 0")
        check_range("--fusion-layers", self.fusion_layers, 1, 12)
        check_range("--itm-weight", self.itm_weight, 0.0)
        check_range("--mlm-weight", self.mlm_weight, 0.0)
        if "full" in self.variants and self.itm_weight <= 0 and self.mlm_weight <= 0:
            raise ConfigError("the full variant needs --itm-weight or --mlm-weight > 0 (or --variants itc)")
        if self.k_test is not None:
            check_range("--k-test", self.k_test, 1, self.test_images)
        if "cross_lingual" in self.objectives and "en" not in self.languages:
            raise ConfigError("objective cross_lingual needs 'en' among --languages")
        if "cross_lingual" in self.objectives and self.captions_per_image != len(self.languages):
            raise ConfigError("objective cross_lingual needs every language per image (--captions-per-image "
                              f"{len(self.languages)})")
        return self


def captions_per_image_step(objective: str, k: int) -> int:
    """Captions an image meets in one training step: all K (1-to-K; cross-lingual: English with
    the image, the other K−1 against English), or the one drawn (1-to-1)."""
    return 1 if objective == "one_to_one" else k


def epochs_for(cfg: CompareConfig, objective: str) -> int:
    """An arm's epochs: ``cfg.epochs``, times K / (captions per image-step) under the captions budget."""
    k = cfg.captions_per_image
    return cfg.epochs * (k // captions_per_image_step(objective, k) if cfg.budget == "captions" else 1)


def lrs_for(cfg: CompareConfig, objective: str) -> tuple[float, ...]:
    """The learning rates an arm trains with on its first seed: the one ``--objective-lrs`` fixes,
    else the ``--lrs`` to choose from on validation, else ``--lr``."""
    if objective in cfg.objective_lrs:
        return (cfg.objective_lrs[objective],)
    return tuple(cfg.lrs) or (cfg.lr,)


def sweeps_any(cfg: CompareConfig) -> bool:
    """Whether some arm chooses its learning rate on validation (so the runs are scored there)."""
    return any(len(lrs_for(cfg, o)) > 1 for o in cfg.objectives)


def summarize(report: dict[str, Any]) -> dict[str, float]:
    """One run's numbers that the comparison aggregates (recall means over languages)."""
    m = report["mean"]
    out = {f"{d}_R@{k}": m[d][f"R@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)}
    out["SumR"] = m["SumR"]
    out.update({f"MRV_{d}": report["mrv"][d] for d in ("t2i", "i2t")})
    out.update({f"recall_std_{d}": report["recall_std_across_languages"][d] for d in ("t2i", "i2t")})
    return out


def aggregate(summaries: Sequence[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """{metric: {"mean", "std", "values"}} over seeds; std is the sample std (0 for one seed)."""
    out = {}
    for key in SUMMARY_KEYS:
        values = [float(s[key]) for s in summaries if s.get(key) is not None]
        if values:
            out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                        "values": values}
    return out


def choose_lr(sweep: dict[float, float]) -> float:
    """The learning rate of the best validation score (ties: the smaller rate)."""
    return max(sorted(sweep), key=lambda lr: sweep[lr])


def _cell(agg: dict[str, Any], key: str, digits: int = 1) -> str:
    a = agg.get(key)
    return "–" if a is None else f"{a['mean']:.{digits}f} ± {a['std']:.{digits}f}"


def results_table(results: dict[str, dict[str, dict[str, Any]]], budget: dict[str, dict[str, Any]]) -> str:
    """Markdown: one table per ranking, one row per objective, mean ± std over seeds."""
    parts = []
    for ranking, per_objective in results.items():
        lines = [f"### {RANKINGS[ranking]}", "",
                 "| objective | lr | seeds | t2i R@1 | t2i R@5 | t2i R@10 | i2t R@1 | i2t R@5 | i2t R@10 | SumR | "
                 "MRV t2i | MRV i2t | recall std across languages t2i / i2t | train s |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for objective, res in per_objective.items():
            agg, b = res["aggregate"], budget[res["variant"]][objective]
            lines.append(f"| {objective} | {res['lr']:g} | {len(res['seeds'])} | "
                         + " | ".join(_cell(agg, f"{d}_R@{k}") for d in ("t2i", "i2t") for k in (1, 5, 10))
                         + f" | {_cell(agg, 'SumR')} | {_cell(agg, 'MRV_t2i', 2)} | {_cell(agg, 'MRV_i2t', 2)} | "
                         f"{_cell(agg, 'recall_std_t2i', 2)} / {_cell(agg, 'recall_std_i2t', 2)} | "
                         f"{b['train_seconds_mean']:.0f} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def sweep_table(sweeps: dict[str, dict[str, dict[float, float]]], chosen: dict[str, dict[str, float]]) -> str:
    lines = ["| variant | objective | lr | validation SumR (ITC) | chosen |", "|---|---|---|---|---|"]
    for variant, per_objective in sweeps.items():
        for objective, sweep in per_objective.items():
            for lr, score in sorted(sweep.items()):
                mark = "yes" if lr == chosen[variant][objective] else ""
                lines.append(f"| {variant} | {objective} | {lr:g} | {score:.1f} | {mark} |")
    return "\n".join(lines)


def budget_lines(cfg: CompareConfig, budget: dict[str, dict[str, Any]]) -> str:
    k = cfg.captions_per_image
    if cfg.budget == "images":
        first = (f"Budget per run ({cfg.budget}): {cfg.epochs} epochs of {cfg.train_images} images = "
                 f"{cfg.epochs * cfg.train_images} images seen and the same optimiser steps for every arm; "
                 "1-to-1 meets K x fewer captions per image-step, so it sees K x fewer captions.")
    else:
        first = (f"Budget per run ({cfg.budget}): the same captions seen by every arm; images seen: " + ", ".join(
            f"{o} {epochs_for(cfg, o) * cfg.train_images} ({epochs_for(cfg, o)} epochs)" for o in cfg.objectives) + ".")
    lines = [first,
             "Captions an image meets per step: " + ", ".join(
                 f"{o} {captions_per_image_step(o, k)}" for o in cfg.objectives) + ".",
             "Training wall time per run (mean over its runs, on this machine): " + "; ".join(
                 f"{v}/{o} {b['train_seconds_mean']:.0f} s" for v, per in budget.items() for o, b in per.items()) + "."]
    fixed = {o: lr for o, lr in cfg.objective_lrs.items() if o in cfg.objectives}
    if fixed:
        lines.append("Learning rates fixed per objective (--objective-lrs, no sweep here): "
                     + ", ".join(f"{o} {lr:g}" for o, lr in fixed.items()) + ".")
    return "\n".join(lines)


def comparison_figure(results: dict[str, dict[str, dict[str, Any]]]):
    """Per ranking (rows): recall (t2i R@1/5/10, i2t R@10) and MRV (t2i, i2t) per objective, mean
    with error bars (sample std over seeds)."""
    rankings = list(results)
    fig = Figure(figsize=(12, 3.6 * len(rankings)), dpi=100, layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rankings), 2, squeeze=False))
    for row, ranking in enumerate(rankings):
        objectives = list(results[ranking])
        x = np.arange(len(objectives))
        for ax, keys, label in ((axes[row, 0], ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@10"), "recall % (mean of languages)"),
                                (axes[row, 1], ("MRV_t2i", "MRV_i2t"), "MRV (lower: more consistent)")):
            width = 0.8 / len(keys)
            for i, key in enumerate(keys):
                aggs = [results[ranking][o]["aggregate"].get(key, {"mean": np.nan, "std": 0.0}) for o in objectives]
                ax.bar(x + (i - (len(keys) - 1) / 2) * width, [a["mean"] for a in aggs], width,
                       yerr=[a["std"] for a in aggs], capsize=3, label=key.replace("_", " "))
            ax.set_xticks(x, objectives)
            ax.set_ylabel(label)
            ax.set_title(RANKINGS[ranking], fontsize="medium")
            ax.legend(fontsize="small")
        axes[row, 0].set_ylim(0, 100)
    return fig


class Experiment:
    """The runs of one comparison: each trains on Ray Train, is evaluated here, and leaves its
    report.json (read back instead of training again). Ray starts (in ``cluster``) with the first
    run that has to train: a command whose runs are all kept only reads their reports."""

    def __init__(self, cfg: CompareConfig, out: Path, tokenizer, caption_tokenizer, cluster: contextlib.ExitStack):
        self.cfg, self.out, self.tokenizer, self.caption_tokenizer = cfg, out, tokenizer, caption_tokenizer
        self.cluster, self.ray_started = cluster, False
        self.test = load_split(str(out / "data" / "test"), cfg.languages, caption_tokenizer, cfg.image_size)
        self.val = (load_split(str(out / "data" / "val"), cfg.languages, caption_tokenizer, cfg.image_size)
                    if cfg.val_images and sweeps_any(cfg) else None)
        self.model_cfg = demo_model_config(cfg, tokenizer, fusion_layers=cfg.fusion_layers)

    def objective(self, variant: str, objective: str) -> dict[str, Any]:
        weights = ({"itm_weight": 0.0, "mlm_weight": 0.0} if variant == "itc"
                   else {"itm_weight": self.cfg.itm_weight, "mlm_weight": self.cfg.mlm_weight})
        _, args = objective_args(weights, self.tokenizer, self.cfg.languages)
        return {"name": objective, **args}

    def validation(self, model: CCRKModel) -> dict[str, Any]:
        """A run's score on the validation split, by ITC: what a sweep chooses its rate on."""
        return report_from_ranks(evaluate_in_process(model, self.val, k_test=None))

    def run(self, variant: str, objective: str, lr: float, seed: int) -> dict[str, Any]:
        run_dir = self.out / "runs" / variant / objective / f"lr{lr:g}-seed{seed}"
        done = run_dir / "report.json"
        if done.exists():
            log.info("%s/%s lr %g seed %d: kept from an earlier run", variant, objective, lr, seed)
            report = json.loads(done.read_text())
            if self.val is not None and "val" not in report:
                # kept from a command that chose no learning rate: a sweep now needs its validation score
                report["val"] = self.validation(CCRKModel.from_pretrained(run_dir / "model"))
                done.write_text(json.dumps(report, indent=2))
            return report
        if run_dir.exists():
            shutil.rmtree(run_dir)           # an interrupted run starts again from scratch
        if not self.ray_started:
            self.cluster.enter_context(ray_session(demo_cpus(self.cfg)))
            self.ray_started = True
        epochs = epochs_for(self.cfg, objective)
        cfg = dataclasses.replace(self.cfg, lr=lr, seed=seed, epochs=epochs)
        t0 = time.perf_counter()
        metrics = pretrain(cfg, self.out, run_dir, self.tokenizer, self.caption_tokenizer, self.model_cfg,
                           self.objective(variant, objective))
        seconds = time.perf_counter() - t0
        model = CCRKModel.from_pretrained(run_dir / "model")
        report: dict[str, Any] = {"variant": variant, "objective": objective, "lr": lr, "seed": seed,
                                  "train": metrics, "train_seconds": round(seconds, 1),
                                  "epochs": epochs, "images_seen": epochs * self.cfg.train_images,
                                  "captions_per_image_step": captions_per_image_step(objective, self.cfg.captions_per_image)}
        rankings = {variant: None} if variant == "itc" or self.cfg.k_test is None else {variant: None, "full_two_stage": self.cfg.k_test}
        report["test"] = {name: report_from_ranks(evaluate_in_process(model, self.test, k_test=k))
                          for name, k in rankings.items()}
        if self.val is not None:
            report["val"] = self.validation(model)
        done.write_text(json.dumps(report, indent=2))
        itc = report["test"][variant]
        log.info("%s/%s lr %g seed %d: test t2i R@10 %.1f, SumR %.1f, MRV t2i %.2f / i2t %.2f (%.0f s training)",
                 variant, objective, lr, seed, itc["mean"]["t2i"]["R@10"], itc["mean"]["SumR"],
                 itc["mrv"]["t2i"], itc["mrv"]["i2t"], seconds)
        return report


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    out, tokenizer, caption_tokenizer = prepare_experiment(cfg, MARKER, OUTPUTS, "compare", keep_same=True,
                                                           selection=SELECTION)
    sweeps: dict[str, dict[str, dict[float, float]]] = {}
    chosen: dict[str, dict[str, float]] = {}
    results: dict[str, dict[str, dict[str, Any]]] = {}
    budget: dict[str, dict[str, Any]] = {}
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as cluster:
        exp = Experiment(cfg, out, tokenizer, caption_tokenizer, cluster)
        for variant in cfg.variants:
            for objective in cfg.objectives:
                lrs = lrs_for(cfg, objective)
                first = {lr: exp.run(variant, objective, lr, cfg.seeds[0]) for lr in lrs}
                if len(lrs) > 1:
                    sweeps.setdefault(variant, {})[objective] = {lr: r["val"]["mean"]["SumR"] for lr, r in first.items()}
                    lr = choose_lr(sweeps[variant][objective])
                else:
                    lr = lrs[0]
                chosen.setdefault(variant, {})[objective] = lr
                mine = [first[lr]] + [exp.run(variant, objective, lr, s) for s in cfg.seeds[1:]]
                runs += list(first.values()) + mine[1:]
                budget.setdefault(variant, {})[objective] = {
                    "images_seen": mine[0]["images_seen"], "captions_per_image_step": mine[0]["captions_per_image_step"],
                    "train_seconds_mean": float(np.mean([r["train_seconds"] for r in mine]))}
                for ranking in mine[0]["test"]:
                    results.setdefault(ranking, {})[objective] = {
                        "variant": variant, "lr": lr, "seeds": list(cfg.seeds),
                        "aggregate": aggregate([summarize(r["test"][ranking]) for r in mine]),
                        "languages": {lang: [r["test"][ranking]["languages"][lang] for r in mine]
                                      for lang in cfg.languages}}
    table = "## Results (mean ± sample std over seeds)\n\n" + results_table(results, budget)
    table += "\n\n" + budget_lines(cfg, budget)
    if sweeps:
        table += "\n\n## Learning rate per arm (first seed, validation split)\n\n" + sweep_table(sweeps, chosen)
    fig = comparison_figure(results)
    fig.savefig(out / "compare.png")
    summary = {"config": dataclasses.asdict(cfg), "seconds": round(time.perf_counter() - t0, 1),
               "chosen_lr": chosen, "sweep": {v: {o: {f"{lr:g}": s for lr, s in sw.items()} for o, sw in per.items()}
                                             for v, per in sweeps.items()},
               "budget": budget, "results": results,
               "runs": [{k: r[k] for k in ("variant", "objective", "lr", "seed", "train_seconds")}
                        | {"test": {name: summarize(rep) for name, rep in r["test"].items()}} for r in runs]}
    (out / "compare.json").write_text(json.dumps(summary, indent=2, default=list))
    (out / "compare.md").write_text(table + "\n")
    summary["table"] = table
    log.info("comparison written to %s (compare.md, compare.png)", out)
    return summary
