"""What a ``ccrk tune`` trial's Ray Train controller runs: the report to Tune with the sweep's
objective and best-epoch model (``SweepReportCallback``), and the record of the trial's placement
groups (``TrialPlacementGroups``).

Kept apart from ``trial.py`` because the controller imports the module its callbacks come from:
this one imports Ray and file helpers only, where ``trial.py`` brings torch, timm and
transformers (~4 s of CPU before the controller starts any worker)."""

from __future__ import annotations

import math
from typing import Any

from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune.integration.ray_train import TuneReportCallback

from ccrk_ray.core.files import write_json
from ccrk_ray.core.log import get_logger
from ccrk_ray.train.best import BestStore

log = get_logger(__name__)
METRIC = "objective"             # the name Tune sees a sweep's objective under
LAST_FILE = "last.json"          # a trial's last reported metrics, next to its best.json
PG_FILE = "placement_groups.txt"


def objective_metrics(metrics: dict[str, Any], objective: str, mrv_weight: float) -> dict[str, Any]:
    """``val/mrv`` and ``objective`` from an epoch report's validation metrics ({} without them)."""
    r_mean = metrics.get("val/r_mean")
    if r_mean is None:
        return {}
    t2i, i2t = metrics.get("val/mrv_t2i"), metrics.get("val/mrv_i2t")
    mrv = None if t2i is None or i2t is None else (float(t2i) + float(i2t)) / 2
    if objective == "r_mean":
        value = float(r_mean)
    elif mrv is None:
        raise ValueError(f"objective {objective} needs validation MRV (two or more validation languages)")
    elif objective == "-mrv":
        value = -mrv
    else:
        value = float(r_mean) - mrv_weight * mrv
    return {"val/mrv": mrv, METRIC: value}


class SweepReportCallback(TuneReportCallback):
    """Ray Train → Tune reporting of a trial: adds ``val/mrv`` and ``objective`` to rank 0's
    metrics of each report, and keeps the model of the best epoch by the objective in ``best_dir``
    (``best.json`` → ``epoch_<n>/``), so trials stopped by ASHA have their best model too."""

    def __init__(self, objective: str, mrv_weight: float, best_dir: str, model_dir: str):
        super().__init__()
        self.objective, self.mrv_weight, self.best_dir = objective, mrv_weight, best_dir
        self.model_dir = model_dir
        self.store = BestStore(best_dir)
        self.best = self.store.read()      # an earlier attempt of this trial (resumed sweep)

    def after_report(self, run_context, metrics, checkpoint):
        m = dict(metrics[0])
        m.update(objective_metrics(m, self.objective, self.mrv_weight))
        value = m.get(METRIC)
        if checkpoint is not None and value is not None and not math.isnan(value) and (
                self.best is None or value > self.best["score"]):
            self.best = self.store.save_copy(
                checkpoint.filesystem, f"{checkpoint.path}/{self.model_dir}", metric=METRIC, score=value,
                step=int(m["step"]), epoch=int(m["epoch"]), r_mean=m.get("val/r_mean"), mrv=m.get("val/mrv"))
        if self.best is not None:
            m["best/objective"], m["best/epoch"] = self.best["score"], self.best["epoch"]
        if checkpoint is not None:      # the last committed report: a resumed trial that had finished reports it
            write_json(f"{self.best_dir}/{LAST_FILE}", m)
        super().after_report(run_context, [m, *metrics[1:]], checkpoint)


class TrialPlacementGroups(WorkerGroupCallback):
    """Records the placement group of every worker group a trial's TorchTrainer starts (in
    ``trials/<trial>/placement_groups.txt``), so the sweep can release it when Tune stops the trial.

    Tune stops a trial (ASHA, or its last epoch reached) by ending the trial's process, which takes
    the Ray Train controller with it; Ray Train's own cleaner of such placement groups asks the State
    API whether the controller lives, which fails when one machine runs several Ray instances, and
    the placement group (the trial's worker CPUs/GPUs) then stays reserved until the sweep ends."""

    def __init__(self, path: str):
        self.path = path

    def after_worker_group_start(self, worker_group) -> None:
        try:
            pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
            with open(self.path, "a") as f:
                f.write(pg.id.hex() + "\n")
        except Exception as exc:  # an internal API of Ray Train: never fail the trial over it
            log.warning("could not record the trial's placement group: %r", exc)
