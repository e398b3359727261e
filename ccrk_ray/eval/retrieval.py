"""Embedding and ranking for retrieval evaluation, with no Ray in it.

Per-language protocol: for language l, the gallery of a text→image query is the N test images and
the gallery of an image→text query is the N captions in language l, so chance Recall@k is k/N in
both directions. Ranks are 0-based with ties counted against the query (see
``ccrk_ray.metrics.ranks_from_scores``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ccrk_ray.metrics import ranks_from_scores


class Embedder:
    """1-to-K batch (see OneToKBatchTransform) → ``image_emb`` N×d and ``text_emb`` N×K×d."""

    def __init__(self, model_dir: str | Path, threads: int | None = None):
        from ccrk_ray.train.state import load_model

        if threads:
            torch.set_num_threads(threads)
        self.model = load_model(model_dir).eval()

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = torch.as_tensor(batch["input_ids"])
        n, k, length = ids.shape
        img = self.model.encode_image(torch.as_tensor(batch["pixel_values"]))
        txt = self.model.encode_text(ids.view(n * k, length),
                                     torch.as_tensor(batch["attention_mask"]).view(n * k, length))
        return {"image_id": np.asarray(batch["image_id"], dtype=object), "image_emb": img.numpy(),
                "text_emb": txt.view(n, k, -1).numpy()}


def rank_per_language(image_emb: np.ndarray, text_emb: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Ranks of the correct item, N×K each: (text→image, image→text).

    ``image_emb`` N×d, ``text_emb`` N×K×d (caption k of image i is text_emb[i, k]). Queries are
    scored in chunks so at most chunk × N scores exist at once.
    """
    n, k = text_emb.shape[:2]
    if image_emb.shape[0] != n:
        raise ValueError(f"{image_emb.shape[0]} images but captions for {n}")
    t2i = np.empty((n, k), dtype=np.int64)
    i2t = np.empty((n, k), dtype=np.int64)
    for lang in range(k):
        gallery_txt = text_emb[:, lang]
        for start in range(0, n, chunk):
            rows = np.arange(start, min(n, start + chunk))
            t2i[rows, lang] = ranks_from_scores(gallery_txt[rows] @ image_emb.T, rows)
            i2t[rows, lang] = ranks_from_scores(image_emb[rows] @ gallery_txt.T, rows)
    return t2i, i2t
