"""``ccrk tune --task TASK --config FILE --checkpoint CKPT --num-samples N [--max-concurrent M] [--resume]``:
a Ray Tune sweep of the fine-tuning hyperparameters of ``ccrk finetune``.

FILE is a ``ccrk finetune`` config (``ccrk_ray.finetune``) plus a ``tune:`` section::

    tune:
      objective: r_mean          # r_mean | -mrv | r_mean-mrv (see below)
      mrv_weight: 1.0            # lambda of r_mean-mrv
      grace_period: 1            # ASHA: epochs every trial gets before it can be stopped
      reduction_factor: 2        # ASHA: 1/reduction_factor of the trials go on at each rung
      seed: 0                    # of the random search
      name: tune                 # the Tune experiment name under the storage path
      space:                     # hyperparameter: distribution (a plain value fixes it)
        lr: {loguniform: [1.0e-5, 1.0e-4]}
        temperature: {uniform: [0.04, 0.1]}
        batch_size: {choice: [16, 24]}
        epochs: 5
        warmup: {uniform: [0.0, 0.2]}
        weight_decay: {choice: [0.0, 0.01, 0.05]}

Hyperparameters (``HYPERPARAMETERS``): ``lr``, ``weight_decay``, ``warmup``, ``epochs``,
``batch_size`` (images per worker per step; the trial's global batch becomes batch_size x the
maximum worker count, so no gradient accumulation), ``temperature`` (where the ITC temperature
starts, instead of the checkpoint's learned one) and ``lr_mult``. Distributions
(``DISTRIBUTIONS``): ``uniform``/``loguniform`` ``[low, high]``, ``quniform``/``qloguniform``
``[low, high, q]``, ``randint`` ``[low, high)`` (high excluded, as in Ray Tune), ``choice [...]``
and ``grid [...]`` (every value, for each of the N samples). Without ``space`` the default
(``default_space``) searches lr (x1/3..x3 of the config's), temperature, batch size (the config's
and half of it), warm-up and weight decay, with the config's epochs, plus ``lr_mult`` (1, 2 or 5)
when the start has fresh layers. An unknown name, an unknown or malformed distribution, a value
the config would reject (every bound and choice is checked) or a space that varies nothing is a
ConfigError before any trial starts. ``lr_mult`` multiplies the LR of parameters that start fresh:
with ``--checkpoint MODEL_SPEC.yaml`` (``ccrk_ray.finetune.StartingPoint``: pre-trained timm/HF
encoders, CCRK's projections, cross-attention and heads new) those layers; a saved CCRK model has
none, so varying it there is an error rather than a silent no-op.

Each trial is a ``ccrk finetune`` run (its own config under ``output_dir/trials/<trial>/config.yaml``;
a Ray Train ``TorchTrainer`` fitted inside a Tune function trial) that reports one Tune result per
epoch, with the validation metrics and the objective Tune sees as ``objective`` (always maximised):

- ``r_mean``: validation r_mean (mean of R@1/5/10 both ways, %);
- ``-mrv``: minus validation MRV, the mean of the t2i and i2t mean rank variance over
  ``task.val_languages`` (needs two or more);
- ``r_mean-mrv``: ``r_mean - mrv_weight * mrv``.

ASHA stops trials that are behind at each rung (``epoch`` as the time attribute). Trials run side
by side (``--max-concurrent``, default: as many as the cluster's CPUs/GPUs hold, a trial needing
max workers x (CPUs per worker + data actors x CPUs per actor) CPUs and a GPU per worker with
``scaling.gpu``). Under ``output_dir``:

- ``trials/<trial>/``: the trial's config, TensorBoard logs, Ray Train checkpoints
  (``ray_results/finetune``; under ``storage_path/<name>/trials/<trial>`` when the config sets
  one) and its best epoch's model (``.../finetune/best``: ``best.json`` → ``epoch_<n>/``; the
  trial's process is stopped once it reports its last epoch, so this is its model to keep);
- ``results.csv`` and ``results.md``: one row per trial, its hyperparameters and final metrics,
  best first;
- ``best_config.yaml``: the best trial's config for ``ccrk finetune --task TASK --config``;
- ``best_model/``: the best trial's model at its best epoch, with tokenizer and
  ``preprocess.json`` (``ccrk evaluate --checkpoint`` takes it);
- ``tune_report.json``; the Tune experiment is in ``ray_results/<name>`` (or ``storage_path``).

``--resume`` restores an interrupted sweep from its experiment state: finished trials are kept, the
unfinished ones continue (each from its Ray Train run's latest checkpoint). A multi-node sweep
needs ``output_dir`` on a filesystem every node sees.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune import Callback as TuneCallback
from ray.tune.integration.ray_train import TuneReportCallback

from ccrk_ray.config import ConfigError, check_range

HYPERPARAMETERS: dict[str, tuple[str, str, type]] = {   # name: (config section, key, type)
    "lr": ("train", "lr", float),
    "lr_mult": ("model", "lr_mult", float),
    "temperature": ("model", "temperature", float),
    "batch_size": ("train", "batch_size", int),
    "epochs": ("train", "epochs", int),
    "warmup": ("train", "warmup", float),
    "weight_decay": ("train", "weight_decay", float),
}
DISTRIBUTIONS = {"uniform": 2, "loguniform": 2, "quniform": 3, "qloguniform": 3, "randint": 2, "choice": None,
                 "grid": None}
OBJECTIVES = ("r_mean", "-mrv", "r_mean-mrv")
METRIC = "objective"
TRIAL_NAME = "finetune"          # the Ray Train run name of every trial
SWEEP_FILE = "sweep.json"
LAST_FILE = "last.json"          # a trial's last reported metrics, next to its best.json
DRIVER_CPUS = 0.05               # a trial's own process (it only drives its TorchTrainer); Tune needs > 0


@dataclass
class TuneSection:
    space: dict[str, Any] | None = None
    objective: str = "r_mean"
    mrv_weight: float = 1.0
    grace_period: int = 1
    reduction_factor: int = 2
    seed: int = 0
    name: str = "tune"

    @classmethod
    def from_dict(cls, d: Any, where: str = "tune") -> "TuneSection":
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: must be a mapping, got {d!r}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} "
                              f"(known: {', '.join(f.name for f in fields(cls))})")
        t = cls(**d)
        t.objective = str(t.objective).replace(" ", "")
        if t.objective not in OBJECTIVES:
            raise ConfigError(f"tune.objective must be one of {', '.join(OBJECTIVES)}, got {d['objective']!r}")
        check_range("tune.mrv_weight", t.mrv_weight, 0)
        check_range("tune.grace_period", t.grace_period, 1)
        check_range("tune.reduction_factor", t.reduction_factor, 2)
        if t.space is not None and not isinstance(t.space, dict):
            raise ConfigError(f"tune.space must be a mapping of hyperparameter: distribution, got {t.space!r}")
        return t


@dataclass(frozen=True)
class Dist:
    """One hyperparameter's distribution: ``kind`` in DISTRIBUTIONS, or ``fixed`` (one value)."""
    kind: str
    args: tuple

    def corners(self) -> list:
        """The values a config must accept for every sample to be valid."""
        if self.kind in ("choice", "grid", "fixed"):
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return [self.args[0], self.args[1]]

    def to_tune(self):
        from ray import tune

        if self.kind == "fixed":
            return self.args[0]
        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def to_yaml(self):
        return self.args[0] if self.kind == "fixed" else {self.kind: list(self.args)}


