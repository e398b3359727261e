"""Embedding and ranking for retrieval evaluation, with no Ray in it.

Every caption counts (``ccrk_ray.metrics.retrieval_metrics`` is the definition): a test split is
N images and, per language, all of its captions (``Captions``), each with the image it describes.
In language l every caption is a text→image query over the images l has captions for, and each of
those images is an image→text query over all of l's captions. Ranking produces, per caption, the
counts the metrics are reduced from (``ccrk_ray.eval.ranks.RankSet``); ties count against the query.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

from ccrk_ray.core.precision import autocast_dtype
from ccrk_ray.eval.ranks import LanguageRanks, RankSet
from ccrk_ray.metrics import own_at_or_above


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




class Embedder:
    """Eval batch (``ccrk_ray.data.transforms.EvalCaptionsTransform``: ``input_ids`` N×S×L with
    ``caption_language`` N×S, −1 for an empty slot) or 1-to-K batch (N×K×L, every slot a caption) →
    ``image_emb`` N×d and ``text_emb`` N×S×d (float32, zeros in empty slots; computed under
    autocast for a ``precision`` other than fp32). Only real captions are encoded. With a
    ``transform``, the batches it is given are rows, and ``transform`` (e.g. an
    ``EvalCaptionsTransform``) turns them into such a batch first."""

    def __init__(self, model_dir, threads: int | None = None, device: str | None = None, precision: str = "fp32",
                 itm_features: bool = False, transform: Callable[[Mapping[str, np.ndarray]], Mapping] | None = None):
        """``model_dir``: a saved model (directory or training checkpoint) or an ``OpenClipSpec``;
        ``device`` None: CUDA when this process sees a GPU (a GPU actor sees only its own).
        ``itm_features``: also ``image_tokens`` N×T×h, ``text_hidden`` N×S×L×h and ``text_mask``
        N×S×L (float32, zeros in empty slots), what a two-stage re-scorer fuses."""
        import torch

        from ccrk_ray.model.openclip import load_encoders

        dtype = autocast_dtype(precision)
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_encoders(model_dir).to(self.device)
        self.itm_features, self.transform = itm_features, transform
        self.autocast = torch.autocast(self.device.type, dtype=getattr(torch, dtype or "float32"),
                                       enabled=dtype is not None)

    @_no_grad
    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        if self.transform is not None:
            batch = self.transform(batch)
        # Ray Data hands read-only arrays (object-store memory); torch wants writable ones
        ids = np.asarray(batch["input_ids"])
        n, k, length = ids.shape
        slot_lang = np.asarray(batch["caption_language"]) if "caption_language" in batch else np.zeros((n, k), int)
        real = (slot_lang >= 0).ravel()
        ids = torch.as_tensor(ids.reshape(n * k, length)[real], device=self.device)
        mask = torch.as_tensor(np.asarray(batch["attention_mask"]).reshape(n * k, length)[real], device=self.device)
        pixels = torch.as_tensor(np.array(batch["pixel_values"]), device=self.device)
        extra = {}
        with self.autocast:
            if self.itm_features:
                tokens = self.model.image_tokens(pixels)
                img = self.model.image_feature(tokens)
                hidden = self.model.text_hidden(ids, mask) if len(ids) else None
                txt = self.model.text_feature(hidden) if hidden is not None else None
                width = hidden.shape[-1] if hidden is not None else self.model.text.config.hidden_size
                all_hidden = np.zeros((n * k, length, width), dtype=np.float32)
                if hidden is not None:
                    all_hidden[real] = hidden.float().cpu().numpy()
                extra = {"image_tokens": tokens.float().cpu().numpy(), "text_hidden": all_hidden.reshape(n, k, length, width),
                         "text_mask": np.asarray(batch["attention_mask"])}
            else:
                img = self.model.encode_image(pixels)
                txt = self.model.encode_text(ids, mask) if len(ids) else None
        text_emb = np.zeros((n * k, img.shape[-1]), dtype=np.float32)
        if txt is not None:
            text_emb[real] = txt.float().cpu().numpy()
        out = {"image_id": np.asarray(batch["image_id"], dtype=object), "image_emb": img.float().cpu().numpy(),
               "text_emb": text_emb.reshape(n, k, img.shape[-1]), **extra}
        if "caption_language" in batch:
            out["caption_language"] = slot_lang
        return out


# --- two-stage retrieval: ITC shortlist, ITM re-ranking ---------------------------------------

def topk_candidates(scores: np.ndarray, k: int) -> np.ndarray:
    """Q×k candidate indices of the k best scores per query (ties broken by lower index)."""
    q, c = scores.shape
    if not 1 <= k <= c:
        raise ValueError(f"k_test={k} must be between 1 and the gallery size {c}")
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


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
# can rank near-ties either way; here every shard layout and chunk size gives the same ranks, equal
# to the dense ones whenever the float32 scores are exact (test data).
#
# Work comes as tasks (``plan_tasks``): per language, ranges of its captions (text→image queries;
# in ITC mode the same products also give every caption's image→text counts) and, in two-stage
# mode, ranges of its images (image→text queries). Two-stage: each query's k best float32 ITC
# scores, ties at the k-th broken by lower index (as ``topk_candidates``), are re-scored and lifted
# above the rest. A correct caption or image outside the shortlist keeps its ITC count of rivals,
# at least the shortlist's other-item candidates (k for one correct item); the reference (X-VLM /
# CCRK) instead ranks it by argsort order of a −100 fill, which places it right below the shortlist
# in gallery-index order whatever its ITC score, so its rank there is not comparable across
# languages and MRV would see index order. Tasks start on multiples of their chunk so that the
# float32 products, and so the top-k sets, are the same in any layout.

SCORE_BUDGET_BYTES = 128 << 20      # one query chunk's float32 scores against the whole gallery
GALLERY_TILE = 2048                 # ITC mode: gallery columns per product (chunk × tile stays in cache)
_U32 = 2.0 ** -24                   # float32 unit roundoff


def default_chunk(gallery_size: int, budget_bytes: int = SCORE_BUDGET_BYTES) -> int:
    """Query rows scored at once: a multiple of 16 in [16, 512] whose scores fit ``budget_bytes``.
    It depends on the gallery size only, never on the number of actors."""
    rows = budget_bytes // (4 * max(1, gallery_size))
    return int(min(512, max(16, rows // 16 * 16)))


@dataclass
class Captions:
    """Every caption of a test split: ``emb`` M×d, ``owner`` M (the image each describes, an index
    into the split's N images) and ``offsets`` (L+1: language j's captions are rows
    ``offsets[j]:offsets[j+1]``), ``languages`` their names."""

    emb: np.ndarray
    owner: np.ndarray
    offsets: np.ndarray
    languages: tuple[str, ...]

    def __post_init__(self):
        self.owner = np.asarray(self.owner, dtype=np.int64)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        self.languages = tuple(self.languages)

    @classmethod
    def one_per_image(cls, text_emb: np.ndarray, languages: Sequence[str] | None = None) -> "Captions":
        """From N×K×d: caption (i, k) describes image i, in language k."""
        text_emb = np.asarray(text_emb)
        if text_emb.ndim != 3:
            raise ValueError(f"caption embeddings must be N×K×d (image × language × dim), got shape {text_emb.shape}")
        n, k, d = text_emb.shape
        names = list(languages) if languages is not None else [str(j) for j in range(k)]
        if len(names) != k:
            raise ValueError(f"caption embeddings have {k} language columns but {len(names)} language names "
                             f"({', '.join(names)})")
        return cls(np.ascontiguousarray(text_emb.transpose(1, 0, 2).reshape(k * n, d)), np.tile(np.arange(n), k),
                   np.arange(k + 1) * n, names)

    @classmethod
    def from_slots(cls, text_emb: np.ndarray, slot_language: np.ndarray, languages: Sequence[str]) -> "Captions":
        """From an eval batch's slots: ``text_emb`` N×S×d and ``slot_language`` N×S (the language
        column of each slot, −1 for none). Captions keep image order, then slot order."""
        n, s = slot_language.shape
        parts, owners, offsets = [], [], [0]
        for j in range(len(languages)):
            img, slot = np.nonzero(slot_language == j)
            parts.append(text_emb[img, slot])
            owners.append(img)
            offsets.append(offsets[-1] + len(img))
        d = text_emb.shape[-1]
        return cls(np.concatenate(parts) if parts else np.zeros((0, d), np.float32),
                   np.concatenate(owners) if owners else np.zeros(0, np.int64), offsets, languages)

    def language(self, j: int) -> slice:
        return slice(int(self.offsets[j]), int(self.offsets[j + 1]))

    def subset(self, images: np.ndarray) -> tuple["Captions", np.ndarray]:
        """The captions of the gallery images ``images`` (sorted indices), with owners renumbered
        into that subset, and the index of each kept caption among these captions."""
        images = np.asarray(images, dtype=np.int64)
        keep = np.isin(self.owner, images)
        index = np.flatnonzero(keep)
        counts = [int(keep[self.language(j)].sum()) for j in range(len(self.languages))]
        return (Captions(self.emb[index], np.searchsorted(images, self.owner[index]), np.r_[0, np.cumsum(counts)],
                         self.languages), index)


def as_captions(text_emb, languages: Sequence[str] | None = None) -> Captions:
    """``Captions`` as given, or built from an N×K×d array (one caption per image and language)."""
    if isinstance(text_emb, Captions):
        if languages is not None and tuple(languages) != text_emb.languages:
            raise ValueError(f"captions are in {', '.join(text_emb.languages)}, not {', '.join(languages)}")
        return text_emb
    return Captions.one_per_image(text_emb, languages)


def check_inputs(image_emb: np.ndarray, text_emb, languages: Sequence[str] | None = None,
                 query_languages: Sequence[str] | None = None) -> tuple[Captions, list[int]]:
    """Validate a gallery (``image_emb`` N×d and ``Captions``, or N×K×d caption embeddings) and
    return the captions and the column of each query language (all when ``query_languages`` is
    None). Raises ValueError naming the problem."""
    image_emb = np.asarray(image_emb)
    if image_emb.ndim != 2:
        raise ValueError(f"image embeddings must be N×d, got shape {image_emb.shape}")
    if image_emb.shape[0] == 0:
        raise ValueError("empty gallery: no image embeddings")
    if not isinstance(text_emb, Captions) and np.ndim(text_emb) == 3 and np.shape(text_emb)[0] != image_emb.shape[0]:
        raise ValueError(f"captions for {np.shape(text_emb)[0]} images but {image_emb.shape[0]} image embeddings")
    caps = as_captions(text_emb, languages)
    if caps.emb.ndim != 2 or caps.emb.shape[1] != image_emb.shape[1]:
        raise ValueError(f"embedding dimensions differ: images are {image_emb.shape[1]}-d, captions "
                         f"{caps.emb.shape[-1]}-d")
    names = list(caps.languages)
    if len(set(names)) != len(names):
        raise ValueError(f"a gallery language appears twice: {', '.join(names)}")
    if len(caps.owner) != len(caps.emb) or len(caps.offsets) != len(names) + 1 or caps.offsets[-1] != len(caps.emb):
        raise ValueError(f"captions: {len(caps.emb)} embeddings, {len(caps.owner)} owners and offsets "
                         f"{caps.offsets.tolist()} for {len(names)} languages do not agree")
    if len(caps.owner) and (caps.owner.min() < 0 or caps.owner.max() >= image_emb.shape[0]):
        raise ValueError(f"a caption's image index is outside [0, {image_emb.shape[0]})")
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
    for j, lang in enumerate(names):
        part = caps.language(j)
        if part.stop == part.start and lang in query:
            raise ValueError(f"no captions in language {lang!r}")
        bad = ~np.isfinite(caps.emb[part])
        if bad.any():
            row = int(caps.owner[part][np.argmax(bad.any(axis=1))])
            raise ValueError(f"caption embeddings in language {lang!r} hold {int(bad.sum())} NaN/inf "
                             f"value(s), the first in image {row}")
    return caps, [names.index(lang) for lang in query]


def exact_scores(captions: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Row-wise scores of P (caption, image) pairs, P×d each, accumulated in float64. Every exact
    score in this module goes through here, so equal embeddings give bitwise-equal scores."""
    return (np.asarray(captions, dtype=np.float64) * np.asarray(images, dtype=np.float64)).sum(axis=1)


