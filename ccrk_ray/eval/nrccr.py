"""NRCCR evaluation: a native-language query and its English machine translation are both scored
against every item, each score matrix min–max normalised over the whole matrix and mixed with
weight w (``ccrk_ray.metrics.fuse_scores``; the reference tests with w = 0.5 and validates with
0.2). Reported per language with ``retrieval_metrics`` (every caption a text→item query; an item's
best-ranked caption for item→text), for the fused scores and for each query alone; MRV over the
languages' common items when several test sets are given.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ccrk_ray.data.schema import IMAGE_ID
from ccrk_ray.metrics import fuse_scores, item_ranks_for_mrv, mean_rank_variance, retrieval_metrics
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


def split_scores(model: NRCCRModel, split: Mapping[str, np.ndarray], batch_size: int = 256) -> dict[str, np.ndarray]:
    """(native, translated) query × item cosine scores of a split."""
    emb = embed_split(model, split, batch_size=batch_size)
    return {"native": emb["native"] @ emb["items"].T, "translated": emb["native_en"] @ emb["items"].T}


def fused_report(scores: Mapping[str, np.ndarray], owner: np.ndarray, weight: float) -> dict[str, Any]:
    """Metrics of the fused scores (top level) and of each query alone (``native``, ``translated``)."""
    fused = fuse_scores(scores["native"], scores["translated"], weight)
    out = retrieval_metrics(fused, owner)
    out["fusion_weight"] = weight
    out["native"] = retrieval_metrics(scores["native"], owner)
    out["translated"] = retrieval_metrics(scores["translated"], owner)
    out["t2i"]["num_queries"] = out["i2t"]["num_candidates"] = int(len(owner))
    out["t2i"]["num_candidates"] = out["i2t"]["num_queries"] = int(fused.shape[1])
    return out


def evaluate_languages(model: NRCCRModel, splits: Mapping[str, Mapping[str, np.ndarray]],
                       weight: float = 0.5) -> dict[str, Any]:
    """{language: loaded split} → ``{"languages": {lang: fused_report}, "mean": {...}, "mrv": ...}``.
    MRV (rank std across languages per item, averaged) over the items every language has, from the
    fused scores."""
    report: dict[str, Any] = {"languages": {}, "fusion_weight": weight}
    ranks: dict[str, dict[str, dict[str, int]]] = {}
    for lang, split in splits.items():
        scores = split_scores(model, split)
        report["languages"][lang] = fused_report(scores, split["owner"], weight)
        t2i, i2t = item_ranks_for_mrv(fuse_scores(scores["native"], scores["translated"], weight), split["owner"])
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
