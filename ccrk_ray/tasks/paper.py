"""``ccrk paper-tables --config FILE --start-from CKPT``: the paper's xFlickr&CO tables from one
pre-trained checkpoint, in one run.

1. **Zero-shot**: fine-tune on English (task ``xflickrco``; the config's ``zero_shot`` section is a
   ``ccrk finetune`` config of that task: data.train/val/test, translate_test, overrides) and test in
   every language of the test set.
2. **Few-shot**: for each language of ``few_shot.languages``, fine-tune the English model on that
   language's N-shot files (task ``xflickrco_fewshot``, ``few_shot.data.<lang>.train/val``, the
   overrides of ``few_shot.config``) and test in that language on the same test set.
3. **MRV** as the paper computes it: en from the English model, every other language of
   ``mrv_languages`` from its own few-shot model, over the test images (their rank files).

Writes ``output_dir/paper_tables.md`` and ``.json``: Recall@1 (text→image, image→text) per
language in each setting with the average over the non-English languages, the translate-test row
when given, and MRV. Every run lands in ``output_dir/zero_shot`` and ``output_dir/few_shot/<lang>``;
a run whose report exists is not run again, so submitting the same command again continues.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ccrk_ray.core.config import ConfigError, build, read_config
from ccrk_ray.core.languages import validate_languages
from ccrk_ray.core.log import get_logger
from ccrk_ray.core.runtime import ray_session
from ccrk_ray.eval.evaluate import RANKS_FILE, run_cpus
from ccrk_ray.eval.ranks import mrv_over_runs
from ccrk_ray.tasks.finetune import load_config, run_finetune

log = get_logger(__name__)

ZERO, FEW = "xflickrco", "xflickrco_fewshot"


@dataclass
class FewShotSection:
    languages: tuple[str, ...] = ("de", "es", "id", "ja", "ru", "tr", "zh")
    shots: int = 100                               # which N-shot files (documentation and the table)
    data: dict[str, Any] = field(default_factory=dict)     # {lang: {train: URI, val: URI}}
    config: dict[str, Any] = field(default_factory=dict)   # overrides of every few-shot run (train:, scaling:)


@dataclass
class PaperConfig:
    output_dir: str = "runs/paper_tables"
    zero_shot: dict[str, Any] = field(default_factory=dict)   # a ccrk finetune config of task xflickrco
    few_shot: dict[str, Any] = field(default_factory=dict)
    mrv_languages: tuple[str, ...] = ("en", "de", "ja", "zh")

    def few(self) -> FewShotSection:
        return build(FewShotSection, self.few_shot, "few_shot")


def _write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def plan(config_path: str | Path, checkpoint: str | Path) -> tuple[PaperConfig, dict[str, Path], dict[str, float]]:
    """The config checked, each run's finetune config written ({"zero_shot" | lang: file}), and
    the CPUs each run holds at once. Every run's config is loaded as ``ccrk finetune`` would (the
    few-shot ones against the checkpoint's architecture, which the English model keeps) before
    anything trains."""
    cfg = build(PaperConfig, read_config(config_path), str(config_path))
    few = cfg.few()
    few.languages = validate_languages(few.languages, known=None)
    cfg.mrv_languages = validate_languages(cfg.mrv_languages, known=None)
    missing = [lang for lang in few.languages if not isinstance(few.data.get(lang), dict)
               or not few.data[lang].get("train")]
    if missing:
        raise ConfigError(f"{config_path}: few_shot.data needs train (and val) URIs for {', '.join(missing)}")
    not_run = [lang for lang in cfg.mrv_languages if lang != "en" and lang not in few.languages]
    if not_run:
        raise ConfigError(f"{config_path}: mrv_languages {', '.join(not_run)} have no few-shot run")
    test = cfg.zero_shot.get("data", {}).get("test")
    if not isinstance(test, str):
        raise ConfigError(f"{config_path}: zero_shot.data.test must be the one xFlickr&CO test URI (all languages)")
    out = Path(cfg.output_dir)
    runs = {"zero_shot": _write_yaml(out / "configs" / "zero_shot.yaml",
                                     {**cfg.zero_shot, "output_dir": str(out / "zero_shot")})}
    zero, _ = load_config(ZERO, runs["zero_shot"], checkpoint)
    cpus = {"zero_shot": zero.cpus_held()}
    if zero.data.languages != ("en",):
        raise ConfigError(f"{config_path}: the zero-shot run trains English alone, not {', '.join(zero.data.languages)}")
    for lang in few.languages:
        user = {**few.config, "output_dir": str(out / "few_shot" / lang)}
        user["data"] = {**few.config.get("data", {}), **few.data[lang], "test": test}
        user["task"] = {**few.config.get("task", {}), "train_languages": [lang], "val_languages": [lang],
                        "test_languages": [lang]}
        runs[lang] = _write_yaml(out / "configs" / f"few_shot_{lang}.yaml", user)
        cpus[lang] = load_config(FEW, runs[lang], checkpoint)[0].cpus_held()
    return cfg, runs, cpus


def run_paper_tables(config_path: str | Path, checkpoint: str | Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg, runs, cpus = plan(config_path, checkpoint)
    out = Path(cfg.output_dir)
    reports, pending = {}, []
    for name in runs:
        done = out / ("zero_shot" if name == "zero_shot" else f"few_shot/{name}") / "report.json"
        if done.is_file():
            log.info("%s: already done (%s)", name, done)
            reports[name] = json.loads(done.read_text())
        else:
            pending.append(name)
    if pending:
        # one cluster for every run (each run's own session joins it): a cluster start and its
        # worker processes' imports once, not once per language
        with ray_session(run_cpus(max(cpus[name] for name in pending))):
            for name in pending:
                start = checkpoint if name == "zero_shot" else out / "zero_shot" / "model"
                log.info("paper tables: %s run from %s", name, start)
                reports[name] = run_finetune(ZERO if name == "zero_shot" else FEW, runs[name], start)
    tables = build_tables(cfg, reports, out)
    tables["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "paper_tables.json").write_text(json.dumps(tables, indent=2))
    (out / "paper_tables.md").write_text(format_tables(tables))
    log.info("tables written to %s", out / "paper_tables.md")
    return tables


def _r1(report: dict[str, Any], lang: str) -> dict[str, float]:
    m = report["languages"][lang]
    return {"t2i": m["t2i"]["R@1"], "i2t": m["i2t"]["R@1"]}


def build_tables(cfg: PaperConfig, reports: dict[str, dict[str, Any]], out: Path) -> dict[str, Any]:
    """Recall@1 per setting and language (and the non-English average), and the paper's MRV."""
    few = cfg.few()
    zero_test = reports["zero_shot"]["test"]["test"]
    rows = {"zero_shot": {lang: _r1(zero_test, lang) for lang in zero_test["languages"]},
            f"few_shot_{few.shots}": {lang: _r1(reports[lang]["test"]["test"], lang) for lang in few.languages}}
    if "translate_test" in reports["zero_shot"]["test"]:
        tt = reports["zero_shot"]["test"]["translate_test"]
        rows["translate_test"] = {lang: _r1(tt, lang) for lang in tt["languages"]}
    for row in rows.values():
        others = [v for lang, v in row.items() if lang != "en"]
        if others:
            row["avg"] = {d: sum(v[d] for v in others) / len(others) for d in ("t2i", "i2t")}
    specs = [f"{out / 'zero_shot' / 'test' / 'test' / RANKS_FILE}:en"]
    specs += [f"{out / 'few_shot' / lang / 'test' / 'test' / RANKS_FILE}:{lang}" for lang in cfg.mrv_languages
              if lang != "en"]
    mrv = mrv_over_runs(specs) if len(specs) >= 2 else None
    return {"recall_at_1": rows, "mrv": mrv, "shots": few.shots,
            "zero_shot_mrv": zero_test.get("mrv"), "languages": list(zero_test["languages"])}