def true_scores(image_emb: np.ndarray, captions: Captions, rows: int = 8192) -> np.ndarray:
    """M float64: the exact score of each caption with its own image (the tie policy's true score)."""
    out = np.empty(len(captions.owner), dtype=np.float64)
    for start in range(0, len(out), rows):
        sl = slice(start, start + rows)
        out[sl] = exact_scores(captions.emb[sl], image_emb[captions.owner[sl]])
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
class LanguageView:
    """One language's gallery as a ranking task sees it: the images it has captions for (``images``
    N_l×d, gallery indices ``image_index``), its captions (``captions`` M_l×d, global caption
    indices ``caption_index``, ``owner`` a local image index, exact ``true`` scores), and its
    captions grouped by image: image i's are ``by_owner[first[i]:first[i + 1]]``."""

    images: np.ndarray
    image_index: np.ndarray
    captions: np.ndarray
    caption_index: np.ndarray
    owner: np.ndarray
    true: np.ndarray
    by_owner: np.ndarray
    first: np.ndarray

    @classmethod
    def build(cls, image_emb: np.ndarray, captions: Captions, true: np.ndarray, column: int) -> "LanguageView":
        part = captions.language(column)
        owner_global = captions.owner[part]
        image_index, owner = np.unique(owner_global, return_inverse=True)
        by_owner = np.argsort(owner, kind="stable")
        first = np.searchsorted(owner[by_owner], np.arange(len(image_index) + 1))
        return cls(np.ascontiguousarray(image_emb[image_index], dtype=np.float32), image_index,
                   np.ascontiguousarray(captions.emb[part], dtype=np.float32), np.arange(part.start, part.stop),
                   owner.astype(np.int64), np.asarray(true[part], dtype=np.float64), by_owner, first)

    @property
    def num_images(self) -> int:
        return len(self.image_index)

    @property
    def num_captions(self) -> int:
        return len(self.owner)


