"""Rows read and skipped, counted by every data actor of a job into one named actor.

Its own module, importing neither torch nor the tokenizer: the actor's process imports only this
(a process that imports the data path would spend seconds loading torch to add up integers)."""

from __future__ import annotations

from typing import Any

import ray

from ccrk_ray.data.rows import SkipCounter

STATS_NAMESPACE = "ccrk"
_KEEP_ALIVE: dict[str, Any] = {}


@ray.remote(num_cpus=0)
class DataStats:
    """Rows read and skipped (by reason, with example ids), summed over every data actor, kept per
    training run and epoch (both ``None`` for rows read outside training, e.g. evaluation): the
    trials of a sweep share the job's actor but not their counts."""

    def __init__(self):
        self.rows: dict[tuple[str | None, int | None], int] = {}
        self.skipped: dict[tuple[str | None, int | None], SkipCounter] = {}

    def add(self, rows: int, counts: dict[str, int], examples: dict[str, list[str]],
            epoch: int | None = None, run: str | None = None) -> None:
        key = (run, epoch)
        self.rows[key] = self.rows.get(key, 0) + rows
        self.skipped.setdefault(key, SkipCounter()).add_counts(counts, examples)

    def snapshot(self, epoch: int | None = None, run: str | None = None) -> dict[str, Any]:
        """Totals over everything read, or over one run's rows and/or one epoch's."""
        keys = [k for k in self.rows if (run is None or k[0] == run) and (epoch is None or k[1] == epoch)]
        skipped = SkipCounter()
        for key in keys:
            skipped.add_counts(self.skipped[key].counts, self.skipped[key].example_ids)
        return {"rows_read": sum(self.rows[key] for key in keys), "skipped": dict(skipped.counts),
                "examples": {k: list(v) for k, v in skipped.example_ids.items()}}

    def epochs(self, run: str | None = None) -> dict[int, dict[str, Any]]:
        """``snapshot(epoch, run)`` of every training epoch read so far."""
        return {e: self.snapshot(e, run) for r, e in self.rows if e is not None and (run is None or r == run)}


def stats_actor(create: bool = False):
    """The job's DataStats actor (created on demand by the driver), or None.

    Named per job in a fixed namespace: Train workers and Data actors of the job find it whatever
    namespace they run in, and two jobs on one cluster never share counts."""
    name = f"data-stats-{ray.get_runtime_context().get_job_id()}"
    try:
        return ray.get_actor(name, namespace=STATS_NAMESPACE)
    except ValueError:
        if not create:
            return None
        handle = DataStats.options(name=name, namespace=STATS_NAMESPACE, get_if_exists=True).remote()
        _KEEP_ALIVE[name] = handle      # a named actor dies with its last handle: the driver keeps one
        return handle
