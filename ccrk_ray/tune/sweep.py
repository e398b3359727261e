"""``ccrk tune --task TASK --config FILE --start-from MODEL --num-samples N [--max-concurrent M] [--resume]``:
a Ray Tune sweep of the fine-tuning hyperparameters of ``ccrk finetune``.

FILE is a ``ccrk finetune`` config (``ccrk_ray.tasks.finetune``) plus a ``tune:`` section::

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
with ``--start-from MODEL_SPEC.yaml`` (``ccrk_ray.tasks.finetune.StartingPoint``: pre-trained timm/HF
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
  ``preprocess.json`` (``ccrk evaluate --model`` takes it);
- ``tune_report.json``; the Tune experiment is in ``ray_results/<name>`` (or ``storage_path``).

``--resume`` restores an interrupted sweep from its experiment state: finished trials are kept, the
unfinished ones continue (each from its Ray Train run's latest checkpoint). A multi-node sweep
needs ``output_dir`` on a filesystem every node sees.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import csv
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from ccrk_ray.core import storage
from ccrk_ray.core.config import ConfigError, deep_merge, read_config
from ccrk_ray.core.log import get_logger, verbosity
from ccrk_ray.core.runtime import local_cpus, ray_session
from ccrk_ray.data.ingest import check_dataset
from ccrk_ray.data.stats import stats_actor
from ccrk_ray.data.tokenizer import CaptionTokenizer, load_tokenizer
from ccrk_ray.model.saved import Preprocess
from ccrk_ray.tasks.finetune import StartingPoint
from ccrk_ray.train.best import BestStore
from ccrk_ray.tune.callbacks import METRIC
from ccrk_ray.tune.space import (TRIAL_NAME, Dist, TuneSection, absolute_paths, default_space,
                                 load_finetune, overrides, parse_dist, parse_space, trial_config, write_yaml)
from ccrk_ray.tune.trial import ReleaseStoppedTrials, run_trial

log = get_logger(__name__)
SWEEP_FILE = "sweep.json"
DRIVER_CPUS = 0.05               # a trial's own process (it only drives its TorchTrainer); Tune needs > 0


def trial_resources(cfg) -> tuple[float, int]:
    """(CPUs, GPUs) one trial holds at most: its process, its Train workers and their data actors."""
    return DRIVER_CPUS + cfg.cpus_held(), cfg.scaling.workers[1] if cfg.scaling.gpu else 0


def default_concurrency(cluster: dict[str, float], cpus: float, gpus: int, trials: int) -> int:
    fits = [math.floor(cluster.get("CPU", 0) / cpus + 1e-9) if cpus else trials]
    if gpus:
        fits.append(math.floor(cluster.get("GPU", 0) / gpus + 1e-9))
    return max(1, min(trials, *fits))


def prepare_sweep(task: str, config_path: str | Path, checkpoint: str | Path, num_samples: int,
                  sets: Sequence[str] | None = None) -> tuple[dict[str, Any], Any]:
    """Everything checked before Ray starts: (the sweep's settings, the base FinetuneConfig)."""
    if num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {num_samples}")
    user = read_config(config_path, sets)
    settings = TuneSection.from_dict(user.pop("tune", None))
    start = StartingPoint.of(checkpoint)
    base = absolute_paths(user)
    cfg, _ = load_finetune(task, base, str(start.source))
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
                          "start from pre-trained encoders (--start-from MODEL_SPEC.yaml)")
    workers_max = cfg.scaling.workers[1]
    for name, dist in space.items():      # every bound and choice must make a valid config
        for value in dist.corners():
            try:
                load_finetune(task, deep_merge(base, overrides({name: value}, workers_max)), str(start.source))
            except (ConfigError, TypeError, ValueError) as exc:
                raise ConfigError(f"tune.space.{name}: value {value!r} is not valid: {exc}") from None
    check = check_dataset(cfg.data.train, cfg.data.languages, cfg.data.endpoint_url)
    largest = max(space["batch_size"].corners()) * workers_max if "batch_size" in space else cfg.train.global_batch_size
    if check.rows < largest:
        raise ConfigError(f"data.train has {check.rows} rows: not one full global batch of {largest} images")
    sweep = {"task": task, "checkpoint": str(start.source), "output_dir": str(Path(cfg.output_dir).resolve()),
             "storage_path": cfg.storage_path, "name": settings.name, "base": base,
             "space": {k: d.to_yaml() for k, d in space.items()}, "tune": asdict(settings) | {"space": None},
             "workers_max": workers_max, "epochs": cfg.train.epochs, "num_samples": num_samples,
             "verbosity": verbosity()}
    return json.loads(json.dumps(sweep)), cfg