def parse_dist(name: str, spec: Any) -> Dist:
    where = f"tune.space.{name}"
    if not isinstance(spec, dict):
        if isinstance(spec, (list, tuple)):
            raise ConfigError(f"{where}: a list needs a distribution, e.g. {{choice: {list(spec)}}}")
        return Dist("fixed", (spec,))
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: expected one of {', '.join(DISTRIBUTIONS)} (e.g. {{loguniform: [1.0e-5, 1.0e-4]}}) "
                          f"or a plain value, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, (list, tuple)) or not args:
        raise ConfigError(f"{where}: {kind} takes a non-empty list, got {args!r}")
    n = DISTRIBUTIONS[kind]
    if n is not None:
        if len(args) != n or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"{where}: {kind} takes {n} numbers "
                              f"[low, high{', q' if n == 3 else ''}], got {args!r}")
        lo, hi = args[0], args[1]
        if not lo < hi:
            raise ConfigError(f"{where}: {kind} needs low < high, got {args!r}")
        if "log" in kind and lo <= 0:
            raise ConfigError(f"{where}: {kind} needs low > 0, got {args!r}")
        if n == 3 and args[2] <= 0:
            raise ConfigError(f"{where}: {kind} needs q > 0, got {args!r}")
    return Dist(kind, tuple(args))


