"""Ray side of evaluation: embedding actors over the test split, and eval actors that rank tasks
(query ranges of one language) against that language's whole gallery. The ranking itself is
``ccrk_ray.eval.retrieval.rank_task``."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import ray
import ray.data

from ccrk_ray.core.log import bars_enabled, get_logger, progress
from ccrk_ray.eval.ranks import RankSet
from ccrk_ray.eval.retrieval import (Captions, Embedder, LanguageView, ShardRanks, Task, check_inputs, check_tasks,
                                     merge_tasks, plan_tasks, rank_task, true_scores)


log = get_logger(__name__)


def embed_dataset(ds: "ray.data.Dataset", model_dir, languages: Sequence[str], *, num_actors: int = 1,
                  batch_size: int = 128, cpus_per_actor: float = 1.0, total: int | None = None,
                  precision: str = "fp32") -> tuple[np.ndarray, np.ndarray, Captions]:
    """(image_ids, image_emb N×d, every caption as ``Captions``) for a dataset of eval batches
    (``ccrk_ray.data.ingest.eval_dataset``), in id order; ``total`` images, when known, for the
    progress bar. On a cluster with GPUs each embedding actor reserves one (at most one actor per
    GPU) and computes on it; else on CPUs."""
    # a saved model goes as its path; an OpenClipSpec as itself (not imported here: the eval actors
    # import this module to rank, with numpy alone)
    model = str(model_dir) if isinstance(model_dir, (str, Path)) else model_dir
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        num_actors = min(num_actors, gpus)
    out = ds.map_batches(Embedder, fn_constructor_kwargs=dict(model_dir=model, threads=int(cpus_per_actor) or 1,
                                                              device="cuda" if gpus else "cpu", precision=precision),
                         batch_size=batch_size, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors),
                         num_cpus=cpus_per_actor, num_gpus=1 if gpus else 0)
    t0 = time.perf_counter()
    ids, img, txt, slots = [], [], [], []
    bar = progress(total=total, desc="embedding", unit="image", disable=not bars_enabled())
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
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
    captions = Captions.from_slots(np.concatenate(txt)[order], np.concatenate(slots)[order], languages)
    return ids_arr[order], np.concatenate(img)[order], captions


class RankActor:
    """Holds the gallery once (read zero-copy from the object store) and ranks tasks; each
    language's view of it is built on its first task."""

    def __init__(self, image_emb: np.ndarray, captions: Captions, true: np.ndarray, rescore=None):
        self.image_emb, self.captions, self.true, self.rescore = image_emb, captions, true, rescore
        self.views: dict[int, LanguageView] = {}

    def rank(self, task: Task, k_test: int | None, tile: int | None = None) -> ShardRanks:
        if task.column not in self.views:
            self.views[task.column] = LanguageView.build(self.image_emb, self.captions, self.true, task.column)
        return rank_task(self.views[task.column], task, k_test=k_test, rescore=self.rescore, tile=tile)

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
    captions, columns = check_inputs(image_emb, text_emb, languages, query_languages)
    if num_actors < 1:
        raise ValueError(f"num_actors must be >= 1, got {num_actors}")
    if tasks is None:
        tasks = plan_tasks(image_emb, captions, columns, num_actors, two_stage=rescore is not None, chunk=chunk)
    tasks = list(tasks)
    check_tasks(tasks, captions, columns, two_stage=rescore is not None)
    t0 = time.perf_counter()
    true = true_scores(image_emb, captions)
    refs = [ray.put(np.ascontiguousarray(image_emb, dtype=np.float32)), ray.put(captions), ray.put(true),
            ray.put(rescore) if rescore is not None else None]
    # Ray sets OMP_NUM_THREADS (which OpenBLAS follows) to the actor's CPUs; a runtime_env with
    # thread variables instead made actor start-up 3-4x slower here.
    actor_cls = ray.remote(RankActor).options(num_cpus=cpus_per_actor)
    actors = [actor_cls.remote(*refs) for _ in range(min(num_actors, len(tasks)))]
    pending: dict[ray.ObjectRef, tuple[Any, Task]] = {}
    todo = list(tasks)
    parts: list[ShardRanks] = []
    bar = progress(total=len(tasks), desc="ranking", unit="task", disable=not bars_enabled())
    try:
        for actor in actors:
            if todo:
                task = todo.pop(0)
                pending[actor.rank.remote(task, k_test, tile)] = (actor, task)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            if not done:
                raise TimeoutError(f"ranking did not finish in {timeout_s} s; tasks still running: "
                                   f"{[_describe(t, captions) for _, t in pending.values()]}")
            actor, task = pending.pop(done[0])
            try:
                parts.append(ray.get(done[0]))
            except ray.exceptions.RayTaskError as exc:
                raise _with_task(exc, _describe(task, captions)) from exc
            bar.update(1)
            if todo:
                nxt = todo.pop(0)
                pending[actor.rank.remote(nxt, k_test, tile)] = (actor, nxt)
        if stats is not None:
            stats.update(seconds=time.perf_counter() - t0, tasks=list(tasks),
                         actor_peak_rss_bytes=ray.get([a.peak_rss_bytes.remote() for a in actors]),
                         actor_cpu_seconds=ray.get([a.cpu_seconds.remote() for a in actors]))
        views = {j: LanguageView.build(image_emb, captions, true, j) for j in columns}
        return merge_tasks(parts, views, captions, image_emb.shape[0])
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)


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
