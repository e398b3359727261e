"""Embedding and ranking for retrieval evaluation, with no Ray in it.

Per-language protocol: for language l, the gallery of a text→image query is the N test images and
the gallery of an image→text query is the N captions in language l, so chance Recall@k is k/N in
both directions. Ranks are 0-based with ties counted against the query (see
``ccrk_ray.metrics.ranks_from_scores``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

from ccrk_ray.metrics import ranks_from_scores


def _no_grad(fn):
    """``torch.no_grad()`` as a decorator that imports torch only when called. torch and the model
    are imported inside the functions that need them, on purpose: the eval actors import this
    module to rank (numpy only) and start seconds faster without them."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)
    return wrapper


# Embedding precision: open_clip's names (amp_bf16, amp / amp_fp16) and ours (bf16, fp16) -> autocast dtype
PRECISIONS = {"fp32": None, "amp_bf16": "bfloat16", "bf16": "bfloat16", "amp": "float16", "amp_fp16": "float16",
              "fp16": "float16"}


class Embedder:
    """1-to-K batch (see OneToKBatchTransform) → ``image_emb`` N×d and ``text_emb`` N×K×d (float32;
    computed under autocast for a ``precision`` other than fp32)."""

    def __init__(self, model_dir, threads: int | None = None, device: str | None = None, precision: str = "fp32"):
        """``model_dir``: a saved model (directory or training checkpoint) or an ``OpenClipSpec``;
        ``device`` None: CUDA when this process sees a GPU (a GPU actor sees only its own)."""
        import torch

        from ccrk_ray.model.openclip import load_encoders

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_encoders(model_dir).to(self.device)
        dtype = PRECISIONS[precision]
        self.autocast = torch.autocast(self.device.type, dtype=getattr(torch, dtype or "float32"),
                                       enabled=dtype is not None)

    @_no_grad
    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        # Ray Data hands read-only arrays (object-store memory); torch wants writable ones
        ids = torch.as_tensor(np.array(batch["input_ids"]), device=self.device)
        n, k, length = ids.shape
        mask = torch.as_tensor(np.array(batch["attention_mask"]), device=self.device)
        with self.autocast:
            img = self.model.encode_image(torch.as_tensor(np.array(batch["pixel_values"]), device=self.device))
            txt = self.model.encode_text(ids.view(n * k, length), mask.view(n * k, length))
        return {"image_id": np.asarray(batch["image_id"], dtype=object), "image_emb": img.float().cpu().numpy(),
                "text_emb": txt.view(n, k, -1).float().cpu().numpy()}


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