@dataclass(frozen=True)
class Task:
    """One unit of ranking work: language ``column``, ``kind`` "t2i" (caption queries
    [start, stop) of the language) or "i2t" (two-stage only: its images [start, stop)), ``chunk``."""

    column: int
    kind: str
    start: int
    stop: int
    chunk: int


@dataclass
class ShardRanks:
    """One task's result. "t2i" tasks: ``t2i`` (stop−start) text→image rival counts; in ITC mode
    also ``i2t`` of length M_l: for every caption of the language, how many of the task's captions
    of other images score >= it on its image (summed over tasks). "i2t" tasks: ``captions`` (local
    indices of the task's images' captions) with their ``i2t`` and ``own`` counts."""

    task: Task
    t2i: np.ndarray | None = None
    i2t: np.ndarray | None = None
    own: np.ndarray | None = None
    captions: np.ndarray | None = None


Rescore = Callable[[str, np.ndarray, np.ndarray], np.ndarray]
"""Two-stage re-scorer: ("t2i" | "i2t", query indices Q, candidates Q×k) → Q×k scores; "t2i"
queries are global caption indices and candidates gallery image indices, "i2t" the reverse."""


def plan_tasks(image_emb: np.ndarray, captions: Captions, columns: Sequence[int], num_shards: int, *,
               two_stage: bool, chunk: int | None = None) -> list[Task]:
    """Per query language, chunk-aligned caption ranges (``shard_bounds``, ``num_shards`` of them at
    most) and, in two-stage mode, image ranges. Chunks depend on the gallery sizes only."""
    tasks = []
    for j in columns:
        owner = captions.owner[captions.language(j)]
        n_l, m_l = len(np.unique(owner)), len(owner)
        c = chunk or default_chunk(n_l)
        tasks += [Task(j, "t2i", a, b, c) for a, b in shard_bounds(m_l, num_shards, c)]
        if two_stage:
            c = chunk or default_chunk(m_l)
            tasks += [Task(j, "i2t", a, b, c) for a, b in shard_bounds(n_l, num_shards, c)]
    return tasks


