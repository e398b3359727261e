"""The per-worker training function run by Ray Train's TorchTrainer.

``config`` keys: model (ModelConfig dict), objective (name), objective_args (ObjectiveConfig fields), epochs, batch_size (per worker), lr,
weight_decay, warmup_steps, rows (training rows per epoch), threads_per_worker, seed,
tensorboard_dir, log_every, shuffle_buffer_rows (0 = file-order shuffle only), precision (fp32 | bf16
autocast). Batches arrive on the worker's device (Ray moves them; GPU when the trainer has GPUs).
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any

import torch

from ccrk_ray.data.pipeline import stats_actor
from ccrk_ray.model import CCRKModel, ModelConfig
from ccrk_ray.objectives import ObjectiveModule, build_objective
from ccrk_ray.train.state import load_training_state, save_checkpoint


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier per optimiser step: linear warm-up, then cosine decay to 0 at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(config.get("threads_per_worker", 1)))
    torch.manual_seed(int(config.get("seed", 0)))

    model = CCRKModel(ModelConfig.from_dict(config["model"]))
    optimizer = torch.optim.AdamW(model.param_groups(config["lr"], config["weight_decay"]))
    batch_size, epochs = int(config["batch_size"]), int(config["epochs"])
    steps_per_epoch = int(config["rows"]) // (batch_size * world)
    if steps_per_epoch < 1:
        raise ValueError(f"{config['rows']} training rows make no full batch of {batch_size} x {world} workers")
    total_steps = steps_per_epoch * epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(min(int(config["warmup_steps"]), total_steps // 2), total_steps))

    start_epoch, step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            progress = load_training_state(d, model, optimizer, scheduler)
        start_epoch, step = progress["epoch"], progress["step"]

    module = ray.train.torch.prepare_model(
        ObjectiveModule(model, build_objective(config.get("objective", "one_to_k"), **config.get("objective_args", {}))))
    writer = None
    if rank == 0 and config.get("tensorboard_dir"):
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(config["tensorboard_dir"], purge_step=step or None)

    stats = stats_actor() if rank == 0 else None
    seen = ray.get(stats.snapshot.remote()) if stats is not None else None
    shard = ray.train.get_dataset_shard("train")
    log_every = int(config.get("log_every", 10))
    shuffle_rows = int(config.get("shuffle_buffer_rows", 0))   # local shuffle on top of the file-order shuffle
    device = ray.train.torch.get_device()
    precision = config.get("precision", "fp32")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, epochs):
        module.train()
        t_epoch, wait, samples, losses = time.perf_counter(), 0.0, 0, []
        t_wait = time.perf_counter()
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, prefetch_batches=2,
                                              local_shuffle_buffer_size=shuffle_rows or None):
            wait += time.perf_counter() - t_wait
            with autocast:
                out = module(batch)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            scheduler.step()
            step += 1
            samples += batch["pixel_values"].shape[0]
            losses.append(out["loss"].detach())
            if writer is not None and step % log_every == 0:
                for name, value in out.items():
                    writer.add_scalar(f"train/{name}", float(value), step)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
            t_wait = time.perf_counter()
        elapsed = time.perf_counter() - t_epoch
        metrics = {"epoch": epoch + 1, "step": step,
                   "loss": float(torch.stack(losses).mean()) if losses else float("nan"),
                   "samples_per_s": samples * world / elapsed, "data_wait_fraction": wait / elapsed,
                   "world_size": world}
        if stats is not None:   # rows read / skipped by reason in this epoch, over every data actor
            now = ray.get(stats.snapshot.remote())
            metrics["rows_read"] = now["rows_read"] - seen["rows_read"]
            for reason, n in now["skipped"].items():
                metrics[f"skipped/{reason}"] = n - seen["skipped"].get(reason, 0)
            seen = now
        if writer is not None:
            for name in ("samples_per_s", "data_wait_fraction", "rows_read"):
                if name in metrics:
                    writer.add_scalar(f"epoch/{name}", metrics[name], epoch + 1)
            for name in (m for m in metrics if m.startswith("skipped/")):
                writer.add_scalar(f"epoch/{name}", metrics[name], epoch + 1)
            writer.add_scalar("epoch/loss", metrics["loss"], epoch + 1)
            writer.flush()
        if rank == 0:
            skipped = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("skipped/") and v}
            print(f"[train] epoch {epoch + 1}/{epochs} step {step} loss {metrics['loss']:.4f} "
                  f"{metrics['samples_per_s']:.0f} samples/s, data wait {100 * metrics['data_wait_fraction']:.0f}%, "
                  f"rows read {metrics.get('rows_read', '?')}, skipped {skipped or 0}", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, model, optimizer, scheduler, {"epoch": epoch + 1, "step": step})
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
    if writer is not None:
        writer.close()
    return metrics
