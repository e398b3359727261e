"""Ray side of evaluation: embedding actors over the test split, and eval actors that rank tasks
(query ranges of one language) against that language's whole gallery. The ranking itself is
``ccrk_ray.eval.retrieval.rank_task``."""

from __future__ import annotations

import functools
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import ray
import ray.data

from ccrk_ray.core.log import bars_enabled, get_logger, progress
from ccrk_ray.eval.ranks import RankSet
from ccrk_ray.eval.retrieval import (Captions, Embedder, LanguageView, ShardRanks, Task, check_inputs, check_tasks,
                                     gallery_subset, itm_scores, merge_ranges, merge_tasks, pair_indices, plan_tasks,
                                     rank_task, score_range_task, true_scores)


log = get_logger(__name__)


SMALL_COLUMNS = ("image_id", "image_emb", "text_emb", "caption_language")
ITM_COLUMNS = ("image_tokens", "text_hidden", "text_mask")


def embed_dataset(ds: "ray.data.Dataset", model_dir, languages: Sequence[str], *, transform=None, num_actors: int = 1,
                  batch_size: int = 128, cpus_per_actor: float = 1.0, total: int | None = None,
                  precision: str = "fp32", itm_features: bool = False, transform_actor: bool | None = None):
    """(image_ids, image_emb N×d, every caption as ``Captions``) for a dataset of eval batches
    (``EvalCaptionsTransform``'s), or of rows with the ``transform`` that makes them batches
    (``ccrk_ray.data.ingest.eval_rows`` and a ``CountingEvalTransform``), in id order; ``total``
    images, when known, for the progress bar. On a cluster with GPUs each embedding actor reserves
    one (at most one actor per GPU) and computes on it; else on CPUs. ``itm_features``: a fourth
    value, the ``ItmFeatures`` of the split (what two-stage re-scoring fuses), left in the object
    store: this process only holds the embeddings.

    Where ``transform`` runs (``transform_actor``; None: by the hardware): on GPUs in a CPU actor of
    its own ahead of the embedding actors, so a GPU never waits on decoding; on CPUs inside each
    embedding actor, as a separate actor there would only add a process (seconds of imports on every
    evaluation) and a copy of every batch through the object store."""
    # a saved model goes as its path; an OpenClipSpec as itself (not imported here: the eval actors
    # import this module to rank, with numpy alone)
    model = str(model_dir) if isinstance(model_dir, (str, Path)) else model_dir
    gpus = cluster_gpus()
    num_actors, gpus_per_actor, device = embedding_placement(gpus, num_actors)
    if transform is not None and (gpus_per_actor > 0 if transform_actor is None else transform_actor):
        ds = ds.map_batches(RowTransform, fn_constructor_kwargs=dict(transform=transform), batch_size=batch_size,
                            batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1),
                            num_cpus=1)
        transform = None
    out = ds.map_batches(Embedder, fn_constructor_kwargs=dict(model_dir=model, threads=int(cpus_per_actor) or 1,
                                                              device=device, precision=precision,
                                                              itm_features=itm_features, transform=transform),
                         batch_size=batch_size, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors),
                         num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)
    t0 = time.perf_counter()
    ids, img, txt, slots, refs = [], [], [], [], []
    bar = progress(total=total, desc="embedding", unit="image", disable=not bars_enabled())
    if itm_features:
        # the blocks stay in the object store (pinned by the materialized dataset, owned here);
        # only their small columns come into this process, one block at a time
        blocks = out.materialize()
        refs = blocks.to_arrow_refs()
        batches = (_columns(ray.get(ref), SMALL_COLUMNS) for ref in refs)
    else:
        batches = out.iter_batches(batch_size=None, batch_format="numpy")
    for batch in batches:
        bar.update(len(batch["image_id"]))
        ids.append(batch["image_id"])
        img.append(batch["image_emb"])
        txt.append(batch["text_emb"])
        slots.append(batch["caption_language"])
    bar.close()
    if not ids:
        raise ValueError("no usable rows to embed")
    ids_arr = np.concatenate(ids)
    seconds = time.perf_counter() - t0
    log.info("embedded %d images on %d %s actor(s) in %.1f s (%.1f images/s, %s)", len(ids_arr), num_actors,
             "GPU" if gpus else "CPU", seconds, len(ids_arr) / max(seconds, 1e-9), precision)
    order = np.argsort(ids_arr, kind="stable")
    slot_language = np.concatenate(slots)[order]
    captions = Captions.from_slots(np.concatenate(txt)[order], slot_language, languages)
    if not itm_features:
        return ids_arr[order], np.concatenate(img)[order], captions
    block_of = np.concatenate([np.full(len(b), j) for j, b in enumerate(ids)])[order]
    row_of = np.concatenate([np.arange(len(b)) for b in ids])[order]
    slot_of = np.concatenate([np.nonzero(slot_language == j)[1] for j in range(len(languages))])
    features = ItmFeatures(refs, block_of, row_of, captions.owner, slot_of, _keep=blocks)
    return ids_arr[order], np.concatenate(img)[order], captions, features