def check_tasks(tasks: Sequence[Task], captions: Captions, columns: Sequence[int], two_stage: bool) -> None:
    """ValueError unless the tasks are non-empty, chunk-aligned and tile each query language's
    captions (and, two-stage, its images) exactly once."""
    if not tasks:
        raise ValueError("no tasks given")
    for j in columns:
        owner = captions.owner[captions.language(j)]
        sizes = {"t2i": len(owner), "i2t": len(np.unique(owner))}
        for kind in ("t2i", "i2t") if two_stage else ("t2i",):
            mine = sorted((t.start, t.stop) for t in tasks if t.column == j and t.kind == kind)
            where = f"{captions.languages[j]} {'captions' if kind == 't2i' else 'images'}"
            for t in tasks:
                if t.column == j and t.kind == kind and (t.start >= t.stop or t.start % t.chunk):
                    raise ValueError(f"task [{t.start}, {t.stop}) of {where} is empty or does not start on a "
                                     f"multiple of chunk={t.chunk}")
            if not mine or mine[0][0] != 0 or mine[-1][1] != sizes[kind] or any(
                    a[1] != b[0] for a, b in zip(mine, mine[1:])):
                raise ValueError(f"tasks {mine} do not tile the {sizes[kind]} {where}")
    unknown = [t for t in tasks if t.column not in columns or t.kind not in ("t2i", "i2t")]
    if unknown:
        raise ValueError(f"tasks for no query language or of an unknown kind: {unknown[:3]}")


def rank_task(view: LanguageView, task: Task, *, k_test: int | None = None, rescore: Rescore | None = None,
              tile: int | None = None) -> ShardRanks:
    """Rank one task's queries against the whole of its language's gallery, ``task.chunk`` rows at
    a time; never the full score matrix. ITC mode (``rescore`` None): float32 products of chunk
    captions × ``tile`` images serve both directions. Two-stage: whole rows, each query's top
    ``k_test`` (at most the language's gallery) re-scored. Tie policy: see the comment above."""
    total = view.num_captions if task.kind == "t2i" else view.num_images
    if not 0 <= task.start < task.stop <= total:
        raise ValueError(f"task [{task.start}, {task.stop}) holds no queries of the {total} {task.kind} queries")
    if task.start % task.chunk:
        raise ValueError(f"task start {task.start} is not a multiple of chunk={task.chunk} (see shard_bounds)")
    if rescore is not None and (k_test is None or k_test < 1):
        raise ValueError(f"two-stage ranking needs k_test >= 1, got {k_test}")
    if task.kind == "t2i":
        if rescore is None:
            return _itc_task(view, task, tile or GALLERY_TILE)
        return _two_stage_t2i(view, task, min(k_test, view.num_images), rescore)
    if rescore is None:
        raise ValueError("image→text tasks are two-stage only (ITC gets them from the text→image products)")
    return _two_stage_i2t(view, task, min(k_test, view.num_captions), rescore)