def _space(sweep: dict[str, Any]) -> dict[str, Dist]:
    return {name: parse_dist(name, spec) for name, spec in sweep["space"].items()}


def _experiment(sweep: dict[str, Any]) -> tuple[str, Any, str]:
    """(storage path for Tune, its filesystem or None, the experiment's path)."""
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
    out = Path(sweep["output_dir"])
    d = deep_merge(sweep["base"], overrides(params, sweep["workers_max"]))
    d["output_dir"] = str(out / "best_finetune")
    header = (f"# ccrk tune: best of the sweep in {out} (trial {trial}, {sweep['tune']['objective']} "
              f"{row['best_objective']:.4g} at epoch {row['best_epoch']})\n"
              f"# ccrk finetune --task {sweep['task']} --config THIS_FILE --start-from {sweep['checkpoint']}\n")
    write_yaml(out / "best_config.yaml", d, header)
    tc = trial_config(sweep, params, trial)
    run_storage = tc.get("storage_path") or str(Path(tc["output_dir"]) / "ray_results")
    best_dir = f"{run_storage.rstrip('/')}/{TRIAL_NAME}/best"
    dest = out / "best_model"
    shutil.rmtree(dest, ignore_errors=True)
    best = BestStore(best_dir).download(str(dest))
    if best is None:
        raise RuntimeError(f"trial {trial} has no best model in {best_dir}")
    CaptionTokenizer(load_tokenizer(cfg.data.tokenizer), cfg.data.max_length).save_pretrained(dest)
    Preprocess.of(cfg.data).write(dest)
    return {"trial": trial, **best}


def run_tune(task: str, config_path: str | Path, checkpoint: str | Path, num_samples: int,
             max_concurrent: int | None = None, resume: bool = False, sets: Sequence[str] | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1, got {max_concurrent}")
    sweep, cfg = prepare_sweep(task, config_path, checkpoint, num_samples, sets)
    out = Path(sweep["output_dir"])
    storage_path, fs, exp_path = _experiment(sweep)
    restoring = tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
    if restoring and not resume:
        raise ConfigError(f"{exp_path} holds a sweep; pass --resume to finish it or pick another output_dir/tune.name")
    if restoring:
        saved = json.loads((out / SWEEP_FILE).read_text())
        if saved != sweep:
            log.warning("--resume: the sweep continues with the settings it started with (%s); changes to the "
                        "config or --num-samples are ignored", out / SWEEP_FILE)
        sweep = saved
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / SWEEP_FILE).write_text(json.dumps(sweep, indent=2))
    space = _space(sweep)
    settings = sweep["tune"]
    cpus, gpus = trial_resources(cfg)
    grid = math.prod(len(d.args) for d in space.values() if d.kind == "grid")
    trials = sweep["num_samples"] * grid
    with ray_session(local_cpus(cpus * (max_concurrent or 1))):
        stats_actor(create=True)       # the job's data stats actor lives as long as the sweep's driver
        concurrency = max_concurrent or default_concurrency(ray.cluster_resources(), cpus, gpus, trials)
        max_epochs = max(int(v) for v in space["epochs"].corners()) if "epochs" in space else cfg.train.epochs
        trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), {"CPU": DRIVER_CPUS})
        if restoring:
            log.info("resuming the sweep in %s", exp_path)
            tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=fs)
        else:
            log.info(f"sweep of {trials} trial(s) over {', '.join(n for n, d in space.items() if d.kind != 'fixed')}, "
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
                                          verbose=1 if verbosity() > 0 else 0, callbacks=[ReleaseStoppedTrials(sweep["output_dir"])]))
        results = tuner.fit()
        rows = _results_table(results, sweep)
        write_tables(rows, out)
        log.info("results of %d trial(s): %s", len(rows), out / "results.md")
        scored = [r for r in rows if r["best_objective"] is not None]
        best = None
        if scored:
            top = scored[0]
            best = export_best(sweep, cfg, top["trial"], {k: top[k] for k in sweep["space"]}, top)
            log.info(f"best trial {top['trial']}: {settings['objective']} {top['best_objective']:.4g} at epoch "
                     f"{top['best_epoch']}; {out / 'best_config.yaml'}, model in {out / 'best_model'}")
        else:
            log.warning("no trial reported a validation result: nothing to export")
    report = {"task": task, "objective": settings["objective"], "trials": rows, "best": best,
              "errors": sum(r["status"] == "error" for r in rows), "seconds": round(time.perf_counter() - t0, 1)}
    (out / "tune_report.json").write_text(json.dumps(report, indent=2, default=str))
    return report
