"""One ``ccrk tune`` trial: a ``ccrk finetune`` run inside a Tune function trial, its reports to
Tune with the sweep's objective, its best epoch's model, and the release of its placement groups
when Tune stops it."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import ray
import ray.tune
from ray._raylet import PlacementGroupID
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune import Callback as TuneCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.placement_group import PlacementGroup

from ccrk_ray.core.files import read_json, write_json
from ccrk_ray.core.log import get_logger, setup_logging
from ccrk_ray.data.tokenizer import CaptionTokenizer, load_tokenizer
from ccrk_ray.model.saved import CHECKPOINT_MODEL_DIR
from ccrk_ray.tasks.finetune import load_config
from ccrk_ray.train.best import BestStore
from ccrk_ray.train.trainer import run_exists, run_training
from ccrk_ray.tune.space import METRIC, trial_config, write_yaml

log = get_logger(__name__)
LAST_FILE = "last.json"          # a trial's last reported metrics, next to its best.json


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

    def __init__(self, objective: str, mrv_weight: float, best_dir: str):
        super().__init__()
        self.objective, self.mrv_weight, self.best_dir = objective, mrv_weight, best_dir
        self.store = BestStore(best_dir)
        self.best = self.store.read()      # an earlier attempt of this trial (resumed sweep)

    def after_report(self, run_context, metrics, checkpoint):
        m = dict(metrics[0])
        m.update(objective_metrics(m, self.objective, self.mrv_weight))
        value = m.get(METRIC)
        if checkpoint is not None and value is not None and not math.isnan(value) and (
                self.best is None or value > self.best["score"]):
            self.best = self.store.save_copy(
                checkpoint.filesystem, f"{checkpoint.path}/{CHECKPOINT_MODEL_DIR}", metric=METRIC, score=value,
                step=int(m["step"]), epoch=int(m["epoch"]), r_mean=m.get("val/r_mean"), mrv=m.get("val/mrv"))
        if self.best is not None:
            m["best/objective"], m["best/epoch"] = self.best["score"], self.best["epoch"]
        if checkpoint is not None:      # the last committed report: a resumed trial that had finished reports it
            write_json(f"{self.best_dir}/{LAST_FILE}", m)
        super().after_report(run_context, [m, *metrics[1:]], checkpoint)


PG_FILE = "placement_groups.txt"


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


def release_placement_groups(path: Path) -> int:
    """Remove the placement groups listed in ``path`` that still exist; returns how many."""
    if not path.is_file():
        return 0
    removed = 0
    for line in set(path.read_text().split()):
        pg = PlacementGroup(PlacementGroupID(bytes.fromhex(line)))
        try:
            if ray.util.placement_group_table(pg).get("state") not in (None, "REMOVED"):
                ray.util.remove_placement_group(pg)
                removed += 1
        except Exception:       # already gone
            pass
    return removed


class ReleaseStoppedTrials(TuneCallback):
    """Sweep-driver callback: when a trial completes, is stopped or fails, release its Ray Train
    placement groups (see TrialPlacementGroups)."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def _release(self, trial) -> None:
        n = release_placement_groups(Path(self.output_dir) / "trials" / trial.trial_id / PG_FILE)
        if n:
            log.info("released %d placement group(s) of stopped trial %s", n, trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial)


def run_trial(params: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One Tune trial: ``ccrk finetune``'s training with the sampled hyperparameters."""
    trial_id = ray.tune.get_context().get_trial_id()
    settings = sweep["tune"]
    d = trial_config(sweep, params, trial_id)
    out = Path(d["output_dir"])
    path = write_yaml(out / "config.yaml", d, f"# ccrk tune trial {trial_id}: {json.dumps(params)}\n")
    cfg, start = load_config(sweep["task"], path, sweep["checkpoint"])
    best_dir = f"{cfg.run_storage.rstrip('/')}/{cfg.name}/best"
    last = read_json(f"{best_dir}/{LAST_FILE}")
    finished = last is not None and (int(last["epoch"]) >= cfg.train.epochs or bool(
        cfg.train.max_steps and int(last["step"]) >= cfg.train.max_steps))
    with open(out / "attempts.jsonl", "a") as f:       # one line per start of this trial (audits, tests)
        f.write(json.dumps({"time": time.time(), "pid": os.getpid(), "finished_before": finished}) + "\n")
    if finished:
        # it reported its last epoch before the sweep was interrupted, but Tune's state missed it:
        # report that result again instead of training again
        ray.tune.report({k: v for k, v in last.items() if k not in ("trial_id", "checkpoint_path")})
        return
    setup_logging(sweep.get("verbosity", 0))
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    caption_tokenizer = CaptionTokenizer(tokenizer, cfg.data.max_length, cfg.data.pre_caption)
    log.info("trial %s: %s", trial_id, json.dumps(params))
    run_training(cfg, tokenizer, caption_tokenizer, resume=run_exists(cfg.run_storage, cfg.name),
                 init_from=start.init_from, val_languages=cfg.task.val_languages,
                 callbacks=[SweepReportCallback(settings["objective"], settings["mrv_weight"], best_dir),
                            TrialPlacementGroups(str(out / PG_FILE))])