@_no_grad
def itm_scores(model, image_tokens: torch.Tensor, text_hidden: torch.Tensor, text_mask: torch.Tensor,
               image_idx: np.ndarray, text_idx: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Matching score (the ITM head's "match" logit, as X-VLM ranks by) of each (image, text) pair."""
    import torch

    out = []
    for start in range(0, len(image_idx), batch_size):
        i = torch.as_tensor(image_idx[start:start + batch_size], device=image_tokens.device)
        t = torch.as_tensor(text_idx[start:start + batch_size], device=text_hidden.device)
        fused = model.fuse(text_hidden[t], text_mask[t], image_tokens[i])
        out.append(model.itm_head(fused)[:, 1].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def _encode_batch(model, batch: Mapping[str, np.ndarray]):
    """(image tokens, text hidden states (N·K)×L×h, attention mask N×K×L) of a 1-to-K batch, on
    the model's device (the model in eval mode)."""
    import torch

    model.eval()
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
    ids = torch.as_tensor(np.asarray(batch["input_ids"]), device=device)
    masks = torch.as_tensor(np.asarray(batch["attention_mask"]), device=device)
    n, k, length = ids.shape
    tokens = model.image_tokens(torch.as_tensor(np.asarray(batch["pixel_values"]), device=device))
    return tokens, model.text_hidden(ids.view(n * k, length), masks.view(n * k, length)), masks


@_no_grad
def evaluate_in_process(model, batch: Mapping[str, np.ndarray],
                        k_test: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(t2i, i2t) rank matrices N×K of a model on one 1-to-K batch (the whole test split).

    ``k_test=None``: ITC similarity only. Otherwise two-stage as in the paper: every query's top
    ``k_test`` candidates by ITC are re-scored with the ITM head (needs fusion layers).
    """
    tokens, hidden, masks = _encode_batch(model, batch)
    n, k, length = masks.shape
    image_feat = model.image_feature(tokens)
    text_feat = model.text_feature(hidden).view(n, k, -1)
    if k_test is None:
        # the documented tie policy (as ``ccrk evaluate`` and the eval actors), not dense float32
        return rank_sharded(image_feat.float().cpu().numpy(), text_feat.float().cpu().numpy())
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


# --- sharded ranking: what each eval actor runs (pure numpy, no Ray) -------------------------
#
# Tie policy (deterministic, independent of sharding and chunking): a candidate ranks at or above
# the correct item when its *exact* score is >= the correct item's, so ties count against the
# query (as ``ranks_from_scores``). The exact score of a pair is the dot product of its float32
# embeddings accumulated in float64 (``exact_scores``: one code path, so identical embeddings give
# identical scores and tie). Scores come from float32 matrix products; a float32 dot product of
# length d is within (d+2)·2⁻²⁴·‖x‖‖y‖ of the exact one, so only candidates inside that band
# around the true score are re-scored exactly. This matters: OpenBLAS gives different last bits
# for the same row computed in chunks of 13, 64 or 2048 rows, and a dense float32 computation
# (one score matrix per language) can rank near-ties either way; here every shard layout and chunk size
# gives the same ranks, equal to the dense ones whenever the float32 scores are exact (test data).
# Two-stage: the k best float32 ITC scores, ties at the k-th broken by lower gallery index (as
# ``topk_candidates``); a correct item outside them keeps its ITC rank (at least k), one inside is
# ranked among them by the re-scorer (ties again against the query). Shards start on multiples of
# ``chunk`` so that the float32 products, and so the top-k sets, are the same in any layout.

SCORE_BUDGET_BYTES = 128 << 20      # one query chunk's float32 scores against the whole gallery
GALLERY_TILE = 2048                 # ITC mode: gallery columns per product (chunk × tile stays in cache)
_U32 = 2.0 ** -24                   # float32 unit roundoff


def default_chunk(gallery_size: int, budget_bytes: int = SCORE_BUDGET_BYTES) -> int:
    """Query rows scored at once: a multiple of 16 in [16, 512] whose scores fit ``budget_bytes``.
    It depends on the gallery size only, never on the number of actors."""
    rows = budget_bytes // (4 * max(1, gallery_size))
    return int(min(512, max(16, rows // 16 * 16)))


def check_inputs(image_emb: np.ndarray, text_emb: np.ndarray, languages: Sequence[str] | None = None,
                 query_languages: Sequence[str] | None = None) -> list[int]:
    """Validate a gallery (``image_emb`` N×d, ``text_emb`` N×K×d) and return the column of each
    query language (all K when ``query_languages`` is None). Raises ValueError naming the problem."""
    image_emb, text_emb = np.asarray(image_emb), np.asarray(text_emb)
    if image_emb.ndim != 2:
        raise ValueError(f"image embeddings must be N×d, got shape {image_emb.shape}")
    if text_emb.ndim != 3:
        raise ValueError(f"caption embeddings must be N×K×d (image × language × dim), got shape {text_emb.shape}")
    if image_emb.shape[0] == 0:
        raise ValueError("empty gallery: no image embeddings")
    if text_emb.shape[0] != image_emb.shape[0]:
        raise ValueError(f"captions for {text_emb.shape[0]} images but {image_emb.shape[0]} image embeddings")
    if text_emb.shape[2] != image_emb.shape[1]:
        raise ValueError(f"embedding dimensions differ: images are {image_emb.shape[1]}-d, captions "
                         f"{text_emb.shape[2]}-d")
    k = text_emb.shape[1]
    names = list(languages) if languages is not None else [str(j) for j in range(k)]
    if len(names) != k:
        raise ValueError(f"caption embeddings have {k} language columns but {len(names)} language names "
                         f"({', '.join(names)})")
    if len(set(names)) != len(names):
        raise ValueError(f"a gallery language appears twice: {', '.join(names)}")
    query = list(query_languages) if query_languages is not None else names
    if not query:
        raise ValueError("no query languages")
    missing = [lang for lang in query if lang not in names]
    if missing:
        raise ValueError(f"query language(s) {', '.join(map(repr, missing))} not in the gallery, which has "
                         f"captions in: {', '.join(names)}")
    bad = ~np.isfinite(image_emb)
    if bad.any():
        row = int(np.argmax(bad.any(axis=1)))
        raise ValueError(f"image embeddings hold {int(bad.sum())} NaN/inf value(s), the first in image {row}")
    for j in range(k):
        bad = ~np.isfinite(text_emb[:, j])
        if bad.any():
            row = int(np.argmax(bad.any(axis=1)))
            raise ValueError(f"caption embeddings in language {names[j]!r} hold {int(bad.sum())} NaN/inf "
                             f"value(s), the first in image {row}")
    return [names.index(lang) for lang in query]


def exact_scores(captions: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Row-wise scores of P (caption, image) pairs, P×d each, accumulated in float64. Every exact
    score in this module goes through here, so equal embeddings give bitwise-equal scores."""
    return (np.asarray(captions, dtype=np.float64) * np.asarray(images, dtype=np.float64)).sum(axis=1)


def true_scores(image_emb: np.ndarray, text_emb: np.ndarray, rows: int = 8192) -> np.ndarray:
    """N×K float64 exact score of each caption with its own image (the tie policy's true score)."""
    n, k = text_emb.shape[:2]
    out = np.empty((n, k), dtype=np.float64)
    for lang in range(k):
        for start in range(0, n, rows):
            txt = np.ascontiguousarray(text_emb[start:start + rows, lang])     # strided → float64 is slow
            out[start:start + rows, lang] = exact_scores(txt, image_emb[start:start + rows])
    return out


def shard_bounds(n: int, num_shards: int, chunk: int) -> list[tuple[int, int]]:
    """Contiguous, non-empty [start, stop) ranges over n queries, starting on multiples of
    ``chunk``, as equal as whole chunks allow (fewer than ``num_shards`` when n has fewer chunks)."""
    if n < 1 or num_shards < 1 or chunk < 1:
        raise ValueError(f"need n, num_shards and chunk >= 1, got {n}, {num_shards}, {chunk}")
    chunks = -(-n // chunk)
    shards = min(num_shards, chunks)
    cuts = sorted({0, chunks, *(int(round(i * n / shards / chunk)) for i in range(1, shards))})
    return [(a * chunk, min(n, b * chunk)) for a, b in zip(cuts[:-1], cuts[1:])]


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Q×k indices of each row's k best scores: the same sets as ``topk_candidates`` (ties at the
    k-th score go to lower indices) without sorting whole rows, except rows tied at the boundary."""
    q, c = scores.shape
    if not 1 <= k <= c:
        raise ValueError(f"k_test={k} must be between 1 and the gallery size {c}")
    import torch

    t = torch.from_numpy(np.ascontiguousarray(scores))
    vals, idx = torch.topk(t, k, dim=1, sorted=False)
    kth = vals.min(dim=1, keepdim=True).values
    tied = ((t >= kth).sum(dim=1) > k).numpy()      # more candidates at the k-th score than places
    out = idx.numpy().astype(np.int64)
    if tied.any():
        out[tied] = np.argsort(-scores[tied], axis=1, kind="stable")[:, :k]
    return out


def _band(true: np.ndarray, eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (lo, hi) with lo <= true − eps and hi >= true + eps."""
    lo = np.nextafter((true - eps).astype(np.float32), np.float32(-np.inf))
    hi = np.nextafter((true + eps).astype(np.float32), np.float32(np.inf))
    return lo, hi


def _count_at_or_above(scores: np.ndarray, lo: np.ndarray, hi: np.ndarray, true: np.ndarray, axis: int, exact,
                       mask: np.ndarray) -> np.ndarray:
    """Per query — rows of ``scores`` (axis=1) or columns (axis=0) — the number of candidates whose
    exact score is >= the query's ``true`` score. ``lo``/``hi`` (float32, shaped (q, 1) or (1, c))
    bound the band where float32 cannot decide (``_band``): entries outside it are counted from the
    float32 scores, those inside (rare) get ``exact(rows, cols)``. ``mask`` is a bool buffer of the
    scores' shape. Cost: two comparisons and one count per entry."""
    np.greater_equal(scores, lo, out=mask)
    counts = _row_counts(mask) if axis == 1 else _col_counts(mask)
    n_lo = np.count_nonzero(mask)
    np.greater_equal(scores, hi, out=mask)
    if np.count_nonzero(mask) == n_lo:
        return counts                                   # nothing within rounding of a true score
    queries = np.flatnonzero(counts - (_row_counts(mask) if axis == 1 else _col_counts(mask)))
    if axis == 1:
        sub = scores[queries]
        r, c = np.nonzero((sub >= lo[queries]) & (sub < hi[queries]))
        r = owner = queries[r]
    else:
        sub = scores[:, queries]
        r, c = np.nonzero((sub >= lo[:, queries]) & (sub < hi[:, queries]))
        c = owner = queries[c]
    hit = exact(r, c) >= true[owner]
    return counts - np.bincount(owner[~hit], minlength=len(true))


def _row_counts(mask: np.ndarray) -> np.ndarray:
    return mask.view(np.uint8).sum(axis=1, dtype=np.int32).astype(np.int64)


def _col_counts(mask: np.ndarray) -> np.ndarray:
    """Column sums of a bool matrix, 255 rows at a time in uint8 (several times faster than int64)."""
    out = np.zeros(mask.shape[1], dtype=np.int64)
    u8 = mask.view(np.uint8)
    for start in range(0, len(u8), 255):
        out += u8[start:start + 255].sum(axis=0, dtype=np.uint8)
    return out


@dataclass
class ShardRanks:
    """One shard's result. ``t2i`` (stop−start)×L: ranks of the shard's captions (L query
    languages). Image→text: ``i2t`` (stop−start)×L ranks in two-stage mode; in ITC mode
    ``i2t_counts`` N×L instead: for every image, how many of the shard's captions other than its
    own score >= its own caption; ``merge_shards`` sums them over shards."""

    start: int
    stop: int
    t2i: np.ndarray
    i2t: np.ndarray | None = None
    i2t_counts: np.ndarray | None = None


Rescore = Callable[[int, str, np.ndarray, np.ndarray], np.ndarray]
"""Two-stage re-scorer: (language column, "t2i" | "i2t", query indices Q, candidates Q×k) → Q×k."""


def rank_shard(image_emb: np.ndarray, text_emb: np.ndarray, start: int, stop: int, *, true: np.ndarray,
               columns: Sequence[int] | None = None, k_test: int | None = None, rescore: Rescore | None = None,
               chunk: int | None = None, tile: int | None = None) -> ShardRanks:
    """Rank the queries of rows [start, stop) against the whole gallery, ``chunk`` rows at a time.

    ITC mode (``rescore`` None): float32 products of ``chunk`` captions × ``tile`` images (small
    enough to stay in cache while they are compared) serve both directions: rows give text→image
    ranks, columns the image→text counts. Memory O(chunk × tile). Two-stage mode: whole rows
    (O(chunk × N)); each query's top ``k_test`` by ITC are re-scored by ``rescore``. ``true`` is
    ``true_scores(...)``. Never the full score matrix. Tie policy: see the comment above.
    """
    n, k_all = text_emb.shape[:2]
    if not 0 <= start <= stop <= n:
        raise ValueError(f"shard [{start}, {stop}) is outside the {n} queries")
    if stop == start:
        raise ValueError(f"empty shard [{start}, {stop}): it holds no queries")
    columns = list(range(k_all)) if columns is None else list(columns)
    chunk = chunk or default_chunk(n)
    if start % chunk:
        raise ValueError(f"shard start {start} is not a multiple of chunk={chunk} (see shard_bounds)")
    two_stage = rescore is not None
    if two_stage and (k_test is None or not 1 <= k_test <= n):
        raise ValueError(f"two-stage ranking needs k_test between 1 and the gallery size {n}, got {k_test}")
    rows_n, d = stop - start, image_emb.shape[1]
    t2i = np.empty((rows_n, len(columns)), dtype=np.int64)
    i2t = np.empty((rows_n, len(columns)), dtype=np.int64) if two_stage else None
    counts = None if two_stage else np.zeros((n, len(columns)), dtype=np.int64)
    width = n if two_stage else min(n, tile or GALLERY_TILE)      # two-stage needs whole rows for top-k
    buf = np.empty((min(chunk, rows_n), width), dtype=np.float32)
    mask = np.empty(buf.shape, dtype=bool)
    images = np.ascontiguousarray(image_emb, dtype=np.float32)
    img_norm = np.linalg.norm(images, axis=1).astype(np.float64)
    bound = (d + 2) * _U32 * 1.0001             # float32 dot-product error per unit of ‖x‖‖y‖
    for j, lang in enumerate(columns):
        true_l = np.asarray(true[:, lang], dtype=np.float64)
        captions = np.ascontiguousarray(text_emb[:, lang], dtype=np.float32)
        txt_norm = np.linalg.norm(captions, axis=1).astype(np.float64)
        if not two_stage:           # image→text bands: each image's true score ± its error bound
            col_lo, col_hi = _band(true_l, bound * img_norm * txt_norm[start:stop].max())
            col_lo, col_hi = col_lo[None, :], col_hi[None, :]
        for c0 in range(start, stop, chunk):
            c1 = min(stop, c0 + chunk)
            rows = np.arange(c0, c1)
            local = slice(c0 - start, c1 - start)
            row_lo, row_hi = _band(true_l[c0:c1], bound * txt_norm[c0:c1] * img_norm.max())
            row_lo, row_hi = row_lo[:, None], row_hi[:, None]
            if not two_stage:
                row_counts = np.zeros(c1 - c0, dtype=np.int64)
                for w0 in range(0, n, width):                    # tiles small enough to stay in cache
                    w1 = min(n, w0 + width)
                    scores, tile_mask = buf[:c1 - c0, :w1 - w0], mask[:c1 - c0, :w1 - w0]
                    np.matmul(captions[c0:c1], images[w0:w1].T, out=scores)   # caption rows × images
                    own = np.arange(max(c0, w0), min(c1, w1))
                    scores[own - c0, own - w0] = -np.inf          # the pair itself is not a rival

                    def exact_t(r, c, c0=c0, w0=w0):              # scores[r, c]: caption c0+r, image w0+c
                        return exact_scores(captions[c0 + r], images[w0 + c])

                    row_counts += _count_at_or_above(scores, row_lo, row_hi, true_l[c0:c1], 1, exact_t, tile_mask)
                    counts[w0:w1, j] += _count_at_or_above(scores, col_lo[:, w0:w1], col_hi[:, w0:w1], true_l[w0:w1],
                                                           0, exact_t, tile_mask)
                t2i[local, j] = row_counts
                continue
            scores, chunk_mask = buf[:c1 - c0], mask[:c1 - c0]
            np.matmul(captions[c0:c1], images.T, out=scores)        # caption rows × images

            def exact_t(r, c, c0=c0):                                # scores[r, c]: caption c0+r, image c
                return exact_scores(captions[c0 + r], images[c])

            t2i[local, j] = _two_stage_ranks(scores, rows, true_l[c0:c1], row_lo, row_hi, exact_t, chunk_mask,
                                             k_test, rescore, lang, "t2i")
            np.matmul(images[c0:c1], captions.T, out=scores)        # image rows × captions

            def exact_i(r, c, c0=c0):                                # scores[r, c]: image c0+r, caption c
                return exact_scores(captions[c], images[c0 + r])

            lo, hi = _band(true_l[c0:c1], bound * img_norm[c0:c1] * txt_norm.max())
            i2t[local, j] = _two_stage_ranks(scores, rows, true_l[c0:c1], lo[:, None], hi[:, None], exact_i,
                                             chunk_mask, k_test, rescore, lang, "i2t")
    return ShardRanks(start, stop, t2i, i2t=i2t, i2t_counts=counts)


def _two_stage_ranks(scores: np.ndarray, rows: np.ndarray, true: np.ndarray, lo: np.ndarray, hi: np.ndarray, exact,
                     mask: np.ndarray, k_test: int, rescore: Rescore, lang: int, direction: str) -> np.ndarray:
    local = np.arange(len(rows))
    scores[local, rows] = true.astype(np.float32)           # the pair's own score, for the shortlist
    top = topk_indices(scores, k_test)
    scores[local, rows] = -np.inf
    itc = _count_at_or_above(scores, lo, hi, true, 1, exact, mask)
    new = np.asarray(rescore(lang, direction, rows, top), dtype=np.float64)
    if new.shape != top.shape:
        raise ValueError(f"re-scorer returned shape {new.shape} for {top.shape} candidates")
    if not np.isfinite(new).all():
        raise ValueError(f"re-scorer returned NaN/inf scores ({direction}, language column {lang})")
    hit = top == rows[:, None]
    inside = hit.any(axis=1)
    new_true = np.where(hit, new, -np.inf).max(axis=1, keepdims=True)
    return np.where(inside, (new >= new_true).sum(axis=1) - 1, np.maximum(itc, k_test))


def merge_shards(parts: Sequence[ShardRanks], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(t2i, i2t) N×L from shards that tile [0, n)."""
    parts = sorted(parts, key=lambda p: p.start)
    edges = [(p.start, p.stop) for p in parts]
    if not parts or parts[0].start != 0 or parts[-1].stop != n or any(
            a[1] != b[0] for a, b in zip(edges, edges[1:])):
        raise ValueError(f"shards {edges} do not tile [0, {n})")
    t2i = np.concatenate([p.t2i for p in parts])
    if parts[0].i2t is not None:
        return t2i, np.concatenate([p.i2t for p in parts])
    return t2i, sum(p.i2t_counts for p in parts)


def rank_sharded(image_emb: np.ndarray, text_emb: np.ndarray, *, languages: Sequence[str] | None = None,
                 query_languages: Sequence[str] | None = None, num_shards: int = 1, k_test: int | None = None,
                 rescore: Rescore | None = None, chunk: int | None = None,
                 tile: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Single-process driver of ``rank_shard``: what ``ccrk_ray.eval.actors.rank_on_actors`` does
    with the shards spread over actors. Returns (t2i, i2t) N×L for the query languages."""
    columns = check_inputs(image_emb, text_emb, languages, query_languages)
    n = image_emb.shape[0]
    chunk = chunk or default_chunk(n)
    true = true_scores(image_emb, text_emb)
    parts = [rank_shard(image_emb, text_emb, a, b, true=true, columns=columns, k_test=k_test, rescore=rescore,
                        chunk=chunk, tile=tile) for a, b in shard_bounds(n, num_shards, chunk)]
    return merge_shards(parts, n)


class ItmRescorer:
    """Two-stage re-scorer: the ITM head's "match" logit of (query, candidate) pairs.

    ``model`` is a CCRK model with fusion layers or the directory of a saved one (loaded on first
    use, so the object travels cheaply to actors). ``image_tokens`` N×T×h, ``text_hidden``
    N×K×L×h and ``text_mask`` N×K×L come from ``encode_split``.
    """

    def __init__(self, model, image_tokens: np.ndarray, text_hidden: np.ndarray, text_mask: np.ndarray,
                 batch_size: int = 256):
        self.model, self.batch_size = model, batch_size
        self.image_tokens, self.text_hidden, self.text_mask = image_tokens, text_hidden, text_mask

    def _loaded(self):
        if isinstance(self.model, (str, Path)):
            from ccrk_ray.model import CCRKModel

            self.model = CCRKModel.from_pretrained(self.model)
        return self.model.eval()

    def __call__(self, lang: int, direction: str, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        import torch

        model = self._loaded()
        q = np.repeat(queries, candidates.shape[1])
        c = candidates.ravel()
        image_idx, text_idx = (c, q) if direction == "t2i" else (q, c)
        tokens = torch.as_tensor(self.image_tokens)
        hidden = torch.as_tensor(np.ascontiguousarray(self.text_hidden[:, lang]))
        mask = torch.as_tensor(np.ascontiguousarray(self.text_mask[:, lang]))
        return itm_scores(model, tokens, hidden, mask, image_idx, text_idx,
                          batch_size=self.batch_size).reshape(candidates.shape)


@_no_grad
def encode_split(model, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Everything two-stage ranking needs of a 1-to-K batch: ``image_emb`` N×d, ``text_emb``
    N×K×d, ``image_tokens``, ``text_hidden`` N×K×L×h and ``text_mask`` N×K×L (float32 numpy)."""
    tokens, hidden, masks = _encode_batch(model, batch)
    n, k, length = masks.shape
    return {"image_emb": model.image_feature(tokens).float().cpu().numpy(),
            "text_emb": model.text_feature(hidden).view(n, k, -1).float().cpu().numpy(),
            "image_tokens": tokens.float().cpu().numpy(),
            "text_hidden": hidden.view(n, k, length, -1).float().cpu().numpy(),
            "text_mask": masks.cpu().numpy()}
