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

    def __init__(self, model_dir: str | Path, threads: int | None = None, device: str | None = None):
        from ccrk_ray.train.state import load_model

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_model(model_dir).eval().to(self.device)

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = torch.as_tensor(batch["input_ids"], device=self.device)
        n, k, length = ids.shape
        img = self.model.encode_image(torch.as_tensor(batch["pixel_values"], device=self.device))
        mask = torch.as_tensor(batch["attention_mask"], device=self.device)
        txt = self.model.encode_text(ids.view(n * k, length), mask.view(n * k, length))
        return {"image_id": np.asarray(batch["image_id"], dtype=object), "image_emb": img.float().cpu().numpy(),
                "text_emb": txt.view(n, k, -1).float().cpu().numpy()}


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


# --- two-stage retrieval: ITC shortlist, ITM re-ranking ---------------------------------------

def topk_candidates(scores: np.ndarray, k: int) -> np.ndarray:
    """Q×k candidate indices of the k best scores per query (ties broken by lower index)."""
    q, c = scores.shape
    if not 1 <= k <= c:
        raise ValueError(f"k_test={k} must be between 1 and the gallery size {c}")
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def rerank(scores: np.ndarray, topk: np.ndarray, new_scores: np.ndarray) -> np.ndarray:
    """Scores where each query's top-k candidates are re-ordered by ``new_scores`` (Q×k) and lifted
    above every other candidate; the others keep their first-stage scores and order."""
    out = scores.astype(np.float64, copy=True)
    lift = out.max() - float(np.min(new_scores)) + 1.0
    np.put_along_axis(out, topk, new_scores.astype(np.float64) + lift, axis=1)
    return out


@torch.no_grad()
def itm_scores(model, image_tokens: torch.Tensor, text_hidden: torch.Tensor, text_mask: torch.Tensor,
               image_idx: np.ndarray, text_idx: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Matching score (the ITM head's "match" logit, as X-VLM ranks by) of each (image, text) pair."""
    out = []
    for start in range(0, len(image_idx), batch_size):
        i = torch.as_tensor(image_idx[start:start + batch_size], device=image_tokens.device)
        t = torch.as_tensor(text_idx[start:start + batch_size], device=text_hidden.device)
        fused = model.fuse(text_hidden[t], text_mask[t], image_tokens[i])
        out.append(model.itm_head(fused)[:, 1].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


@torch.no_grad()
def evaluate_in_process(model, batch: Mapping[str, np.ndarray], k_test: int | None = None,
                        chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(t2i, i2t) rank matrices N×K of a model on one 1-to-K batch (the whole test split).

    ``k_test=None``: ITC similarity only. Otherwise two-stage as in the paper: every query's top
    ``k_test`` candidates by ITC are re-scored with the ITM head (needs fusion layers).
    """
    model.eval()
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
    ids = torch.as_tensor(np.asarray(batch["input_ids"]), device=device)
    masks = torch.as_tensor(np.asarray(batch["attention_mask"]), device=device)
    n, k, length = ids.shape
    tokens = model.image_tokens(torch.as_tensor(np.asarray(batch["pixel_values"]), device=device))
    image_feat = model.image_feature(tokens)
    hidden = model.text_hidden(ids.view(n * k, length), masks.view(n * k, length))
    text_feat = model.text_feature(hidden).view(n, k, -1)
    if k_test is None:
        return rank_per_language(image_feat.float().cpu().numpy(), text_feat.float().cpu().numpy(), chunk=chunk)
    if not model.has_fusion:
        raise ValueError("two-stage evaluation (k_test) needs a model with fusion layers; use itc_only")
    hidden = hidden.view(n, k, length, -1)
    t2i = np.empty((n, k), dtype=np.int64)
    i2t = np.empty((n, k), dtype=np.int64)
    correct = np.arange(n)
    img = image_feat.float().cpu().numpy()
    for lang in range(k):
        txt = text_feat[:, lang].float().cpu().numpy()
        lang_hidden, lang_mask = hidden[:, lang], masks[:, lang]
        s_t2i = txt @ img.T                                   # caption queries × images
        top = topk_candidates(s_t2i, k_test)
        q_idx = np.repeat(np.arange(n), k_test)
        new = itm_scores(model, tokens, lang_hidden, lang_mask, top.ravel(), q_idx).reshape(n, k_test)
        t2i[:, lang] = ranks_from_scores(rerank(s_t2i, top, new), correct)
        s_i2t = s_t2i.T                                       # image queries × captions
        top = topk_candidates(s_i2t, k_test)
        new = itm_scores(model, tokens, lang_hidden, lang_mask, q_idx, top.ravel()).reshape(n, k_test)
        i2t[:, lang] = ranks_from_scores(rerank(s_i2t, top, new), correct)
    return t2i, i2t


# --- several captions per image and language (COCO / Flickr30k / Multi30K style) -------------

def rank_with_owners(image_emb: np.ndarray, text_emb: np.ndarray, owner: np.ndarray,
                     chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Ranks for one language whose M captions belong to images ``owner`` (M,) among N images.

    Returns (t2i (M,): rank of each caption's image among the N images; i2t (N,): the *best*
    rank among the image's own captions, i.e. the number of other images' captions scoring >=
    its best-scoring caption; -1 for an image with no caption in this language).
    """
    owner = np.asarray(owner, dtype=np.int64)
    n, m = image_emb.shape[0], text_emb.shape[0]
    if owner.shape != (m,) or (m and (owner.min() < 0 or owner.max() >= n)):
        raise ValueError(f"owner must give an image index in [0, {n}) for each of the {m} captions")
    t2i = np.empty(m, dtype=np.int64)
    for start in range(0, m, chunk):
        rows = np.arange(start, min(m, start + chunk))
        t2i[rows] = ranks_from_scores(text_emb[rows] @ image_emb.T, owner[rows])
    i2t = np.full(n, -1, dtype=np.int64)
    has = np.bincount(owner, minlength=n) > 0
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk))
        scores = image_emb[rows] @ text_emb.T                           # chunk × M
        own = owner[None, :] == rows[:, None]
        best = np.where(own, scores, -np.inf).max(axis=1, keepdims=True)
        ranks = ((scores >= best) & ~own).sum(axis=1)
        i2t[rows] = np.where(has[rows], ranks, -1)
    return t2i, i2t
