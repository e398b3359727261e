"""NRCCR's runs: ``ccrk nrccr train`` (Ray Train, then the selected model on the test sets) and
``ccrk nrccr evaluate`` (a saved NRCCR model on NRCCR splits, fused native + translated scores)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import pyarrow.parquet as pq

from ccrk_ray.core import storage
from ccrk_ray.core.config import ConfigError
from ccrk_ray.core.log import get_logger
from ccrk_ray.core.runtime import local_cpus, ray_session
from ccrk_ray.data.nrccr import LANGUAGE, load_nrccr_split
from ccrk_ray.data.tokenizer import CaptionTokenizer, load_tokenizer
from ccrk_ray.data.transforms import ImageTransform
from ccrk_ray.eval.actors import ActorRanking
from ccrk_ray.eval.nrccr import evaluate_languages
from ccrk_ray.model.nrccr import NRCCRModel
from ccrk_ray.model.saved import Preprocess, resolve_model_dir
from ccrk_ray.train.nrccr import NRCCRTrainConfig, check_nrccr_data, run_nrccr_training

log = get_logger(__name__)

REPORT = "report.json"


def split_language(uri: str, endpoint_url: str | None = None) -> str:
    """The ``language`` of an NRCCR split (``ccrk convert nrccr --language``)."""
    fs, files = storage.list_parquet(uri, endpoint_url)
    column = pq.ParquetFile(fs.open_input_file(files[0])).read_row_group(0, columns=[LANGUAGE]).column(LANGUAGE)
    if not len(column) or column[0].as_py() is None:
        raise ConfigError(f"{uri}: no language recorded; give it as LANG=URI")
    return column[0].as_py()


def as_language_map(data: str | Mapping[str, str], endpoint_url: str | None = None) -> dict[str, str]:
    return dict(data) if isinstance(data, Mapping) else {split_language(data, endpoint_url): data}


def format_report(report: dict[str, Any]) -> str:
    """A markdown table: per language, fused recall both ways, SumR, and each query alone."""
    lines = ["| lang | t2i R@1 | R@5 | R@10 | i2t R@1 | R@5 | R@10 | SumR | native alone | translation alone |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for lang, r in report["languages"].items():
        t, i = r["t2i"], r["i2t"]
        lines.append(f"| {lang} | {t['R@1']:.1f} | {t['R@5']:.1f} | {t['R@10']:.1f} | {i['R@1']:.1f} | {i['R@5']:.1f} "
                     f"| {i['R@10']:.1f} | {r['SumR']:.1f} | {r['native']['SumR']:.1f} | {r['translated']['SumR']:.1f} |")
    mrv = report["mrv"]
    tail = f"\nMRV t2i {mrv['t2i']:.2f} / i2t {mrv['i2t']:.2f} over {mrv['num_items']} items" if mrv["t2i"] is not None else ""
    return "\n".join(lines) + f"\n\nfused with native weight {report['fusion_weight']}{tail}\n"


def evaluate_nrccr(model_path: str | Path, data: str | Mapping[str, str], out: str | Path, *, weight: float = 0.5,
                   tokenizer: str | None = None, max_length: int | None = None,
                   endpoint_url: str | None = None, actors: int = 0) -> dict[str, Any]:
    """Fused evaluation of a saved NRCCR model on {language: split} (or one split, its language
    read from it); writes ``report.json`` and ``report.md`` to ``out``. The splits are embedded
    in this process (NRCCR's test sets are 1–2.5K items); both passes of the fused ranking run on
    ``actors`` eval actors (in a Ray session: ``RAY_ADDRESS``'s cluster or a local one), or here
    when ``actors`` is 0. Neither holds a query × item score matrix."""
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"fusion weight must be in [0, 1], got {weight}")
    if actors < 0:
        raise ConfigError(f"--actors must be >= 0, got {actors}")
    directory = resolve_model_dir(model_path, family="nrccr")
    model = NRCCRModel.from_pretrained(directory)
    pre = Preprocess.read(directory)
    length = max_length or pre.max_length
    if not length:
        raise ConfigError(f"{model_path}: no max_length in preprocess.json; pass --max-length")
    tok = CaptionTokenizer(load_tokenizer(tokenizer or directory), length)
    c = model.config
    kwargs = dict(max_frames=c.max_frames if c.visual == "frames" else 1,
                  feature_dim=c.visual_dim if c.visual != "clip" else None,
                  image_transform=ImageTransform(pre.image_size or 224, train=False) if c.visual == "clip" else None,
                  endpoint_url=endpoint_url, on_bad_row="skip")
    splits = {lang: load_nrccr_split(uri, tok, **kwargs) for lang, uri in as_language_map(data, endpoint_url).items()}
    if actors:
        with ray_session(local_cpus(actors)):
            report = evaluate_languages(model, splits, weight, ActorRanking(num_actors=actors))
    else:
        report = evaluate_languages(model, splits, weight)
    report["model"] = str(directory)
    report["ranked_on"] = f"{actors} eval actor(s)" if actors else "this process"
    report["skipped"] = {lang: s["skipped"] for lang, s in splits.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(format_report(report))
    return report


def run_nrccr(cfg: NRCCRTrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train, then evaluate the selected model (the best on validation, else the final one) on
    ``data.test`` with ``train.fusion_weight``, ranked on as many eval actors as the run's
    largest worker count, in the same cluster."""
    check = check_nrccr_data(cfg)
    with ray_session(local_cpus(cfg.cpus_held())):
        summary = run_nrccr_training(cfg, resume=resume, check=check)
        if cfg.data.test:
            chosen = summary["best_model"] or summary["model"]
            out = Path(cfg.output_dir).resolve() / "test"
            summary["test"] = evaluate_nrccr(chosen, cfg.data.test, out, weight=cfg.train.fusion_weight,
                                             endpoint_url=cfg.data.endpoint_url, actors=cfg.scaling.workers[1])
            log.info("test (%s model):\n%s", "best" if summary["best_model"] else "final",
                     format_report(summary["test"]))
    return summary
