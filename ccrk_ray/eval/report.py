"""The evaluation report: per-language recall with chance level, and MRV both ways.

Shape (a contract other tools read; recall and chance in percent, MedR/MeanR 1-based, mAP a
fraction): ``{"num_images", "num_captions": {lang: M}, "languages": {lang: {"t2i": {"R@1", "R@5",
"R@10", "chance@1", ..., "MedR", "MeanR", "mAP", "num_queries", "num_candidates"}, "i2t": {...},
"SumR", "r_mean"}}, "mrv": {"t2i", "i2t"}, "mean": {...}, "recall_std_across_languages": {...}}``.

Every caption counts (``ccrk_ray.metrics.retrieval_metrics``): in language l the text→image
queries are all of l's captions over a gallery of the images l has captions for, and the image→text
queries are those images over all of l's captions. MRV: per image, the population std across the
languages it has captions in of its rank (text→image: the mean rank of its captions in the
language; image→text: its best rank), averaged over images with at least two languages; with one
caption per image and language, the paper's definition.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from ccrk_ray.eval.ranks import RankSet
from ccrk_ray.metrics import chance_recall_at_k, mean_rank_variance

KS = (1, 5, 10)
DIRECTIONS = ("t2i", "i2t")


def _chance(num_candidates: int, relevant: np.ndarray) -> dict[str, float]:
    """Chance Recall@k averaged over queries with ``relevant`` correct candidates each."""
    counts, freq = np.unique(relevant, return_counts=True)
    return {f"chance@{k}": float(sum(f * chance_recall_at_k(num_candidates, k, int(c)) for c, f in zip(counts, freq))
                                 / freq.sum()) for k in KS}


def language_metrics(ranks) -> dict[str, Any]:
    """One language's block of the report from its ``LanguageRanks``."""
    m = ranks.metrics()
    images, per_image = np.unique(ranks.owner, return_counts=True)
    out = {"t2i": {**m["t2i"], **_chance(len(images), np.ones(1, dtype=np.int64)),
                   "num_queries": ranks.num_captions, "num_candidates": int(len(images))},
           "i2t": {**m["i2t"], **_chance(ranks.num_captions, per_image),
                   "num_queries": int(len(images)), "num_candidates": ranks.num_captions}}
    out["SumR"] = m["SumR"]
    out["r_mean"] = m["SumR"] / (len(DIRECTIONS) * len(KS))
    return out


def report_from_ranks(ranks: RankSet) -> dict[str, Any]:
    """The report of a ``RankSet`` (several captions per image and language, or one)."""
    languages = list(ranks.languages)
    if not languages:
        raise ValueError("no languages ranked")
    per_lang = {lang: language_metrics(r) for lang, r in ranks.languages.items()}
    mean = {d: {f"R@{kk}": float(np.mean([per_lang[l][d][f"R@{kk}"] for l in languages])) for kk in KS}
            for d in DIRECTIONS}
    r_mean = float(np.mean([mean[d][f"R@{kk}"] for d in DIRECTIONS for kk in KS]))
    report = {"num_images": int(ranks.num_images),
              "num_captions": {lang: r.num_captions for lang, r in ranks.languages.items()},
              "languages": per_lang,
              "mean": {**mean, "r_mean": r_mean, "SumR": r_mean * len(DIRECTIONS) * len(KS)},
              "recall_std_across_languages": {
                  d: float(np.std([per_lang[l][d]["R@1"] for l in languages])) for d in DIRECTIONS}}
    mats = ranks.matrices()
    report["mrv"] = {d: None for d in DIRECTIONS}
    if len(languages) >= 2 and ((~np.isnan(mats[0])).sum(axis=1) >= 2).any():
        report["mrv"] = {d: mean_rank_variance(r) for d, r in zip(DIRECTIONS, mats)}
    return report