def format_tables(tables: dict[str, Any]) -> str:
    langs = tables["languages"]
    cols = langs + ["avg"]
    lines = ["# xFlickr&CO", "", "Recall@1 (%), text→image (IR) / image→text (TR); avg over the non-English "
             "languages.", "", "| setting | dir | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for setting, row in tables["recall_at_1"].items():
        for d, name in (("t2i", "IR"), ("i2t", "TR")):
            cells = [f"{row[c][d]:.1f}" if c in row else "" for c in cols]
            lines.append(f"| {setting} | {name} | " + " | ".join(cells) + " |")
    mrv = tables["mrv"]
    if mrv:
        runs = ", ".join(f"{lang} from {Path(path).parents[2].name}" for lang, path in mrv["runs"].items())
        lines += ["", f"MRV over {', '.join(mrv['languages'])} ({mrv['num_images']} test images; {runs}): "
                      f"IR {mrv['mrv']['t2i']:.2f}, TR {mrv['mrv']['i2t']:.2f}"]
    zero = tables.get("zero_shot_mrv") or {}
    if zero.get("t2i") is not None:
        lines.append(f"MRV of the English model over all {len(langs)} languages: IR {zero['t2i']:.2f}, "
                     f"TR {zero['i2t']:.2f}")
    return "\n".join(lines) + "\n"
