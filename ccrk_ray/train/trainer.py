"""Construction of the Ray Train TorchTrainer (scaling, failure and checkpoint policy), and the
housekeeping of its storage (orphaned checkpoint directories).

Training data is not passed as a trainer dataset: every worker reads its own stream of the epoch
plan (``ccrk_ray.data.plan``) with Ray Data, so a restart can continue mid-epoch.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow.fs as pafs
import ray.train
from ray.train.torch import TorchTrainer

from ccrk_ray.data import storage
from ccrk_ray.train.loop import train_loop_per_worker

SNAPSHOT = "checkpoint_manager_snapshot.json"     # Ray Train V2's record of committed checkpoints


def build_trainer(loop_config: dict[str, Any], *, storage_path: str, name: str,
                  num_workers: tuple[int, int] = (1, 2), cpus_per_worker: float = 1.0, use_gpu: bool = False,
                  max_failures: int = 0, num_to_keep: int = 2, callbacks: list | None = None) -> TorchTrainer:
    """``callbacks``: Ray Train callbacks for the RunConfig (``ccrk tune`` passes its report to
    Tune and a record of the worker group's placement group)."""
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
    )
    return TorchTrainer(train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling,
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
