"""Evaluation plots (PNG, matplotlib's Agg canvas: no display needed) and TensorBoard logging.

- ``recall_per_language.png``: R@1/5/10 per language, text→image and image→text, chance dashed.
- ``rank_spread_hist.png``: per-instance std of the rank across languages (what MRV averages).
- ``rank_correlation.png``: Spearman correlation of per-instance ranks between languages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

from ccrk_ray.eval.report import DIRECTIONS, KS, language_rank_correlation, rank_spread

TITLES = {"t2i": "text → image", "i2t": "image → text"}


def _figure(width: float, height: float):
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def recall_figure(report: dict[str, Any]):
    langs = list(report["languages"])
    fig = _figure(max(6.0, 1.2 * len(langs) + 2), 6.5)
    x = np.arange(len(langs))
    width = 0.8 / len(KS)
    for ax, d in zip(fig.subplots(2, 1, sharex=True), DIRECTIONS):
        for i, k in enumerate(KS):
            values = [report["languages"][lang][d][f"R@{k}"] for lang in langs]
            ax.bar(x + (i - (len(KS) - 1) / 2) * width, values, width, label=f"R@{k}")
            ax.hlines([report["languages"][lang][d][f"chance@{k}"] for lang in langs],
                      x + (i - len(KS) / 2) * width, x + (i + 1 - len(KS) / 2) * width, colors="k",
                      linestyles="dashed", linewidth=0.8)
        ax.set_ylabel("recall %")
        ax.set_ylim(0, 100)
        ax.set_title(f"{TITLES[d]} (dashed: chance)")
        ax.legend(loc="upper right", fontsize="small")
    ax.set_xticks(x, langs)
    return fig


def rank_spread_figure(t2i: np.ndarray, i2t: np.ndarray, mrv: dict[str, float | None]):
    fig = _figure(9, 3.8)
    for ax, d, ranks in zip(fig.subplots(1, 2), DIRECTIONS, (t2i, i2t)):
        spread = rank_spread(ranks)
        top = max(1.0, float(np.nanmax(spread)))
        ax.hist(spread[~np.isnan(spread)], bins=min(50, max(10, int(np.sqrt(len(spread))))), range=(0, top))
        ax.axvline(mrv[d], color="r", linestyle="dashed", label=f"MRV {mrv[d]:.2f}")
        ax.set_xlabel("std of the rank across languages")
        ax.set_ylabel("instances")
        ax.set_title(TITLES[d])
        ax.legend(fontsize="small")
    return fig


def rank_correlation_figure(corr: dict[str, np.ndarray], languages: Sequence[str]):
    fig = _figure(10, 4.6)
    for ax, d in zip(fig.subplots(1, 2), DIRECTIONS):
        im = ax.imshow(np.ma.masked_invalid(corr[d]), vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(len(languages)), languages)
        ax.set_yticks(range(len(languages)), languages)
        ax.set_title(f"rank correlation, {TITLES[d]}")
        if len(languages) <= 12:
            for (i, j), v in np.ndenumerate(corr[d]):
                ax.text(j, i, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=fig.axes, shrink=0.8, label="Spearman ρ")
    return fig


def make_figures(report: dict[str, Any], t2i: np.ndarray, i2t: np.ndarray) -> dict[str, Any]:
    """name → matplotlib Figure; the rank plots need at least 2 languages."""
    langs = list(report["languages"])
    figs = {"recall_per_language": recall_figure(report)}
    if len(langs) >= 2:
        figs["rank_spread_hist"] = rank_spread_figure(t2i, i2t, report["mrv"])
        corr = {d: language_rank_correlation(r) for d, r in zip(DIRECTIONS, (t2i, i2t))}
        figs["rank_correlation"] = rank_correlation_figure(corr, langs)
    return figs


def figure_rgb(fig) -> np.ndarray:
    """H×W×3 uint8 pixels of a figure."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def write_plots(figs: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in figs.items():
        paths[name] = out_dir / f"{name}.png"
        fig.savefig(paths[name])
    return paths


def log_tensorboard(log_dir: str | Path, report: dict[str, Any], t2i: np.ndarray, i2t: np.ndarray,
                    figs: dict[str, Any], step: int = 0) -> None:
    """Scalars ``eval/<lang>/<dir>_R@k``, ``eval/mean/...``, ``eval/mrv_<dir>``; histograms of the
    per-instance rank spread; the plots as images ``eval/<plot name>``."""
    with SummaryWriter(str(log_dir)) as writer:
        for lang, m in report["languages"].items():
            for d in DIRECTIONS:
                for k in KS:
                    writer.add_scalar(f"eval/{lang}/{d}_R@{k}", m[d][f"R@{k}"], step)
                writer.add_scalar(f"eval/{lang}/{d}_MeanR", m[d]["MeanR"], step)
            writer.add_scalar(f"eval/{lang}/r_mean", m["r_mean"], step)
        for d in DIRECTIONS:
            for k in KS:
                writer.add_scalar(f"eval/mean/{d}_R@{k}", report["mean"][d][f"R@{k}"], step)
            if report["mrv"][d] is not None:
                writer.add_scalar(f"eval/mrv_{d}", report["mrv"][d], step)
        writer.add_scalar("eval/mean/r_mean", report["mean"]["r_mean"], step)
        if t2i.shape[1] >= 2:
            for d, ranks in zip(DIRECTIONS, (t2i, i2t)):
                spread = rank_spread(ranks)
                writer.add_histogram(f"eval/rank_spread_{d}", spread[~np.isnan(spread)], step)
        for name, fig in figs.items():
            writer.add_image(f"eval/{name}", figure_rgb(fig), step, dataformats="HWC")