_BOUND = 1.0001      # slack on the float32 dot-product error bound (d + 2)·u·‖x‖‖y‖


def _norms(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x, axis=1).astype(np.float64)


def _itc_task(view: LanguageView, task: Task, tile: int) -> ShardRanks:
    images, captions, owner, true = view.images, view.captions, view.owner, view.true
    n, d = images.shape
    start, stop, chunk = task.start, task.stop, task.chunk
    bound = (d + 2) * _U32 * _BOUND
    img_norm, txt_norm = _norms(images), _norms(captions)
    t2i = np.empty(stop - start, dtype=np.int64)
    i2t = np.zeros(view.num_captions, dtype=np.int64)
    # image→text bands: every caption's true score ± the error bound against this task's captions
    col_lo, col_hi = _band(true, bound * img_norm[owner] * txt_norm[start:stop].max())
    width = min(n, tile)
    buf = np.empty((min(chunk, stop - start), width), dtype=np.float32)
    mask = np.empty(buf.shape, dtype=bool)
    for c0 in range(start, stop, chunk):
        c1 = min(stop, c0 + chunk)
        row_lo, row_hi = _band(true[c0:c1], bound * txt_norm[c0:c1] * img_norm.max())
        row_lo, row_hi = row_lo[:, None], row_hi[:, None]
        own = owner[c0:c1]
        counts = np.zeros(c1 - c0, dtype=np.int64)
        for w0 in range(0, n, width):                       # tiles small enough to stay in cache
            w1 = min(n, w0 + width)
            scores, tile_mask = buf[:c1 - c0, :w1 - w0], mask[:c1 - c0, :w1 - w0]
            np.matmul(captions[c0:c1], images[w0:w1].T, out=scores)       # caption rows × images
            mine = np.flatnonzero((own >= w0) & (own < w1))
            scores[mine, own[mine] - w0] = -np.inf                        # a caption's own image is no rival

            def exact_t(r, c, c0=c0, w0=w0):                              # scores[r, c]: caption c0+r, image w0+c
                return exact_scores(captions[c0 + r], images[w0 + c])

            counts += _count_at_or_above(scores, row_lo, row_hi, true[c0:c1], 1, exact_t, tile_mask)
            # image→text: each caption v of an image in this tile against these rows on its image;
            # rows describing the same image hold −inf there, so only other images' captions count
            v = view.by_owner[view.first[w0]:view.first[w1]]
            if len(v):
                sub = scores[:, owner[v] - w0]

                def exact_v(r, c, c0=c0, v=v):                           # sub[r, c]: caption c0+r, image of v[c]
                    return exact_scores(captions[c0 + r], images[owner[v[c]]])

                i2t[v] += _count_at_or_above(sub, col_lo[v][None, :], col_hi[v][None, :], true[v], 0, exact_v,
                                             np.empty(sub.shape, dtype=bool))
        t2i[c0 - start:c1 - start] = counts
    return ShardRanks(task, t2i=t2i, i2t=i2t)


def _rescored(rescore: Rescore, direction: str, queries: np.ndarray, top: np.ndarray) -> np.ndarray:
    new = np.asarray(rescore(direction, queries, top), dtype=np.float64)
    if new.shape != top.shape:
        raise ValueError(f"re-scorer returned shape {new.shape} for {top.shape} candidates")
    if not np.isfinite(new).all():
        raise ValueError(f"re-scorer returned NaN/inf scores ({direction})")
    return new


