"""One ``ccrk tune`` trial: a ``ccrk finetune`` run inside a Tune function trial, its reports to
Tune with the sweep's objective and its best epoch's model (``ccrk_ray.tune.callbacks``), and the
release of its placement groups when Tune stops it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import ray
import ray.tune
from ray._raylet import PlacementGroupID
from ray.tune import Callback as TuneCallback
from ray.util.placement_group import PlacementGroup

from ccrk_ray.core.files import read_json
from ccrk_ray.core.log import get_logger, setup_logging
from ccrk_ray.data.tokenizer import CaptionTokenizer, load_tokenizer
from ccrk_ray.model.saved import CHECKPOINT_MODEL_DIR
from ccrk_ray.tasks.finetune import load_config
from ccrk_ray.train.trainer import run_exists, run_training
from ccrk_ray.tune.callbacks import LAST_FILE, PG_FILE, SweepReportCallback, TrialPlacementGroups
from ccrk_ray.tune.space import trial_config, write_yaml

log = get_logger(__name__)


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
                 callbacks=[SweepReportCallback(settings["objective"], settings["mrv_weight"], best_dir,
                                               CHECKPOINT_MODEL_DIR),
                            TrialPlacementGroups(str(out / PG_FILE))])