class RowTransform:
    """A data actor applying a row → batch transform (``embed_dataset`` on GPUs)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, batch):
        return self.transform(batch)


def cluster_gpus() -> int:
    """GPUs in the cluster."""
    return int(ray.cluster_resources().get("GPU", 0))


def free_cpus() -> float:
    """CPUs no actor or task of the cluster holds now."""
    return ray.available_resources().get("CPU", 0.0)


def embedding_placement(cluster_gpus: int, num_actors: int) -> tuple[int, int, str]:
    """(actors, GPUs each actor reserves, device) for embedding on a cluster with ``cluster_gpus``
    GPUs: one GPU per actor, at most one actor per GPU, each computing on the one Ray gave it
    (Ray sets the actor's CUDA_VISIBLE_DEVICES, so "cuda" is that GPU); else CPUs only."""
    if cluster_gpus > 0:
        return min(num_actors, cluster_gpus), 1, "cuda"
    return num_actors, 0, "cpu"


def _columns(table, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Columns of an Arrow block as numpy (tensor columns zero-copy where Arrow allows)."""
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(table).to_numpy(list(names))


class ItmFeatures:
    """Where a split's ITM features are: embedding blocks in the object store (``refs``), image i at
    row ``image_row[i]`` of block ``image_block[i]``, caption c in slot ``caption_slot[c]`` of its
    image ``caption_image[c]``. Travels to eval actors as refs; each actor maps the blocks it
    needs (zero-copy from the node's object store). ``_keep`` pins the blocks in the driver."""

    def __init__(self, refs, image_block, image_row, caption_image, caption_slot, _keep=None):
        self.refs, self.image_block, self.image_row = list(refs), np.asarray(image_block), np.asarray(image_row)
        self.caption_image, self.caption_slot = np.asarray(caption_image), np.asarray(caption_slot)
        self._keep = _keep
        self._blocks: dict[int, dict[str, np.ndarray]] = {}

    def __getstate__(self):
        state = dict(self.__dict__, _blocks={})
        state["_keep"] = None           # the pin stays with the driver
        return state

    def _block(self, b: int) -> dict[str, np.ndarray]:
        if b not in self._blocks:
            self._blocks[b] = _columns(ray.get(self.refs[b]), ITM_COLUMNS)
        return self._blocks[b]

    def images(self, idx: np.ndarray) -> np.ndarray:
        """image_tokens of images ``idx`` (P×T×h)."""
        return self._gather(self.image_block[idx], self.image_row[idx], "image_tokens")

    def texts(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(text_hidden P×L×h, text_mask P×L) of captions ``idx``."""
        img = self.caption_image[idx]
        blocks, rows, slots = self.image_block[img], self.image_row[img], self.caption_slot[idx]
        return (self._gather(blocks, rows, "text_hidden", slots), self._gather(blocks, rows, "text_mask", slots))

    def _gather(self, blocks: np.ndarray, rows: np.ndarray, name: str, slots: np.ndarray | None = None) -> np.ndarray:
        out = None
        for b in np.unique(blocks):
            sel = np.flatnonzero(blocks == b)
            col = self._block(int(b))[name]
            part = col[rows[sel]] if slots is None else col[rows[sel], slots[sel]]
            if out is None:
                out = np.empty((len(blocks), *part.shape[1:]), dtype=part.dtype)
            out[sel] = part
        return out


@functools.lru_cache(maxsize=1)
def itm_model(model_dir: str):
    """The saved model two-stage re-scoring fuses with, loaded once per eval actor process: a
    ``RankPool`` started ahead loads it while the split is still being embedded."""
    from ccrk_ray.model import CCRKModel

    return CCRKModel.from_pretrained(model_dir).eval()


class BlockRescorer:
    """Two-stage re-scorer reading the ITM features from the embedding blocks (``ItmFeatures``):
    the ITM head's "match" logit of (query, candidate) pairs, ``batch_size`` pairs at a time. The
    model (a saved model's path) loads once per eval actor process (``itm_model``)."""

    def __init__(self, model_dir: str, features: ItmFeatures, batch_size: int = 256):
        self.model_dir, self.features, self.batch_size = str(model_dir), features, batch_size

    def __call__(self, direction: str, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        import torch

        model = itm_model(self.model_dir)
        image_idx, text_idx = pair_indices(direction, queries, candidates)
        out = np.empty(len(image_idx), dtype=np.float64)
        step = self.batch_size * 16            # pairs gathered at once (bounded memory)
        for s in range(0, len(image_idx), step):
            tokens = self.features.images(image_idx[s:s + step])
            hidden, mask = self.features.texts(text_idx[s:s + step])
            n = len(tokens)
            out[s:s + n] = itm_scores(model, torch.as_tensor(tokens), torch.as_tensor(hidden),
                                      torch.as_tensor(mask), np.arange(n), np.arange(n), batch_size=self.batch_size)
        return out.reshape(candidates.shape)


class RankActor:
    """Holds the gallery once (read zero-copy from the object store) and ranks tasks; each
    language's view of it is built on its first task. ``galleries``: the galleries its tasks are
    ranked in (None: the whole split; else image indices, e.g. COCO's 1K folds: a gallery of their
    own, built on first use), so one set of actors serves them all."""

    def __init__(self, image_emb: np.ndarray | None = None, captions: Captions | None = None,
                 true: np.ndarray | None = None, rescore=None, galleries: Sequence[np.ndarray | None] = (None,)):
        self.load(image_emb, captions, true, rescore, galleries)

    def load(self, image_emb: np.ndarray | None, captions: Captions | None, true: np.ndarray | None, rescore=None,
             galleries: Sequence[np.ndarray | None] = (None,)) -> None:
        """The gallery to rank in (an actor started ahead of its data gets it here)."""
        self.image_emb, self.captions, self.true, self.rescore = image_emb, captions, true, rescore
        self.galleries = list(galleries)
        self.parts: dict[int, tuple] = {}
        self.views: dict[tuple[int, int], LanguageView] = {}

    def warm(self, model_dir: str) -> None:
        """Load the ITM model two-stage re-scoring will use (``itm_model``) before any task needs it."""
        itm_model(model_dir)

    def rank(self, task: Task, k_test: int | None, tile: int | None = None, gallery: int = 0) -> ShardRanks:
        return rank_task(self._view(task, gallery), task, k_test=k_test, rescore=self._part(gallery)[3], tile=tile)

    def score_range(self, task: Task) -> tuple[float, float]:
        return score_range_task(self._view(task), task)

    def _part(self, gallery: int) -> tuple:
        if gallery not in self.parts:
            self.parts[gallery] = gallery_subset(self.image_emb, self.captions, self.true, self.rescore,
                                                 self.galleries[gallery])
        return self.parts[gallery]

    def _view(self, task: Task, gallery: int = 0) -> LanguageView:
        key = (gallery, task.column)
        if key not in self.views:
            emb, captions, true, _ = self._part(gallery)
            self.views[key] = LanguageView.build(emb, captions, true, task.column)
        return self.views[key]

    def peak_rss_bytes(self) -> int:
        """This actor process's peak resident memory (shared object-store pages included)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def cpu_seconds(self) -> float:
        """CPU time this actor process has used (user + system)."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def pid(self) -> int:
        return os.getpid()


def rank_on_actors(image_emb: np.ndarray, text_emb, *, languages: Sequence[str] | None = None,
                   query_languages: Sequence[str] | None = None, num_actors: int = 1,
                   tasks: Sequence[Task] | None = None, k_test: int | None = None, rescore=None,
                   chunk: int | None = None, tile: int | None = None, cpus_per_actor: float = 1.0,
                   timeout_s: float | None = None, stats: dict[str, Any] | None = None) -> RankSet:
    """The ``RankSet`` of the query languages, computed by ``num_actors`` eval actors.

    ``text_emb``: ``Captions`` (every caption of the split) or N×K×d (one per image and language,
    named ``languages``). The gallery (and ``rescore``, e.g. an ``ItmRescorer`` with its features)
    goes to the object store once; the actors take tasks (``plan_tasks``: per language, about one
    chunk-aligned range of queries per actor), score them against the language's whole gallery in
    chunks and send back only counts. Bad input raises ValueError before any actor starts; an
    error inside an actor is re-raised here, naming the task, and every actor is stopped.
    ``stats``, when given, gets the tasks, wall seconds and each actor's peak RSS and CPU seconds.
    """
    return rank_galleries_on_actors(image_emb, text_emb, [None], languages=languages, query_languages=query_languages,
                                    num_actors=num_actors, tasks=tasks, k_test=k_test, rescore=rescore, chunk=chunk,
                                    tile=tile, cpus_per_actor=cpus_per_actor, timeout_s=timeout_s, stats=stats)[0]


def rank_galleries_on_actors(image_emb: np.ndarray, text_emb, galleries: Sequence[np.ndarray | None], *,
                             languages: Sequence[str] | None = None,
                             query_languages: Sequence[str] | None = None, num_actors: int = 1,
                             tasks: Sequence[Task] | None = None, k_test: int | None = None, rescore=None,
                             chunk: int | None = None, tile: int | None = None, cpus_per_actor: float = 1.0,
                             timeout_s: float | None = None, stats: dict[str, Any] | None = None,
                             pool: RankPool | None = None) -> list[RankSet]:
    """``rank_on_actors`` in each of ``galleries`` (None: the whole split; else sorted image
    indices ranked as a gallery of their own with their images' captions and ``rescore`` mapped
    to them: COCO's 1K folds), one ``RankSet`` each, on one set of actors started once (each fold
    would otherwise start its own: seconds of process start-up per fold). ``tasks``: the whole
    split's, when ``galleries`` is ``[None]``. ``pool``: actors the caller started ahead (and
    stops); else ``num_actors`` are started here and stopped on return."""
    captions, columns = check_inputs(image_emb, text_emb, languages, query_languages)
    if num_actors < 1:
        raise ValueError(f"num_actors must be >= 1, got {num_actors}")
    if tasks is not None and list(galleries) != [None]:
        raise ValueError("explicit tasks are the whole split's: pass galleries=[None]")
    t0 = time.perf_counter()
    true = true_scores(image_emb, captions)
    parts = [gallery_subset(image_emb, captions, true, rescore, images) for images in galleries]
    planned: list[tuple[int, Task]] = []
    for g, (emb, caps, _, _) in enumerate(parts):
        mine = list(tasks) if tasks is not None else plan_tasks(emb, caps, columns, num_actors,
                                                                two_stage=rescore is not None, chunk=chunk)
        check_tasks(mine, caps, columns, two_stage=rescore is not None)
        planned += [(g, task) for task in mine]
    owned = pool is None
    if owned:
        pool = RankPool(min(num_actors, len(planned)), cpus_per_actor)

    def describe(item: tuple[int, Task]) -> str:
        g, task = item
        return _describe(task, parts[g][1]) + (f" of gallery {g}" if galleries[g] is not None else "")

    try:
        actors = pool.load(image_emb, captions, true, rescore, galleries, len(planned))
        done = _run_tasks(actors, planned, lambda actor, item: actor.rank.remote(item[1], k_test, tile, item[0]),
                          describe, timeout_s, "ranking")
        if stats is not None:
            stats.update(seconds=time.perf_counter() - t0, tasks=[task for _, task in planned],
                         actor_peak_rss_bytes=ray.get([a.peak_rss_bytes.remote() for a in actors]),
                         actor_cpu_seconds=ray.get([a.cpu_seconds.remote() for a in actors]))
    finally:
        if owned:
            pool.close()
    out = []
    for g, (emb, caps, tr, _) in enumerate(parts):
        views = {j: LanguageView.build(emb, caps, tr, j) for j in columns}
        out.append(merge_tasks([part for (h, _), part in done if h == g], views, caps, emb.shape[0]))
    return out


def score_ranges_on_actors(image_emb: np.ndarray, captions: Captions, *, num_actors: int = 1,
                           chunk: int | None = None, cpus_per_actor: float = 1.0,
                           timeout_s: float | None = None) -> dict[str, tuple[float, float]]:
    """{language: (min, max)} of each language's captions × gallery scores, on ``num_actors``
    eval actors (``score_range_task`` over the tasks ``rank_on_actors`` would plan): the first
    pass of a fused evaluation. Only two numbers per task come back."""
    captions, columns = check_inputs(image_emb, captions)
    tasks = plan_tasks(image_emb, captions, columns, num_actors, two_stage=False, chunk=chunk)
    with RankPool(min(num_actors, len(tasks)), cpus_per_actor) as pool:
        # a range needs no true scores (the views only carry them)
        actors = pool.load(image_emb, captions, np.zeros(len(captions.owner)), None, (None,), len(tasks))
        parts = _run_tasks(actors, tasks, lambda actor, task: actor.score_range.remote(task),
                           lambda task: _describe(task, captions), timeout_s, "score ranges")
    return merge_ranges(parts, captions)


@dataclass
class ActorRanking:
    """``InProcessRanking``'s pair (rank, score ranges) on eval actors."""

    num_actors: int = 1
    cpus_per_actor: float = 1.0
    timeout_s: float | None = None

    def rank(self, image_emb: np.ndarray, captions: Captions) -> RankSet:
        return rank_on_actors(image_emb, captions, num_actors=self.num_actors, cpus_per_actor=self.cpus_per_actor,
                              timeout_s=self.timeout_s)

    def score_ranges(self, image_emb: np.ndarray, captions: Captions) -> dict[str, tuple[float, float]]:
        return score_ranges_on_actors(image_emb, captions, num_actors=self.num_actors,
                                      cpus_per_actor=self.cpus_per_actor, timeout_s=self.timeout_s)


class RankPool:
    """Eval actors (``RankActor``) that can start before their data exists: ``ccrk evaluate``
    starts them while the split is being embedded, so their process start-up and, with
    ``itm_model_dir`` (two-stage), the ITM model's load overlap the embedding instead of following
    it. ``load`` hands them one shared copy of the gallery; ``close`` (or leaving the ``with``
    block) stops them."""

    def __init__(self, count: int, cpus_per_actor: float = 1.0, itm_model_dir: str | None = None):
        # Ray sets OMP_NUM_THREADS (which OpenBLAS follows) to the actor's CPUs; a runtime_env with
        # thread variables instead made actor start-up 3-4x slower here.
        actor_cls = ray.remote(RankActor).options(num_cpus=cpus_per_actor)
        self.actors = [actor_cls.remote() for _ in range(count)]
        self.warming = [a.warm.remote(itm_model_dir) for a in self.actors] if itm_model_dir else []

    def load(self, image_emb: np.ndarray, captions: Captions, true: np.ndarray, rescore,
             galleries: Sequence[np.ndarray | None], tasks: int) -> list:
        """The actors that will rank ``tasks`` tasks (at most one each), each given the gallery
        (and ``rescore``) from one copy in the object store. A failed model load surfaces here."""
        try:
            ray.get(self.warming)
        except ray.exceptions.RayTaskError as exc:
            raise _with_task(exc, "loading the ITM model") from exc
        refs = [ray.put(np.ascontiguousarray(image_emb, dtype=np.float32)), ray.put(captions), ray.put(true),
                ray.put(rescore) if rescore is not None else None, ray.put(list(galleries))]
        actors = self.actors[:max(1, tasks)]
        ray.get([actor.load.remote(*refs) for actor in actors])
        return actors

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _run_tasks(pool: list, tasks: Sequence, call, describe, timeout_s: float | None, desc: str) -> list:
    """(task, result) of every task, the actors taking the next task as they finish (``call(actor,
    task)`` submits one). An error inside an actor is re-raised here naming the task
    (``describe(task)``); ``timeout_s`` bounds the whole run. The caller stops the actors."""
    todo = list(tasks)
    pending: dict[ray.ObjectRef, tuple[Any, Any]] = {}
    parts: list = []
    bar = progress(total=len(tasks), desc=desc, unit="task", disable=not bars_enabled())
    try:
        for actor in pool:
            if todo:
                task = todo.pop(0)
                pending[call(actor, task)] = (actor, task)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            if not done:
                raise TimeoutError(f"{desc} did not finish in {timeout_s} s; tasks still running: "
                                   f"{[describe(t) for _, t in pending.values()]}")
            actor, task = pending.pop(done[0])
            try:
                parts.append((task, ray.get(done[0])))
            except ray.exceptions.RayTaskError as exc:
                raise _with_task(exc, describe(task)) from exc
            bar.update(1)
            if todo:
                nxt = todo.pop(0)
                pending[call(actor, nxt)] = (actor, nxt)
        return parts
    finally:
        bar.close()


def _describe(task: Task, captions: Captions) -> str:
    what = "captions" if task.kind == "t2i" else "images"
    return f"{captions.languages[task.column]} {what} [{task.start}, {task.stop})"


def _with_task(exc: "ray.exceptions.RayTaskError", task: str) -> Exception:
    """The actor's own exception (same type where it can be rebuilt from a message), naming the task."""
    cause = exc.cause if isinstance(exc.cause, Exception) else None
    message = f"eval actor failed on {task}: {cause if cause is not None else exc}"
    try:
        return type(cause)(message) if cause is not None else RuntimeError(message)
    except Exception:
        return RuntimeError(message)