def _two_stage_t2i(view: LanguageView, task: Task, k_test: int, rescore: Rescore) -> ShardRanks:
    images, captions, owner, true = view.images, view.captions, view.owner, view.true
    d = images.shape[1]
    bound = (d + 2) * _U32 * _BOUND
    img_norm, txt_norm = _norms(images), _norms(captions)
    out = np.empty(task.stop - task.start, dtype=np.int64)
    buf = np.empty((min(task.chunk, task.stop - task.start), view.num_images), dtype=np.float32)
    mask = np.empty(buf.shape, dtype=bool)
    for c0 in range(task.start, task.stop, task.chunk):
        c1 = min(task.stop, c0 + task.chunk)
        scores, chunk_mask = buf[:c1 - c0], mask[:c1 - c0]
        np.matmul(captions[c0:c1], images.T, out=scores)
        local, own = np.arange(c1 - c0), owner[c0:c1]
        scores[local, own] = true[c0:c1].astype(np.float32)         # the pair's own score, for the shortlist
        top = topk_indices(scores, k_test)
        scores[local, own] = -np.inf
        lo, hi = _band(true[c0:c1], bound * txt_norm[c0:c1] * img_norm.max())

        def exact_t(r, c, c0=c0):
            return exact_scores(captions[c0 + r], images[c])

        itc = _count_at_or_above(scores, lo[:, None], hi[:, None], true[c0:c1], 1, exact_t, chunk_mask)
        new = _rescored(rescore, "t2i", view.caption_index[c0:c1], view.image_index[top])
        hit = top == own[:, None]
        inside = hit.any(axis=1)
        new_true = np.where(hit, new, -np.inf).max(axis=1, keepdims=True)
        out[c0 - task.start:c1 - task.start] = np.where(inside, (new >= new_true).sum(axis=1) - 1,
                                                        np.maximum(itc, k_test))
    return ShardRanks(task, t2i=out)


def _two_stage_i2t(view: LanguageView, task: Task, k_test: int, rescore: Rescore) -> ShardRanks:
    images, captions, owner, true = view.images, view.captions, view.owner, view.true
    d = images.shape[1]
    bound = (d + 2) * _U32 * _BOUND
    img_norm, txt_norm = _norms(images), _norms(captions)
    all_v, all_i2t, all_own = [], [], []
    buf = np.empty((min(task.chunk, task.stop - task.start), view.num_captions), dtype=np.float32)
    for i0 in range(task.start, task.stop, task.chunk):
        i1 = min(task.stop, i0 + task.chunk)
        scores = buf[:i1 - i0]
        np.matmul(images[i0:i1], captions.T, out=scores)            # image rows × captions
        v = view.by_owner[view.first[i0]:view.first[i1]]            # the captions of these images
        row = owner[v] - i0
        scores[row, v] = true[v].astype(np.float32)                 # own captions' exact scores, for the shortlist
        top = topk_indices(scores, k_test)
        scores[row, v] = -np.inf                                    # own captions are no rivals
        # ITC rivals of each own caption: its image's row against its true score, a block at a time
        itc = np.empty(len(v), dtype=np.int64)
        lo, hi = _band(true[v], bound * img_norm[owner[v]] * txt_norm.max())
        for b0 in range(0, len(v), task.chunk):
            vb = v[b0:b0 + task.chunk]
            sub = scores[row[b0:b0 + task.chunk]]

            def exact_i(r, c, vb=vb):                                # sub[r, c]: image of vb[r], caption c
                return exact_scores(captions[c], images[owner[vb[r]]])

            itc[b0:b0 + len(vb)] = _count_at_or_above(sub, lo[b0:b0 + len(vb), None], hi[b0:b0 + len(vb), None],
                                                      true[vb], 1, exact_i, np.empty(sub.shape, dtype=bool))
        new = _rescored(rescore, "i2t", view.image_index[i0:i1], view.caption_index[top])
        own_top = owner[top] == np.arange(i0, i1)[:, None]          # shortlist entries that are the image's own
        top_v, new_v, own_top_v = top[row], new[row], own_top[row]
        hit = top_v == v[:, None]
        inside = hit.any(axis=1)
        new_c = np.where(hit, new_v, -np.inf).max(axis=1, keepdims=True)
        at_or_above = new_v >= new_c
        n_own_top = own_top_v.sum(axis=1)
        rivals = np.where(inside, (at_or_above & ~own_top_v).sum(axis=1), np.maximum(itc, k_test - n_own_top))
        own = np.where(inside, (at_or_above & own_top_v).sum(axis=1) - 1, n_own_top)
        out = ~inside                                                # own captions below the shortlist: by ITC
        own[out] += own_at_or_above(true[v[out]], owner[v[out]])
        all_v.append(v)
        all_i2t.append(rivals)
        all_own.append(own)
    return ShardRanks(task, i2t=np.concatenate(all_i2t), own=np.concatenate(all_own), captions=np.concatenate(all_v))