def average_reports(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every number of several reports of the same languages averaged (the COCO 1K protocol: the
    mean of five 1K folds' R@k, MedR, ..., MRV); counts (``num_*``) are summed."""
    def mean(values: list) -> Any:
        first = values[0]
        if isinstance(first, dict):
            return {k: mean([v[k] for v in values]) for k in first}
        if first is None or any(v is None for v in values):
            return None
        return float(np.mean(values))

    def merge(values: list, key: str = "") -> Any:
        if isinstance(values[0], dict):       # inside a num_* block (num_captions) every value is a count
            return {k: merge([v[k] for v in values], key if key.startswith("num_") else k) for k in values[0]}
        if key.startswith("num_"):
            return int(sum(values))
        return mean(values)

    keys = ("num_images", "num_captions", "languages", "mean", "recall_std_across_languages", "mrv")
    return {k: merge([r[k] for r in reports], k) for k in keys}


def build_report(t2i: np.ndarray, i2t: np.ndarray, languages: Sequence[str]) -> dict[str, Any]:
    """Report from N×K 0-based rank matrices (column k = languages[k]), one caption per image and
    language: ``report_from_ranks(RankSet.from_matrices(...))``."""
    return report_from_ranks(RankSet.from_matrices(t2i, i2t, languages))


def format_table(report: dict[str, Any]) -> str:
    """Plain-text table: one row per language, recall (chance) both directions."""
    head = (f"{'lang':<5}" + "".join(f"{d + ' R@' + str(k):>18}" for d in DIRECTIONS for k in KS))
    lines = [f"N = {report['num_images']} test images; recall % (chance %)", head, "-" * len(head)]
    for lang, m in report["languages"].items():
        cells = "".join(f"{m[d][f'R@{k}']:>10.1f} ({m[d][f'chance@{k}']:>4.1f})" for d in DIRECTIONS for k in KS)
        lines.append(f"{lang:<5}{cells}")
    mean = report["mean"]
    lines.append(f"{'mean':<5}" + "".join(f"{mean[d][f'R@{k}']:>10.1f}{'':>8}" for d in DIRECTIONS for k in KS))
    mrv = report["mrv"]
    if mrv["t2i"] is not None:
        lines.append(f"MRV (mean rank std across languages, lower = more consistent): "
                     f"t2i {mrv['t2i']:.2f}   i2t {mrv['i2t']:.2f}")
    return "\n".join(lines)


# --- extras for plots and other tools --------------------------------------------------------

def rank_spread(ranks: np.ndarray) -> np.ndarray:
    """Per-instance population std (ddof=0) of the rank across languages (N,): the quantity MRV
    averages; its histogram shows whether a few instances or all of them disagree. NaN ranks (no
    caption in that language) are left out; an instance ranked in fewer than 2 languages is NaN."""
    arr = np.asarray(ranks, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError(f"ranks must be N×K with K >= 2 languages, got shape {arr.shape}")
    out = np.full(arr.shape[0], np.nan)
    enough = (~np.isnan(arr)).sum(axis=1) >= 2
    out[enough] = np.nanstd(arr[enough], axis=1, ddof=0)
    return out


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank (as Spearman's rho wants)."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    first = np.flatnonzero(starts)
    size = np.diff(np.r_[first, len(x)])
    out = np.empty(len(x), dtype=np.float64)
    out[order] = (first + (size + 1) / 2.0)[np.cumsum(starts) - 1]
    return out


def language_rank_correlation(ranks: np.ndarray) -> np.ndarray:
    """K×K Spearman correlation of the per-instance ranks of each pair of languages (ties get
    average ranks), over the instances ranked in both (NaN: no rank in that language). NaN where
    a language's ranks are all equal (e.g. a perfect model) or fewer than 2 instances are shared."""
    arr = np.asarray(ranks, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"ranks must be N×K, got shape {arr.shape}")
    k = arr.shape[1]
    corr = np.full((k, k), np.nan)
    present = ~np.isnan(arr)
    for a in range(k):
        for b in range(a, k):
            both = present[:, a] & present[:, b]
            if both.sum() < 2:
                continue
            x, y = _average_ranks(arr[both, a]), _average_ranks(arr[both, b])
            x, y = x - x.mean(), y - y.mean()
            norm = np.sqrt((x ** 2).sum() * (y ** 2).sum())
            corr[a, b] = corr[b, a] = np.clip(x @ y / norm, -1.0, 1.0) if norm > 0 else np.nan
    return corr


CLIP_BENCHMARK_TASK = "zeroshot_retrieval"


def clip_benchmark_filename(result: dict[str, Any]) -> str:
    """CLIP_benchmark's own output name, ``{dataset}_{pretrained}_{model}_{language}_{task}.json``
    (path separators and colons turned into ``-``), so that runs of several models, checkpoints and
    languages live in one folder side by side."""
    parts = [result[k] for k in ("dataset", "pretrained", "model", "language", "task")]
    return "_".join(re.sub(r"[/\\:]+", "-", str(p)).strip("-.") for p in parts) + ".json"


def clip_benchmark_results(report: dict[str, Any], dataset: str, model: str, pretrained: str) -> list[dict[str, Any]]:
    """One CLIP_benchmark result per language, shaped as its ``clip_benchmark eval`` dump:
    ``{"dataset", "model", "pretrained", "task", "metrics", "language"}`` with
    ``image_retrieval_recall@k`` (text→image) and ``text_retrieval_recall@k`` (image→text) as
    fractions in [0, 1], so ``clip_benchmark build`` merges them with its own runs. Extra metric
    keys (columns of its table): ``*_MedR`` (1-based), ``*_mAP`` (a fraction) and, with two or more
    languages, ``*_MRV`` (the run's mean rank variance across its languages: the same in every
    language's file)."""
    out = []
    mrv = report.get("mrv") or {}
    for lang, m in report["languages"].items():
        metrics = {}
        for k in KS:
            metrics[f"image_retrieval_recall@{k}"] = m["t2i"][f"R@{k}"] / 100.0
            metrics[f"text_retrieval_recall@{k}"] = m["i2t"][f"R@{k}"] / 100.0
        for prefix, d in (("image_retrieval", "t2i"), ("text_retrieval", "i2t")):
            metrics[f"{prefix}_MedR"] = m[d]["MedR"]
            metrics[f"{prefix}_mAP"] = m[d]["mAP"]
            if mrv.get(d) is not None:
                metrics[f"{prefix}_MRV"] = mrv[d]
        out.append({"dataset": dataset, "model": model, "pretrained": pretrained, "task": CLIP_BENCHMARK_TASK,
                    "metrics": metrics, "language": lang})
    return out
