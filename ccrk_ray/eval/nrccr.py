"""NRCCR evaluation: a native-language query and its English machine translation are both scored
against every item, each score matrix min–max normalised over the whole matrix and mixed with
weight w (``ccrk_ray.metrics.fuse_scores`` defines it; the reference tests with w = 0.5 and
validates with 0.2). Computed in two passes that never hold a score matrix (``rank_split``), in
this process or on the eval actors, and reported per language as ``retrieval_metrics`` does
(every caption a text→item query; an item's best-ranked caption for item→text), for the fused
scores and for each query alone; MRV over the languages' common items when several test sets are
given.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ccrk_ray.data.schema import IMAGE_ID
from ccrk_ray.eval.ranks import RankSet
from ccrk_ray.eval.retrieval import Captions, InProcessRanking
from ccrk_ray.metrics import item_ranks_from_rivals, mean_rank_variance
from ccrk_ray.model.nrccr import NRCCRModel


@torch.no_grad()
def embed_split(model: NRCCRModel, split: Mapping[str, np.ndarray], views=("native", "native_en"),
                batch_size: int = 256) -> dict[str, np.ndarray]:
    """Common-space embeddings of a loaded split (``load_nrccr_split``): ``items`` and each view's
    captions, in eval mode (the caller's mode is restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    visual = torch.as_tensor(split["visual"])
    mask = torch.as_tensor(split["visual_mask"]) if "visual_mask" in split else None
    items = [model.encode_item(visual[i:i + batch_size].to(device),
                               None if mask is None else mask[i:i + batch_size].to(device))
             for i in range(0, len(visual), batch_size)]
    out = {"items": torch.cat(items).float().cpu().numpy()}
    for view in views:
        ids, am = torch.as_tensor(split[f"{view}_ids"]), torch.as_tensor(split[f"{view}_mask"])
        out[view] = torch.cat([model.encode_text(ids[i:i + batch_size].to(device), am[i:i + batch_size].to(device))
                               for i in range(0, len(ids), batch_size)]).float().cpu().numpy()
    model.train(was_training)
    return out


def fused_queries(native: np.ndarray, translated: np.ndarray, weight: float, native_range: tuple[float, float],
                  translated_range: tuple[float, float]) -> np.ndarray:
    """Query embeddings whose scores with the items rank exactly as ``fuse_scores`` does. Min–max
    normalisation is affine, so for item v: w·(n·v − lo_n)/(hi_n − lo_n) + (1 − w)·(t·v − lo_t)/(hi_t − lo_t)
    = (a·n + b·t)·v + c with a = w/(hi_n − lo_n), b = (1 − w)/(hi_t − lo_t) and c the same for every
    (query, item) pair, which no rank sees. The fused matrix then never exists: the eval actors
    rank these queries like any others. A matrix without spread (hi = lo) contributes nothing, as
    in ``fuse_scores``."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fusion weight must be in [0, 1], got {weight}")
    if native.shape != translated.shape:
        raise ValueError(f"native queries {native.shape} and translated queries {translated.shape} differ in shape")

    def scale(share, rng):
        lo, hi = rng
        return share / (hi - lo) if hi > lo else 0.0

    out = scale(weight, native_range) * native.astype(np.float64) \
        + scale(1.0 - weight, translated_range) * translated.astype(np.float64)
    return out.astype(np.float32)


QUERIES = ("native", "translated", "fused")


def rank_split(items: np.ndarray, native: np.ndarray, translated: np.ndarray, owner: np.ndarray, weight: float,
               ranking=None) -> RankSet:
    """Ranks of one split's native queries, their translations and the fused pair, as the three
    "languages" of a ``RankSet`` (``QUERIES``). Two passes over the query × item scores: each
    matrix's (min, max) (``ranking.score_ranges``), then ranking with ``fused_queries``
    (``ranking.rank``). ``ranking``: ``InProcessRanking`` (default) or the eval actors'
    ``ActorRanking``; neither holds a whole score matrix."""
    ranking = ranking or InProcessRanking()
    owner = np.asarray(owner, dtype=np.int64)
    m = len(owner)
    pair = Captions(np.concatenate([native, translated]), np.r_[owner, owner], [0, m, 2 * m], QUERIES[:2])
    ranges = ranking.score_ranges(items, pair)
    fused = fused_queries(native, translated, weight, ranges["native"], ranges["translated"])
    three = Captions(np.concatenate([native, translated, fused]), np.r_[owner, owner, owner], [0, m, 2 * m, 3 * m],
                     QUERIES)
    return ranking.rank(items, three)


def language_report(ranks: RankSet, weight: float) -> dict[str, Any]:
    """Metrics of the fused queries (top level) and of each query alone (``native``, ``translated``),
    with the query and candidate counts of both directions."""
    out = ranks.languages["fused"].metrics()
    out["fusion_weight"] = weight
    for view in QUERIES[:2]:
        out[view] = ranks.languages[view].metrics()
    captions = ranks.languages["fused"].num_captions
    out["t2i"]["num_queries"] = out["i2t"]["num_candidates"] = int(captions)
    out["t2i"]["num_candidates"] = out["i2t"]["num_queries"] = int(ranks.num_images)
    return out


def evaluate_split(model: NRCCRModel, split: Mapping[str, np.ndarray], weight: float, ranking=None) -> RankSet:
    """``rank_split`` of a loaded split, embedded here."""
    emb = embed_split(model, split)
    return rank_split(emb["items"], emb["native"], emb["native_en"], split["owner"], weight, ranking)


def evaluate_languages(model: NRCCRModel, splits: Mapping[str, Mapping[str, np.ndarray]],
                       weight: float = 0.5, ranking=None) -> dict[str, Any]:
    """{language: loaded split} → ``{"languages": {lang: language_report}, "mean": {...}, "mrv": ...}``.
    MRV (rank std across languages per item, averaged) over the items every language has, from the
    fused ranks (``ccrk_ray.metrics`` defines an item's rank with several captions)."""
    report: dict[str, Any] = {"languages": {}, "fusion_weight": weight}
    ranks: dict[str, dict[str, dict[str, float]]] = {}
    for lang, split in splits.items():
        result = evaluate_split(model, split, weight, ranking)
        report["languages"][lang] = language_report(result, weight)
        fused = result.languages["fused"]
        t2i, i2t = item_ranks_from_rivals(fused.t2i, fused.i2t, fused.own, fused.owner, result.num_images)
        ids = [str(i) for i in split[IMAGE_ID]]
        ranks[lang] = {"t2i": dict(zip(ids, t2i.tolist())), "i2t": dict(zip(ids, i2t.tolist()))}
    langs = list(report["languages"])
    report["mean"] = {"SumR": float(np.mean([report["languages"][lang]["SumR"] for lang in langs]))}
    report["mrv"] = {"t2i": None, "i2t": None, "num_items": 0}
    if len(langs) > 1:
        common = sorted(set.intersection(*(set(ranks[lang]["t2i"]) for lang in langs)))
        report["mrv"]["num_items"] = len(common)
        if common:
            for d in ("t2i", "i2t"):
                matrix = np.array([[ranks[lang][d][i] for lang in langs] for i in common], dtype=np.float64)
                report["mrv"][d] = mean_rank_variance(matrix)
    return report