def merge_tasks(parts: Sequence[ShardRanks], views: dict[int, LanguageView], captions: Captions,
                num_images: int) -> RankSet:
    """The ``RankSet`` of tasks that cover every query of each language in ``views``."""
    ranks = RankSet(num_images)
    for j, view in views.items():
        mine = [p for p in parts if p.task.column == j]
        t2i_parts = sorted((p for p in mine if p.task.kind == "t2i"), key=lambda p: p.task.start)
        edges = [(p.task.start, p.task.stop) for p in t2i_parts]
        if not edges or edges[0][0] != 0 or edges[-1][1] != view.num_captions or any(
                a[1] != b[0] for a, b in zip(edges, edges[1:])):
            raise ValueError(f"tasks {edges} do not tile the {view.num_captions} captions of "
                             f"{captions.languages[j]}")
        t2i = np.concatenate([p.t2i for p in t2i_parts])
        i2t_parts = [p for p in mine if p.task.kind == "i2t"]
        if i2t_parts:
            i2t = np.full(view.num_captions, -1, dtype=np.int64)
            own = np.full(view.num_captions, -1, dtype=np.int64)
            for p in i2t_parts:
                i2t[p.captions], own[p.captions] = p.i2t, p.own
            if (i2t < 0).any():
                raise ValueError(f"image→text tasks do not cover every image of {captions.languages[j]}")
        else:
            i2t = sum(p.i2t for p in t2i_parts)
            own = own_at_or_above(view.true, view.owner)
        ranks.languages[captions.languages[j]] = LanguageRanks(view.image_index[view.owner], t2i, i2t, own)
    return ranks


def rank_sharded(image_emb: np.ndarray, text_emb, *, languages: Sequence[str] | None = None,
                 query_languages: Sequence[str] | None = None, num_shards: int = 1, k_test: int | None = None,
                 rescore: Rescore | None = None, chunk: int | None = None, tile: int | None = None) -> RankSet:
    """Single-process driver of ``rank_task``: what ``ccrk_ray.eval.actors.rank_on_actors`` does
    with the tasks spread over actors. ``text_emb``: ``Captions``, or N×K×d (one caption per
    image and language, named ``languages``)."""
    captions, columns = check_inputs(image_emb, text_emb, languages, query_languages)
    true = true_scores(image_emb, captions)
    views = {j: LanguageView.build(image_emb, captions, true, j) for j in columns}
    tasks = plan_tasks(image_emb, captions, columns, num_shards, two_stage=rescore is not None, chunk=chunk)
    parts = [rank_task(views[t.column], t, k_test=k_test, rescore=rescore, tile=tile) for t in tasks]
    return merge_tasks(parts, views, captions, image_emb.shape[0])


def score_range_task(view: LanguageView, task: Task) -> tuple[float, float]:
    """(min, max) of the scores of a "t2i" task's captions with every image of the language's
    gallery, ``task.chunk`` rows at a time in float64: the first pass of a fused evaluation
    (``ccrk_ray.eval.nrccr``), which normalises each whole score matrix by its range."""
    if task.kind != "t2i" or not 0 <= task.start < task.stop <= view.num_captions:
        raise ValueError(f"a score range needs caption queries of the language, got {task}")
    images = view.images.astype(np.float64)
    lo, hi = np.inf, -np.inf
    for c0 in range(task.start, task.stop, task.chunk):
        scores = view.captions[c0:min(task.stop, c0 + task.chunk)].astype(np.float64) @ images.T
        lo, hi = min(lo, float(scores.min())), max(hi, float(scores.max()))
    return lo, hi


def merge_ranges(parts: Sequence[tuple[Task, tuple[float, float]]], captions: Captions) -> dict[str, tuple[float, float]]:
    """Per language, the (min, max) over its tasks' ranges."""
    out: dict[str, tuple[float, float]] = {}
    for task, (lo, hi) in parts:
        lang = captions.languages[task.column]
        old = out.get(lang, (np.inf, -np.inf))
        out[lang] = (min(old[0], lo), max(old[1], hi))
    return out


def score_ranges_sharded(image_emb: np.ndarray, captions: Captions, *, num_shards: int = 1,
                         chunk: int | None = None) -> dict[str, tuple[float, float]]:
    """Single-process driver of ``score_range_task``: {language: (min, max)} of each language's
    captions × gallery scores, what ``ccrk_ray.eval.actors.score_ranges_on_actors`` computes on actors."""
    captions, columns = check_inputs(image_emb, captions)
    true = np.zeros(len(captions.owner))           # a range needs no true scores
    views = {j: LanguageView.build(image_emb, captions, true, j) for j in columns}
    tasks = plan_tasks(image_emb, captions, columns, num_shards, two_stage=False, chunk=chunk)
    return merge_ranges([(t, score_range_task(views[t.column], t)) for t in tasks], captions)


class InProcessRanking:
    """Ranking and score ranges in this process (``rank_sharded``, ``score_ranges_sharded``);
    ``ccrk_ray.eval.actors.ActorRanking`` is the same pair on eval actors."""

    def rank(self, image_emb: np.ndarray, captions: Captions) -> RankSet:
        return rank_sharded(image_emb, captions)

    def score_ranges(self, image_emb: np.ndarray, captions: Captions) -> dict[str, tuple[float, float]]:
        return score_ranges_sharded(image_emb, captions)


