"""Construction of the Ray Train TorchTrainer (scaling, failure and checkpoint policy)."""

from __future__ import annotations

from typing import Any

import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from ccrk_ray.train.loop import train_loop_per_worker


def build_trainer(train_ds: ray.data.Dataset, loop_config: dict[str, Any], *, storage_path: str, name: str,
                  num_workers: tuple[int, int] = (1, 2), cpus_per_worker: float = 1.0, use_gpu: bool = False,
                  max_failures: int = 0, num_to_keep: int = 2) -> TorchTrainer:
    lo, hi = num_workers
    if not 1 <= lo <= hi:
        raise ValueError(f"worker range must satisfy 1 <= min <= max, got {num_workers}")
    scaling = ray.train.ScalingConfig(num_workers=lo if lo == hi else (lo, hi), use_gpu=use_gpu,
                                      resources_per_worker={"CPU": cpus_per_worker})
    run = ray.train.RunConfig(
        name=name, storage_path=storage_path,
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=num_to_keep),
    )
    return TorchTrainer(train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling,
                        run_config=run, datasets={"train": train_ds},
                        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]))
