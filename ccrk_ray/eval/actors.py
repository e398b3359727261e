"""Ray side of evaluation: embedding actors over the test split, and eval actors that rank query
shards against the whole gallery. The ranking itself is ``ccrk_ray.eval.retrieval.rank_shard``."""

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
from ccrk_ray.eval.retrieval import (Embedder, ShardRanks, check_inputs, default_chunk, merge_shards, rank_shard,
                                     shard_bounds, true_scores)


log = get_logger(__name__)


def embed_dataset(ds: "ray.data.Dataset", model_dir, *, num_actors: int = 1, batch_size: int = 128,
                  cpus_per_actor: float = 1.0, total: int | None = None, precision: str = "fp32"
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image_ids, image_emb N×d, text_emb N×K×d) for a dataset of 1-to-K batches, in id order;
    ``total`` images, when known, for the progress bar. On a cluster with GPUs each embedding
    actor reserves one (at most one actor per GPU) and computes on it; else on CPUs."""
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
    ids, img, txt = [], [], []
    bar = progress(total=total, desc="embedding", unit="image", disable=not bars_enabled())
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        bar.update(len(batch["image_id"]))
        ids.append(batch["image_id"])
        img.append(batch["image_emb"])
        txt.append(batch["text_emb"])
    bar.close()
    ids_arr = np.concatenate(ids)
    seconds = time.perf_counter() - t0
    log.info("embedded %d images on %d %s actor(s) in %.1f s (%.1f images/s, %s)", len(ids_arr), num_actors,
             "GPU" if gpus else "CPU", seconds, len(ids_arr) / max(seconds, 1e-9), precision)
    order = np.argsort(ids_arr, kind="stable")
    return ids_arr[order], np.concatenate(img)[order], np.concatenate(txt)[order]


class RankActor:
    """Holds the gallery once (read zero-copy from the object store) and ranks query shards."""

    def __init__(self, image_emb: np.ndarray, text_emb: np.ndarray, true: np.ndarray, columns: list[int],
                 rescore=None):
        self.image_emb, self.text_emb, self.true, self.columns, self.rescore = image_emb, text_emb, true, columns, rescore

    def rank(self, start: int, stop: int, k_test: int | None, chunk: int) -> ShardRanks:
        return rank_shard(self.image_emb, self.text_emb, start, stop, true=self.true, columns=self.columns,
                          k_test=k_test, rescore=self.rescore, chunk=chunk)

    def peak_rss_bytes(self) -> int:
        """This actor process's peak resident memory (shared object-store pages included)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def cpu_seconds(self) -> float:
        """CPU time this actor process has used (user + system)."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def pid(self) -> int:
        return os.getpid()


def rank_on_actors(image_emb: np.ndarray, text_emb: np.ndarray, *, languages: Sequence[str] | None = None,
                   query_languages: Sequence[str] | None = None, num_actors: int = 1,
                   shards: Sequence[tuple[int, int]] | None = None, k_test: int | None = None, rescore=None,
                   chunk: int | None = None, cpus_per_actor: float = 1.0, timeout_s: float | None = None,
                   stats: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(t2i, i2t) N×L rank matrices for the query languages, computed by ``num_actors`` eval actors.

    The gallery (and ``rescore``, e.g. an ``ItmRescorer`` with its features) goes to the object
    store once; each actor takes shards of query rows (by default one chunk-aligned shard per
    actor, see ``shard_bounds``), scores them against the whole gallery in chunks and sends back
    only ranks (ITC mode: plus N×L image→text counts). Bad input raises ValueError before any
    actor starts; an error inside an actor is re-raised here and every actor is stopped.
    ``stats``, when given, gets the shards, chunk, wall seconds and each actor's peak RSS and CPU
    seconds.
    """
    columns = check_inputs(image_emb, text_emb, languages, query_languages)
    n = image_emb.shape[0]
    chunk = chunk or default_chunk(n)
    if num_actors < 1:
        raise ValueError(f"num_actors must be >= 1, got {num_actors}")
    if shards is None:
        shards = shard_bounds(n, num_actors, chunk)
    shards = [(int(a), int(b)) for a, b in shards]
    _check_shards(shards, n, chunk)
    t0 = time.perf_counter()
    true = true_scores(image_emb, text_emb)
    refs = [ray.put(np.ascontiguousarray(image_emb, dtype=np.float32)),
            ray.put(np.ascontiguousarray(text_emb, dtype=np.float32)), ray.put(true),
            ray.put(rescore) if rescore is not None else None]
    # Ray sets OMP_NUM_THREADS (which OpenBLAS follows) to the actor's CPUs; a runtime_env with
    # thread variables instead made actor start-up 3-4x slower here.
    actor_cls = ray.remote(RankActor).options(num_cpus=cpus_per_actor)
    actors = [actor_cls.remote(refs[0], refs[1], refs[2], columns, refs[3])
              for _ in range(min(num_actors, len(shards)))]
    pending: dict[ray.ObjectRef, tuple[Any, tuple[int, int]]] = {}
    todo = list(shards)
    parts: list[ShardRanks] = []
    bar = progress(total=n, desc="ranking", unit="image", disable=not bars_enabled())
    try:
        for actor in actors:
            if todo:
                shard = todo.pop(0)
                pending[actor.rank.remote(*shard, k_test, chunk)] = (actor, shard)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            if not done:
                raise TimeoutError(f"ranking did not finish in {timeout_s} s; shards still running: "
                                   f"{sorted(s for _, s in pending.values())}")
            actor, shard = pending.pop(done[0])
            try:
                parts.append(ray.get(done[0]))
            except ray.exceptions.RayTaskError as exc:
                raise _with_shard(exc, shard) from exc
            bar.update(shard[1] - shard[0])
            if todo:
                nxt = todo.pop(0)
                pending[actor.rank.remote(*nxt, k_test, chunk)] = (actor, nxt)
        if stats is not None:
            stats.update(seconds=time.perf_counter() - t0, shards=list(shards), chunk=chunk,
                         actor_peak_rss_bytes=ray.get([a.peak_rss_bytes.remote() for a in actors]),
                         actor_cpu_seconds=ray.get([a.cpu_seconds.remote() for a in actors]))
        return merge_shards(parts, n)
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)


def _check_shards(shards: list[tuple[int, int]], n: int, chunk: int) -> None:
    if not shards:
        raise ValueError("no shards given")
    for a, b in shards:
        if a >= b:
            raise ValueError(f"empty shard [{a}, {b}): it holds no queries")
        if a % chunk:
            raise ValueError(f"shard [{a}, {b}) does not start on a multiple of chunk={chunk}")
    edges = sorted(shards)
    if edges[0][0] != 0 or edges[-1][1] != n or any(x[1] != y[0] for x, y in zip(edges, edges[1:])):
        raise ValueError(f"shards {edges} do not tile the {n} queries [0, {n})")


def _with_shard(exc: "ray.exceptions.RayTaskError", shard: tuple[int, int]) -> Exception:
    """The actor's own exception (same type where it can be rebuilt from a message), naming the shard."""
    cause = exc.cause if isinstance(exc.cause, Exception) else None
    message = f"eval actor failed on shard [{shard[0]}, {shard[1]}): {cause if cause is not None else exc}"
    try:
        return type(cause)(message) if cause is not None else RuntimeError(message)
    except Exception:
        return RuntimeError(message)
