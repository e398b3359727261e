"""A training run on Ray Train: the run's output directory, the TorchTrainer (scaling, failure and
checkpoint policy), the housekeeping of its storage (orphaned checkpoint directories), and the
final model saved with its tokenizer and preprocessing.

Training data is not passed as a trainer dataset: every worker reads its own stream of the epoch
plan (``ccrk_ray.data.plan``) with Ray Data, so a restart can continue mid-epoch.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train
from ray.train.torch import TorchTrainer

from ccrk_ray.core import storage
from ccrk_ray.core.config import ConfigError
from ccrk_ray.core.log import bars_enabled, get_logger, verbosity
from ccrk_ray.data.ingest import DatasetCheck, check_dataset
from ccrk_ray.data.stats import stats_actor
from ccrk_ray.model.saved import Preprocess, load_model, save_model_dir
from ccrk_ray.train.config import LoopConfig, PretrainConfig, loop_config
from ccrk_ray.train.loop import ray_train_config, train_loop_per_worker

log = get_logger(__name__)
RESULT_FILE = "train_result.json"

SNAPSHOT = "checkpoint_manager_snapshot.json"     # Ray Train V2's record of committed checkpoints


def build_trainer(loop: LoopConfig, *, storage_path: str, name: str,
                  num_workers: tuple[int, int] = (1, 2), cpus_per_worker: float = 1.0, use_gpu: bool = False,
                  max_failures: int = 0, num_to_keep: int = 2, callbacks: list | None = None,
                  train_fn=train_loop_per_worker) -> TorchTrainer:
    """``callbacks``: Ray Train callbacks for the RunConfig (``ccrk tune`` passes its report to
    Tune and a record of the worker group's placement group); ``train_fn``: the per-worker loop
    (NRCCR's: ``ccrk_ray.train.nrccr.nrccr_loop_per_worker``)."""
    lo, hi = num_workers
    if not 1 <= lo <= hi:
        raise ValueError(f"worker range must satisfy 1 <= min <= max, got {num_workers}")
    scaling = ray.train.ScalingConfig(num_workers=lo if lo == hi else (lo, hi), use_gpu=use_gpu,
                                      resources_per_worker={"CPU": cpus_per_worker})
    fs, path = storage.resolve(storage_path) if storage.is_remote(storage_path) else (None, storage_path)
    run = ray.train.RunConfig(
        name=name, storage_path=path if fs is None else path, storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=num_to_keep),
        callbacks=list(callbacks) if callbacks else None,
        # Ray Train's own INFO lines (resources requested, worker group started, each report) only
        # with --verbose
        logging_config=ray.train.LoggingConfig(log_level="INFO" if verbosity() > 0 else "WARNING"),
    )
    return TorchTrainer(train_fn, train_loop_config=ray_train_config(loop), scaling_config=scaling,
                        run_config=run)


def run_exists(storage_path: str, name: str) -> bool:
    """Whether ``storage_path/name`` holds a Ray Train run (something to resume)."""
    fs, path = storage.resolve(storage_path)
    return fs.get_file_info(f"{path}/{name}").type == pafs.FileType.Directory


def clean_orphan_checkpoints(storage_path: str, name: str) -> list[str]:
    """Delete ``checkpoint_*`` directories of run ``name`` that Ray never committed.

    A worker killed between uploading a checkpoint and the controller committing it leaves such a
    directory behind, and ``num_to_keep`` never removes it. Call before ``fit()`` (no run active).
    Committed checkpoints are those in Ray's checkpoint-manager snapshot; without a snapshot
    nothing was ever committed. Returns the names removed."""
    fs, path = storage.resolve(storage_path)
    run = f"{path}/{name}"
    if fs.get_file_info(run).type != pafs.FileType.Directory:
        return []
    committed: set[str] = set()
    if fs.get_file_info(f"{run}/{SNAPSHOT}").type == pafs.FileType.File:
        with fs.open_input_stream(f"{run}/{SNAPSHOT}") as f:
            snapshot = json.loads(f.read())
        committed = {c["checkpoint_dir_name"] for c in snapshot.get("checkpoint_results", [])}
        latest = snapshot.get("latest_checkpoint_result") or {}
        if latest.get("checkpoint_dir_name"):
            committed.add(latest["checkpoint_dir_name"])
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(run)):
        base = info.base_name
        if info.type == pafs.FileType.Directory and base.startswith("checkpoint_") and base not in committed:
            fs.delete_dir(info.path)
            removed.append(base)
    return sorted(removed)