def parse_space(space: dict[str, Any]) -> dict[str, Dist]:
    if not space:
        raise ConfigError("tune.space is empty: name at least one hyperparameter to search "
                          f"({', '.join(HYPERPARAMETERS)}), or leave tune.space out for the default space")
    unknown = sorted(set(space) - set(HYPERPARAMETERS))
    if unknown:
        raise ConfigError(f"tune.space: unknown hyperparameter(s) {', '.join(map(str, unknown))} "
                          f"(known: {', '.join(HYPERPARAMETERS)})")
    out = {name: parse_dist(name, spec) for name, spec in space.items()}
    for name, d in out.items():
        if HYPERPARAMETERS[name][2] is int:
            ok = d.kind in ("randint", "choice", "grid", "fixed") and all(
                isinstance(v, int) and not isinstance(v, bool) for v in d.args)
            if not ok:
                raise ConfigError(f"tune.space.{name}: integer values only (a plain integer, or randint, choice or "
                                  f"grid of integers), got {d.to_yaml()!r}")
    if all(d.kind == "fixed" or (d.kind in ("choice", "grid") and len(set(map(repr, d.args))) == 1)
           for d in out.values()):
        raise ConfigError("tune.space varies no hyperparameter: nothing to search")
    return out


def default_space(cfg, fresh_layers: bool = False) -> dict[str, Dist]:
    """The space searched when the config's ``tune:`` has no ``space``: around the config's values
    (and ``lr_mult`` when the starting point has fresh layers)."""
    lr, bs = cfg.train.lr, cfg.train.batch_size
    extra = {"lr_mult": Dist("choice", (1.0, 2.0, 5.0))} if fresh_layers else {}
    return extra | {
        "lr": Dist("loguniform", (lr / 3, lr * 3)),
        "temperature": Dist("loguniform", (0.035, 0.14)),
        "batch_size": Dist("choice", tuple(sorted({max(2, bs // 2), bs}))),
        "epochs": Dist("fixed", (cfg.train.epochs,)),
        "warmup": Dist("uniform", (0.0, 0.2)),
        "weight_decay": Dist("choice", (0.0, 0.01, 0.05)),
    }


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
        from ccrk_ray.train.state import read_best

        self.objective, self.mrv_weight, self.best_dir = objective, mrv_weight, best_dir
        self.best = read_best(best_dir)      # an earlier attempt of this trial (resumed sweep)

    def after_report(self, run_context, metrics, checkpoint):
        m = dict(metrics[0])
        m.update(objective_metrics(m, self.objective, self.mrv_weight))
        value = m.get(METRIC)
        if checkpoint is not None and value is not None and not math.isnan(value) and (
                self.best is None or value > self.best["objective"]):
            self.best = save_best_epoch(checkpoint, self.best_dir, m)
        if self.best is not None:
            m["best/objective"], m["best/epoch"] = self.best["objective"], self.best["epoch"]
        if checkpoint is not None:      # the last committed report: a resumed trial that had finished reports it
            _write_json(f"{self.best_dir}/{LAST_FILE}", m)
        super().after_report(run_context, [m, *metrics[1:]], checkpoint)


def _write_json(uri: str, value: dict[str, Any]) -> None:
    from ccrk_ray.data import storage

    fs, path = storage.resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(value, default=str).encode())


def _read_json(uri: str) -> dict[str, Any] | None:
    import pyarrow.fs as pafs

    from ccrk_ray.data import storage

    fs, path = storage.resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def save_best_epoch(checkpoint, best_dir: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Copy the checkpoint's model to ``best_dir/epoch_<n>``, then point ``best.json`` at it and
    delete the earlier best (pointer written last: a crash keeps the previous best)."""
    import pyarrow.fs as pafs

    from ccrk_ray.data import storage
    from ccrk_ray.train.state import BEST_FILE, MODEL_DIR, read_best

    fs, root = storage.resolve(best_dir)
    previous = read_best(best_dir)
    name = f"epoch_{int(metrics['epoch']):04d}"
    fs.create_dir(f"{root}/{name}", recursive=True)
    pafs.copy_files(f"{checkpoint.path}/{MODEL_DIR}", f"{root}/{name}", source_filesystem=checkpoint.filesystem,
                    destination_filesystem=fs)
    best = {"objective": metrics[METRIC], "epoch": int(metrics["epoch"]), "step": int(metrics["step"]),
            "r_mean": metrics.get("val/r_mean"), "mrv": metrics.get("val/mrv"), "dir": name}
    with fs.open_output_stream(f"{root}/{BEST_FILE}") as f:
        f.write(json.dumps(best).encode())
    if previous and previous.get("dir") not in (None, name):
        fs.delete_dir(f"{root}/{previous['dir']}")
    return best


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
            print(f"[ccrk tune] could not record the trial's placement group: {exc!r}", flush=True)


def release_placement_groups(path: Path) -> int:
    """Remove the placement groups listed in ``path`` that still exist; returns how many."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

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
            print(f"[ccrk tune] released {n} placement group(s) of stopped trial {trial.trial_id}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial)


# --- the sweep's settings -----------------------------------------------------------------------

def _absolute(value):
    """Local paths made absolute (trials run in other processes and directories); URIs kept."""
    if isinstance(value, str) and value and "://" not in value:
        return str(Path(value).expanduser().resolve())
    if isinstance(value, dict):
        return {k: _absolute(v) for k, v in value.items()}
    return value


def _absolute_paths(user: dict[str, Any]) -> dict[str, Any]:
    d = copy.deepcopy(user)
    for key in ("output_dir", "storage_path"):
        if d.get(key):
            d[key] = _absolute(d[key])
    data = d.get("data")
    if isinstance(data, dict):
        for key in ("train", "val", "test", "tokenizer"):
            if data.get(key):
                data[key] = _absolute(data[key])
    if isinstance(d.get("train"), dict) and d["train"].get("trace_dir"):
        d["train"]["trace_dir"] = _absolute(d["train"]["trace_dir"])
    return d


def overrides(params: dict[str, Any], workers_max: int) -> dict[str, Any]:
    """Config sections setting the hyperparameters ``params`` (values cast to their types)."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        section, key, kind = HYPERPARAMETERS[name]
        out.setdefault(section, {})[key] = kind(value)
    if "batch_size" in params:
        out["train"]["global_batch_size"] = int(params["batch_size"]) * workers_max
    return out


def trial_config(sweep: dict[str, Any], params: dict[str, Any], trial_id: str) -> dict[str, Any]:
    """The ``ccrk finetune`` config of one trial."""
    from ccrk_ray.finetune import deep_merge

    d = deep_merge(sweep["base"], overrides(params, sweep["workers_max"]))
    d["output_dir"] = str(Path(sweep["output_dir"]) / "trials" / trial_id)
    d["name"] = TRIAL_NAME
    if sweep.get("storage_path"):
        d["storage_path"] = f"{sweep['storage_path'].rstrip('/')}/{sweep['name']}/trials/{trial_id}"
    else:
        d.pop("storage_path", None)
    d.setdefault("train", {})["checkpoint_every"] = 0      # one report (one Tune result) per epoch
    if d["train"].get("trace_dir"):
        d["train"]["trace_dir"] = str(Path(d["train"]["trace_dir"]) / trial_id)
    return d


def _write_yaml(path: Path, d: dict[str, Any], header: str = "") -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(d, sort_keys=False))
    return path


def _load_finetune(task: str, d: dict[str, Any], checkpoint: str):
    from ccrk_ray.finetune import load_config

    with tempfile.TemporaryDirectory() as tmp:
        return load_config(task, _write_yaml(Path(tmp) / "config.yaml", d), checkpoint)


def trial_resources(cfg) -> tuple[float, int]:
    """(CPUs, GPUs) one trial holds at most: its process, its Train workers and their data actors."""
    hi = cfg.scaling.workers[1]
    return (DRIVER_CPUS + hi * (cfg.scaling.cpus_per_worker + cfg.data.data_actors * cfg.data.cpus_per_actor),
            hi if cfg.scaling.gpu else 0)


def default_concurrency(cluster: dict[str, float], cpus: float, gpus: int, trials: int) -> int:
    fits = [math.floor(cluster.get("CPU", 0) / cpus + 1e-9) if cpus else trials]
    if gpus:
        fits.append(math.floor(cluster.get("GPU", 0) / gpus + 1e-9))
    return max(1, min(trials, *fits))


def prepare_sweep(task: str, config_path: str | Path, checkpoint: str | Path, num_samples: int) -> tuple[dict[str, Any], Any]:
    """Everything checked before Ray starts: (the sweep's settings, the base FinetuneConfig)."""
    from ccrk_ray.data.pipeline import check_dataset
    from ccrk_ray.finetune import StartingPoint
    from ccrk_ray.pretrain import read_yaml

    if num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {num_samples}")
    user = read_yaml(config_path)
    settings = TuneSection.from_dict(user.pop("tune", None))
    start = StartingPoint.of(checkpoint)
    base = _absolute_paths(user)
    cfg, _ = _load_finetune(task, base, str(start.source))
    if not cfg.data.val:
        raise ConfigError("data.val is required: trials are compared (and stopped early) on validation metrics "
                          "after every epoch")
    if settings.objective != "r_mean" and len(cfg.task.val_languages) < 2:
        raise ConfigError(f"tune.objective {settings.objective} needs MRV on validation: set task.val_languages to "
                          f"two or more languages (got {', '.join(cfg.task.val_languages)})")
    space = default_space(cfg, start.fresh_layers) if settings.space is None else parse_space(settings.space)
    if "lr_mult" in space and len({repr(v) for v in space["lr_mult"].corners()}) > 1 and not start.fresh_layers:
        raise ConfigError("tune.space.lr_mult: the starting point has no freshly initialised parameters (every "
                          "weight comes from the checkpoint), so lr_mult changes nothing; fix it, leave it out, or "
                          "start from pre-trained encoders (--checkpoint MODEL_SPEC.yaml)")
    workers_max = cfg.scaling.workers[1]
    for name, dist in space.items():      # every bound and choice must make a valid config
        for value in dist.corners():
            try:
                _load_finetune(task, _deep(base, overrides({name: value}, workers_max)), str(start.source))
            except (ConfigError, TypeError, ValueError) as exc:
                raise ConfigError(f"tune.space.{name}: value {value!r} is not valid: {exc}") from None
    check = check_dataset(cfg.data.train, cfg.data.languages, cfg.data.endpoint_url)
    largest = max(space["batch_size"].corners()) * workers_max if "batch_size" in space else cfg.train.global_batch_size
    if check.rows < largest:
        raise ConfigError(f"data.train has {check.rows} rows: not one full global batch of {largest} images")
    sweep = {"task": task, "checkpoint": str(start.source), "output_dir": str(Path(cfg.output_dir).resolve()),
             "storage_path": cfg.storage_path, "name": settings.name, "base": base,
             "space": {k: d.to_yaml() for k, d in space.items()}, "tune": asdict(settings) | {"space": None},
             "workers_max": workers_max, "epochs": cfg.train.epochs, "num_samples": num_samples}
    return json.loads(json.dumps(sweep)), cfg


def _deep(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    from ccrk_ray.finetune import deep_merge

    return deep_merge(base, over)


def _space(sweep: dict[str, Any]) -> dict[str, Dist]:
    return {name: parse_dist(name, spec) for name, spec in sweep["space"].items()}


# --- a trial --------------------------------------------------------------------------------------

def run_trial(params: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One Tune trial: ``ccrk finetune``'s training with the sampled hyperparameters."""
    import ray.tune

    from ccrk_ray.finetune import load_config
    from ccrk_ray.pretrain import run_training
    from ccrk_ray.tokenizer import CaptionTokenizer, load_tokenizer
    from ccrk_ray.train.trainer import run_exists

    trial_id = ray.tune.get_context().get_trial_id()
    settings = sweep["tune"]
    d = trial_config(sweep, params, trial_id)
    out = Path(d["output_dir"])
    path = _write_yaml(out / "config.yaml", d, f"# ccrk tune trial {trial_id}: {json.dumps(params)}\n")
    cfg, start = load_config(sweep["task"], path, sweep["checkpoint"])
    best_dir = f"{cfg.run_storage.rstrip('/')}/{cfg.name}/best"
    last = _read_json(f"{best_dir}/{LAST_FILE}")
    finished = last is not None and (int(last["epoch"]) >= cfg.train.epochs or bool(
        cfg.train.max_steps and int(last["step"]) >= cfg.train.max_steps))
    with open(out / "attempts.jsonl", "a") as f:       # one line per start of this trial (audits, tests)
        f.write(json.dumps({"time": time.time(), "pid": os.getpid(), "finished_before": finished}) + "\n")
    if finished:
        # it reported its last epoch before the sweep was interrupted, but Tune's state missed it:
        # report that result again instead of training again
        ray.tune.report({k: v for k, v in last.items() if k not in ("trial_id", "checkpoint_path")})
        return
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    caption_tokenizer = CaptionTokenizer(tokenizer, cfg.data.max_length)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[trial {trial_id} {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    run_training(cfg, tokenizer, caption_tokenizer, log=log, resume=run_exists(cfg.run_storage, cfg.name),
                 extra={**start.loop_extra(),
                        "val": {"uri": cfg.data.val, "languages": list(cfg.task.val_languages)}},
                 callbacks=[SweepReportCallback(settings["objective"], settings["mrv_weight"], best_dir),
                            TrialPlacementGroups(str(out / PG_FILE))])


# --- the sweep ------------------------------------------------------------------------------------

def _experiment(sweep: dict[str, Any]) -> tuple[str, Any, str]:
    """(storage path for Tune, its filesystem or None, the experiment's path)."""
    from ccrk_ray.data import storage

    root = sweep["storage_path"] or str(Path(sweep["output_dir"]) / "ray_results")
    if storage.is_remote(root):
        fs, path = storage.resolve(root)
        return path, fs, f"{path.rstrip('/')}/{sweep['name']}"
    return root, None, str(Path(root) / sweep["name"])


def _results_table(results, sweep: dict[str, Any]) -> list[dict[str, Any]]:
    names = list(sweep["space"])
    rows = []
    for r in results:
        m = r.metrics or {}
        params = {k: r.config.get(k) for k in names}
        trial = m.get("trial_id") or Path(r.path).name
        # the trial's own best (what best_model holds, kept across attempts): Tune's history can
        # miss an epoch whose report the trial committed just before a killed driver logged it
        best_obj, best_epoch = m.get("best/objective"), m.get("best/epoch")
        df = r.metrics_dataframe
        if best_obj is None and df is not None and METRIC in df and df[METRIC].notna().any():
            i = df[METRIC].idxmax()
            best_obj, best_epoch = float(df[METRIC][i]), int(df["epoch"][i])
        best_obj = None if best_obj is None else float(best_obj)
        best_epoch = None if best_epoch is None else int(best_epoch)
        planned = int(params.get("epochs") or sweep["epochs"])
        epochs = int(m.get("epoch", 0) or 0)
        status = "error" if r.error else "finished" if epochs >= planned else "stopped early"
        row = {"trial": trial, "status": status, **params, "epochs_done": epochs,
               "val_r_mean": m.get("val/r_mean"), "val_mrv": m.get("val/mrv"), "val_mrv_t2i": m.get("val/mrv_t2i"),
               "val_mrv_i2t": m.get("val/mrv_i2t"), "loss": m.get("loss"), "objective": m.get(METRIC),
               "best_objective": best_obj, "best_epoch": best_epoch}
        rows.append(row)
    rows.sort(key=lambda r: -math.inf if r["best_objective"] is None else -r["best_objective"])
    return rows


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_tables(rows: list[dict[str, Any]], out: Path) -> None:
    cols = list(rows[0]) if rows else ["trial"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(row[c]) for c in cols) + " |" for row in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def export_best(sweep: dict[str, Any], cfg, trial: str, params: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """``best_config.yaml`` and ``best_model/`` (tokenizer and preprocess.json included)."""
    import shutil

    import pyarrow.fs as pafs

    from ccrk_ray.data import storage
    from ccrk_ray.pretrain import PREPROCESS_FILE
    from ccrk_ray.tokenizer import CaptionTokenizer, load_tokenizer
    from ccrk_ray.train.state import read_best

    out = Path(sweep["output_dir"])
    d = _deep(sweep["base"], overrides(params, sweep["workers_max"]))
    d["output_dir"] = str(out / "best_finetune")
    header = (f"# ccrk tune: best of the sweep in {out} (trial {trial}, {sweep['tune']['objective']} "
              f"{row['best_objective']:.4g} at epoch {row['best_epoch']})\n"
              f"# ccrk finetune --task {sweep['task']} --config THIS_FILE --checkpoint {sweep['checkpoint']}\n")
    _write_yaml(out / "best_config.yaml", d, header)
    tc = trial_config(sweep, params, trial)
    run_storage = tc.get("storage_path") or str(Path(tc["output_dir"]) / "ray_results")
    best_dir = f"{run_storage.rstrip('/')}/{TRIAL_NAME}/best"
    best = read_best(best_dir)
    if best is None:
        raise RuntimeError(f"trial {trial} has no best model in {best_dir}")
    fs, root = storage.resolve(best_dir)
    dest = out / "best_model"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    pafs.copy_files(f"{root}/{best['dir']}", str(dest), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    CaptionTokenizer(load_tokenizer(cfg.data.tokenizer), cfg.data.max_length).save_pretrained(dest)
    (dest / PREPROCESS_FILE).write_text(json.dumps(
        {"image_size": cfg.data.image_size, "max_length": cfg.data.max_length,
         "languages": list(cfg.data.languages)}, indent=2))
    return {"trial": trial, **best}


def run_tune(task: str, config_path: str | Path, checkpoint: str | Path, num_samples: int,
             max_concurrent: int | None = None, resume: bool = False) -> dict[str, Any]:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from ccrk_ray.data.pipeline import stats_actor
    from ccrk_ray.demo import _log, init_ray

    t0 = time.perf_counter()
    log = lambda m: _log(m, t0)   # noqa: E731
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1, got {max_concurrent}")
    sweep, cfg = prepare_sweep(task, config_path, checkpoint, num_samples)
    out = Path(sweep["output_dir"])
    storage_path, fs, exp_path = _experiment(sweep)
    restoring = tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
    if restoring and not resume:
        raise ConfigError(f"{exp_path} holds a sweep; pass --resume to finish it or pick another output_dir/tune.name")
    if restoring:
        saved = json.loads((out / SWEEP_FILE).read_text())
        if saved != sweep:
            log(f"--resume: the sweep continues with the settings it started with ({out / SWEEP_FILE}); "
                "changes to the config or --num-samples are ignored")
        sweep = saved
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / SWEEP_FILE).write_text(json.dumps(sweep, indent=2))
    space = _space(sweep)
    settings = sweep["tune"]
    cpus, gpus = trial_resources(cfg)
    grid = math.prod(len(d.args) for d in space.values() if d.kind == "grid")
    trials = sweep["num_samples"] * grid
    started = init_ray(num_cpus=math.ceil(max(cpus * (max_concurrent or 1) + 1, os.cpu_count() or 1)))
    try:
        stats_actor(create=True)       # the job's data stats actor lives as long as the sweep's driver
        concurrency = max_concurrent or default_concurrency(ray.cluster_resources(), cpus, gpus, trials)
        max_epochs = max(int(v) for v in space["epochs"].corners()) if "epochs" in space else cfg.train.epochs
        trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), {"CPU": DRIVER_CPUS})
        if restoring:
            log(f"resuming the sweep in {exp_path}")
            tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=fs)
        else:
            log(f"sweep of {trials} trial(s) over {', '.join(n for n, d in space.items() if d.kind != 'fixed')}, "
                f"{concurrency} at a time ({cpus:g} CPUs{f', {gpus} GPUs' if gpus else ''} each), objective "
                f"{settings['objective']}, ASHA over up to {max_epochs} epochs")
            scheduler = ASHAScheduler(time_attr="epoch", max_t=max(max_epochs, settings["grace_period"]),
                                      grace_period=settings["grace_period"],
                                      reduction_factor=settings["reduction_factor"])
            tuner = tune.Tuner(
                trainable, param_space={n: d.to_tune() for n, d in space.items()},
                tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler,
                                            search_alg=BasicVariantGenerator(random_state=settings["seed"],
                                                                             max_concurrent=concurrency),
                                            num_samples=sweep["num_samples"]),
                run_config=tune.RunConfig(name=sweep["name"], storage_path=storage_path, storage_filesystem=fs,
                                          verbose=1, callbacks=[ReleaseStoppedTrials(sweep["output_dir"])]))
        results = tuner.fit()
        rows = _results_table(results, sweep)
        write_tables(rows, out)
        log(f"results of {len(rows)} trial(s): {out / 'results.md'}")
        scored = [r for r in rows if r["best_objective"] is not None]
        best = None
        if scored:
            top = scored[0]
            best = export_best(sweep, cfg, top["trial"], {k: top[k] for k in sweep["space"]}, top)
            log(f"best trial {top['trial']}: {settings['objective']} {top['best_objective']:.4g} at epoch "
                f"{top['best_epoch']}; {out / 'best_config.yaml'}, model in {out / 'best_model'}")
        else:
            log("no trial reported a validation result: nothing to export")
    finally:
        if started:
            ray.shutdown()
    report = {"task": task, "objective": settings["objective"], "trials": rows, "best": best,
              "errors": sum(r["status"] == "error" for r in rows), "seconds": round(time.perf_counter() - t0, 1)}
    (out / "tune_report.json").write_text(json.dumps(report, indent=2, default=str))
    return report
