"""The evaluation report: per-language recall with chance level, and MRV both ways.

Shape (a contract other tools read; recall and chance in percent):
``{"num_images", "languages": {lang: {"t2i": {"R@1", "R@5", "R@10", "chance@1", ...,
"MedR", "MeanR", "mAP"}, "i2t": {...}, "SumR", "r_mean"}}, "mrv": {"t2i", "i2t"},
"mean": {...}, "recall_std_across_languages": {...}}``.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from ccrk_ray.metrics import (chance_recall_at_k, mean_average_precision, mean_rank, mean_rank_variance,
                              median_rank, recall_at_k)

KS = (1, 5, 10)
DIRECTIONS = ("t2i", "i2t")


def direction_metrics(ranks: np.ndarray, num_candidates: int, relevant: np.ndarray | None = None) -> dict[str, float]:
    """Recall@1/5/10 with chance, MedR, MeanR, mAP. ``relevant``: correct items per query (default
    1 each); chance is then averaged over the queries."""
    out: dict[str, float] = {}
    for k in KS:
        out[f"R@{k}"] = recall_at_k(ranks, k)
        if relevant is None:
            out[f"chance@{k}"] = chance_recall_at_k(num_candidates, k)
        else:
            counts, freq = np.unique(relevant, return_counts=True)
            out[f"chance@{k}"] = float(sum(f * chance_recall_at_k(num_candidates, k, int(c))
                                           for c, f in zip(counts, freq)) / freq.sum())
    out["MedR"] = median_rank(ranks)
    out["MeanR"] = mean_rank(ranks)
    out["mAP"] = mean_average_precision(ranks)
    return out


def build_report(t2i: np.ndarray, i2t: np.ndarray, languages: Sequence[str]) -> dict[str, Any]:
    """Report from N×K rank matrices (column k = languages[k]), one caption per image and language."""
    n, k = t2i.shape
    if i2t.shape != (n, k) or len(languages) != k:
        raise ValueError(f"rank matrices {t2i.shape}/{i2t.shape} do not match {len(languages)} languages")
    per_lang = {lang: {d: direction_metrics(r[:, j], n) for d, r in zip(DIRECTIONS, (t2i, i2t))}
                for j, lang in enumerate(languages)}
    return _assemble(per_lang, t2i, i2t, n, languages)


def build_report_multi(num_images: int, per_language: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
                       ) -> dict[str, Any]:
    """Report for data with several captions per image and language.

    ``per_language[lang] = (t2i, i2t, owner)`` as ``rank_with_owners`` returns them plus the
    captions' image indices. Text→image recall is over every caption; image→text uses each image's
    best-ranked caption (images without a caption in that language are left out). For MRV an
    image's text→image rank in a language is the mean over its captions there, and a language
    it has no caption in is left out of its spread.
    """
    languages = list(per_language)
    n = num_images
    per_lang, t2i_mat, i2t_mat = {}, np.full((n, len(languages)), np.nan), np.full((n, len(languages)), np.nan)
    for j, lang in enumerate(languages):
        t2i, i2t, owner = (np.asarray(a) for a in per_language[lang])
        has = i2t >= 0
        counts = np.bincount(owner, minlength=n)
        per_lang[lang] = {"t2i": direction_metrics(t2i, n),
                          "i2t": direction_metrics(i2t[has], len(owner), relevant=counts[has])}
        t2i_mat[has, j] = (np.bincount(owner, weights=t2i, minlength=n)[has] / counts[has])
        i2t_mat[has, j] = i2t[has]
    return _assemble(per_lang, t2i_mat, i2t_mat, n, languages)


def _assemble(per_lang: dict, t2i: np.ndarray, i2t: np.ndarray, n: int, languages: Sequence[str]) -> dict[str, Any]:
    for m in per_lang.values():
        m["SumR"] = float(sum(m[d][f"R@{kk}"] for d in DIRECTIONS for kk in KS))
        m["r_mean"] = m["SumR"] / (len(DIRECTIONS) * len(KS))
    mean = {d: {f"R@{kk}": float(np.mean([per_lang[l][d][f"R@{kk}"] for l in languages])) for kk in KS}
            for d in DIRECTIONS}
    r_mean = float(np.mean([mean[d][f"R@{kk}"] for d in DIRECTIONS for kk in KS]))
    report = {"num_images": int(n), "languages": per_lang,
              "mean": {**mean, "r_mean": r_mean, "SumR": r_mean * len(DIRECTIONS) * len(KS)},
              "recall_std_across_languages": {
                  d: float(np.std([per_lang[l][d]["R@1"] for l in languages])) for d in DIRECTIONS}}
    report["mrv"] = ({d: mean_rank_variance(r) for d, r in zip(DIRECTIONS, (t2i, i2t))} if len(languages) >= 2
                     else {d: None for d in DIRECTIONS})
    return report


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
    averages; its histogram shows whether a few instances or all of them disagree."""
    arr = np.asarray(ranks, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError(f"ranks must be N×K with K >= 2 languages, got shape {arr.shape}")
    return np.nanstd(arr, axis=1, ddof=0)


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
    average ranks). NaN where a language's ranks are all equal (e.g. a perfect model)."""
    arr = np.asarray(ranks, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"ranks must be N×K, got shape {arr.shape}")
    r = np.stack([_average_ranks(col) for col in arr.T], axis=1)
    r -= r.mean(axis=0)
    norm = np.sqrt((r ** 2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (r.T @ r) / np.outer(norm, norm)
    return np.clip(corr, -1.0, 1.0)


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