def check_training_data(cfg: PretrainConfig) -> DatasetCheck:
    """The training data's footers and schema (errors name the file), before anything starts."""
    return check_dataset(cfg.data.train, cfg.data.languages, cfg.data.endpoint_url)


def prepare_run(cfg: PretrainConfig, resume: bool) -> Path:
    """The output directory, refusing to start over an earlier run unless resuming it."""
    out = Path(cfg.output_dir).resolve()
    if not resume:
        if (out / RESULT_FILE).exists():
            raise ConfigError(f"{out} holds a finished run; pass --resume to continue it or pick another output_dir")
        if run_exists(cfg.run_storage, cfg.name):
            raise ConfigError(f"{cfg.run_storage}/{cfg.name} holds an interrupted run; pass --resume to continue it")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=list))
    return out


def run_training(cfg: PretrainConfig, tokenizer, caption_tokenizer, *, resume: bool = False,
                 init_from: str | None = None, best_dir: str | None = None,
                 val_languages: tuple[str, ...] | None = None, callbacks: list | None = None,
                 check: DatasetCheck | None = None) -> dict[str, Any]:
    """Check the data, build the trainer, fit, and save the final model with its tokenizer and
    preprocessing under ``output_dir/model``. Fine-tuning passes ``init_from`` (a saved model),
    ``best_dir`` (``BestStore``) and ``val_languages``; ``callbacks`` go into the trainer's
    RunConfig (Ray Train callbacks, e.g. ``ccrk tune``'s report to Tune); ``check`` the data check
    when the caller made it before starting Ray. Needs Ray initialised. Returns the final metrics."""
    out = Path(cfg.output_dir).resolve()
    check = check or check_training_data(cfg)
    stats_actor(create=True)
    removed = clean_orphan_checkpoints(cfg.run_storage, cfg.name)
    if removed:
        log.info("removed %d uncommitted checkpoint dir(s) of an interrupted run: %s", len(removed), ", ".join(removed))
    loop = loop_config(cfg, check, tokenizer, caption_tokenizer, str(out / "tensorboard"), run_id=uuid.uuid4().hex)
    loop = dataclasses.replace(loop, init_from=init_from, best_dir=best_dir, verbosity=verbosity(),
                               progress_bars=bars_enabled(),
                               val_languages=tuple(val_languages or cfg.data.languages))
    trainer = build_trainer(loop, storage_path=cfg.run_storage, name=cfg.name, num_workers=cfg.scaling.workers,
                            cpus_per_worker=cfg.scaling.cpus_per_worker, use_gpu=cfg.scaling.gpu,
                            max_failures=cfg.scaling.max_failures, num_to_keep=cfg.train.num_to_keep,
                            callbacks=callbacks)
    log.info("training %s + %s (%s, K=%d) on %d rows, %d-%d Ray Train workers, global batch %d%s",
             cfg.model.get("vision_name", "resnet10t"), cfg.model.get("text_name_or_path") or "text config",
             loop.objective, cfg.data.captions_per_image, check.rows, *cfg.scaling.workers,
             cfg.train.global_batch_size, " (resuming)" if resume else "")
    result = trainer.fit()
    with result.checkpoint.as_directory() as ckpt:
        save_model_dir(out / "model", load_model(ckpt), caption_tokenizer,
                       Preprocess.of(cfg.data))
    metrics = dict(result.metrics or {})
    (out / RESULT_FILE).write_text(json.dumps({"metrics": metrics, "checkpoint": result.checkpoint.path}, indent=2))
    log.info("training done: %s steps, final loss %.4f; model saved to %s", metrics.get("step"),
             metrics.get("loss", float("nan")), out / "model")
    return metrics