class SubsetRescorer:
    """A re-scorer of a whole split used on a subset of it (``Captions.subset``): the subset's image
    and caption indices are mapped back to the split's before ``rescore`` sees them."""

    def __init__(self, rescore: Rescore, images: np.ndarray, captions: np.ndarray):
        self.rescore, self.images, self.captions = rescore, np.asarray(images), np.asarray(captions)

    def __call__(self, direction: str, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        if direction == "t2i":
            return self.rescore(direction, self.captions[queries], self.images[candidates])
        return self.rescore(direction, self.images[queries], self.captions[candidates])


def gallery_subset(image_emb: np.ndarray, captions: Captions, true: np.ndarray, rescore: Rescore | None,
                   images: np.ndarray | None) -> tuple[np.ndarray, Captions, np.ndarray, Rescore | None]:
    """(image embeddings, captions, true scores, re-scorer) of the gallery made of ``images``
    (sorted indices; None: the whole split) and their captions, ranked as a gallery of its own."""
    if images is None:
        return image_emb, captions, true, rescore
    sub, index = captions.subset(images)
    return (image_emb[images], sub, true[index],
            SubsetRescorer(rescore, images, index) if rescore is not None else None)


def pair_indices(direction: str, queries: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image indices, caption indices) of a re-scorer's Q×k (query, candidate) pairs, row-major."""
    q = np.repeat(queries, candidates.shape[1])
    c = candidates.ravel()
    return (c, q) if direction == "t2i" else (q, c)


class ItmRescorer:
    """Two-stage re-scorer: the ITM head's "match" logit of (query, candidate) pairs.

    ``model`` is a CCRK model with fusion layers or the directory of a saved one (loaded on first
    use, so the object travels cheaply to actors). ``image_tokens`` N×T×h, ``text_hidden``
    M×L×h and ``text_mask`` M×L (every caption, in ``Captions`` order) come from ``encode_split``.
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

    def __call__(self, direction: str, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        import torch

        model = self._loaded()
        image_idx, text_idx = pair_indices(direction, queries, candidates)
        return itm_scores(model, torch.as_tensor(self.image_tokens), torch.as_tensor(self.text_hidden),
                          torch.as_tensor(self.text_mask), image_idx, text_idx,
                          batch_size=self.batch_size).reshape(candidates.shape)


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


@_no_grad
def encode_split(model, split: Mapping[str, Any], batch_size: int = 64) -> dict[str, Any]:
    """Everything ranking needs of a loaded split (``ccrk_ray.data.transforms.load_split``), in
    ``batch_size`` pieces: ``image_emb`` N×d, ``captions`` (``Captions``), and for two-stage
    ``image_tokens`` N×T×h, ``text_hidden`` M×L×h and ``text_mask`` M×L (float32 numpy)."""
    import torch

    model.eval()
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
    pixels, ids, masks = (np.asarray(split[k]) for k in ("pixel_values", "input_ids", "attention_mask"))
    tokens, image_emb, hidden, text_emb = [], [], [], []
    for s in range(0, len(pixels), batch_size):
        t = model.image_tokens(torch.as_tensor(pixels[s:s + batch_size], device=device))
        image_emb.append(model.image_feature(t).float().cpu().numpy())
        tokens.append(t.float().cpu().numpy())
    for s in range(0, len(ids), batch_size):
        h = model.text_hidden(torch.as_tensor(ids[s:s + batch_size], device=device),
                              torch.as_tensor(masks[s:s + batch_size], device=device))
        text_emb.append(model.text_feature(h).float().cpu().numpy())
        hidden.append(h.float().cpu().numpy())
    image_emb = np.concatenate(image_emb)
    d = image_emb.shape[1]
    captions = Captions(np.concatenate(text_emb) if text_emb else np.zeros((0, d), np.float32), split["owner"],
                        split["offsets"], split["languages"])
    return {"image_emb": image_emb, "captions": captions, "image_tokens": np.concatenate(tokens),
            "text_hidden": np.concatenate(hidden) if hidden else None, "text_mask": masks}


def evaluate_in_process(model, split: Mapping[str, Any], k_test: int | None = None) -> RankSet:
    """Ranks of a model on a loaded split (``load_split``) in this process, every caption counting.

    ``k_test=None``: ITC similarity only. Otherwise two-stage as in the paper: every query's top
    ``k_test`` candidates by ITC are re-scored with the ITM head (needs fusion layers)."""
    if k_test is not None and not model.has_fusion:
        raise ValueError("two-stage evaluation (k_test) needs a model with fusion layers; use itc_only")
    feats = encode_split(model, split)
    rescore = (ItmRescorer(model, feats["image_tokens"], feats["text_hidden"], feats["text_mask"])
               if k_test is not None else None)
    return rank_sharded(feats["image_emb"], feats["captions"], k_test=k_test, rescore=rescore)
