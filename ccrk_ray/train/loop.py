"""The per-worker training function run by Ray Train's TorchTrainer.

``config`` keys (``ccrk_ray.pretrain.loop_config`` builds them from a YAML config):

- ``model`` (ModelConfig dict), ``objective`` (name), ``objective_args`` (ObjectiveConfig fields);
- ``data``: ``uri``, ``endpoint_url``, ``files`` and ``row_groups`` (from ``check_dataset``),
  ``languages``, ``k``, ``tokenizer`` (CaptionTokenizer), ``image_size``, ``chunk_rows``,
  ``data_actors``, ``cpus_per_actor``, ``on_bad_row``, ``run_id`` (the key of this run's rows in the
  data stats actor);
- ``batch_size`` (images per worker per forward pass), ``global_batch_size`` (images per optimiser
  step over all workers: gradient accumulation = global / (batch × workers), recomputed whenever
  the worker count changes, so the LR schedule — in optimiser steps — stays the same), ``epochs``,
  ``max_steps`` (optional), ``lr``, ``weight_decay``, ``warmup`` (optimiser steps, or a fraction of
  them when < 1), ``schedule`` (cosine | linear), ``grad_clip`` (0 = off), ``precision`` (fp32 |
  bf16 autocast), ``grad_checkpointing``, ``compile``, ``seed``;
- ``checkpoint_every`` (optimiser steps; also at every epoch end), ``log_every``,
  ``tensorboard_dir``, ``val`` (optional: ``uri`` and ``languages`` of a small split evaluated on
  rank 0 after each epoch, ITC ranking), ``best_dir`` (optional: where the model with the best
  validation ``r_mean`` so far is saved, local or ``s3://``), ``init_from`` (optional: a saved model
  directory to start from, for fine-tuning; ``model.temperature``, when not null, resets its ITC
  temperature), ``trace_dir`` (optional: each worker appends the row keys of every
  optimiser step, for tests and audits).

Data: each worker reads its own streams of the epoch plans (``ccrk_ray.data.plan``) as one Ray
Data stream for the whole run (``stream_blocks``: data actors start once, before the model is
built, so their start-up overlaps it), cut into per-epoch batches by ``EpochBatcher``. Checkpoints carry the plan position, so a restarted or resized worker group continues the
epoch where the last checkpoint left it: rows trained before it are not trained again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ccrk_ray.data.batching import EpochBatcher, Started
from ccrk_ray.data.pipeline import stats_actor, stream_blocks
from ccrk_ray.data.plan import EPOCH_COLUMN, KEY_COLUMN, POS_COLUMN, Position, epoch_segments
from ccrk_ray.data.transforms import ImageTransform
from ccrk_ray.model import CCRKModel, ModelConfig
from ccrk_ray.objectives import ObjectiveModule, build_objective
from ccrk_ray.train.state import load_model, load_training_state, read_progress, save_best, save_checkpoint


def lr_factor(warmup_steps: int, total_steps: int, schedule: str = "cosine"):
    """LR multiplier per optimiser step: linear warm-up, then cosine or linear decay to 0."""
    if schedule not in ("cosine", "linear"):
        raise ValueError(f"schedule must be 'cosine' or 'linear', got {schedule!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return factor


def accumulation(global_batch: int, batch: int, world: int) -> int:
    """Micro-batches per optimiser step so that ``batch`` × ``world`` × it = ``global_batch``."""
    if global_batch % (batch * world):
        raise ValueError(f"global_batch_size {global_batch} is not a multiple of batch_size {batch} x "
                         f"{world} workers")
    return global_batch // (batch * world)


def total_steps(config: dict[str, Any]) -> int:
    per_epoch = sum(map(sum, config["data"]["row_groups"])) // int(config["global_batch_size"])
    if per_epoch < 1:
        raise ValueError(f"the training data makes no full global batch of {config['global_batch_size']}")
    steps = per_epoch * int(config["epochs"])
    return min(steps, int(config["max_steps"])) if config.get("max_steps") else steps


def _int_tensor(value: int) -> torch.Tensor | None:
    """``value`` as a 1-element tensor on the device the process group communicates on (NCCL
    needs CUDA tensors), or None when there is no group of more than one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return torch.tensor([value], dtype=torch.int64, device=device)


def _all_min(value: int) -> int:
    import torch.distributed as dist

    t = _int_tensor(value)
    if t is None:
        return value
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


def _broadcast_int(value: int) -> int:
    """Rank 0's ``value`` on every rank."""
    import torch.distributed as dist

    t = _int_tensor(value)
    if t is None:
        return value
    dist.broadcast(t, src=0)
    return int(t)


def _all_gather_int(value: int) -> list[int]:
    import torch.distributed as dist

    t = _int_tensor(value)
    if t is None:
        return [value]
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [int(x) for x in out]


def _validate(model: CCRKModel, batch, languages) -> dict[str, float]:
    from ccrk_ray.eval.report import build_report
    from ccrk_ray.eval.retrieval import evaluate_in_process

    model.eval()
    report = build_report(*evaluate_in_process(model, batch), languages)
    model.train()
    out = {"val/r_mean": report["mean"]["r_mean"], "val/mrv_t2i": report["mrv"]["t2i"],
           "val/mrv_i2t": report["mrv"]["i2t"]}
    for lang in languages:
        for d in ("t2i", "i2t"):
            out[f"val/{lang}/{d}_R@1"] = report["languages"][lang][d]["R@1"]
    return out


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(config.get("threads_per_worker", 1)))
    seed = int(config.get("seed", 0))
    torch.manual_seed(seed)
    data = config["data"]
    batch_size, epochs = int(config["batch_size"]), int(config["epochs"])
    accum = accumulation(int(config["global_batch_size"]), batch_size, world)
    steps_total = total_steps(config)
    warmup = float(config.get("warmup", 0))
    warmup_steps = min(int(warmup * steps_total) if warmup < 1 else int(warmup), steps_total // 2)

    step, position, best = 0, None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        progress = read_progress(checkpoint.filesystem, checkpoint.path)
        step, best = progress["step"], progress.get("best")
        position = Position.from_dict(progress["position"]).resume(world) if progress.get("position") else None
        start_epoch = position.epoch if position else progress["epoch"]
        if rank == 0:
            print(f"[train] resumed at step {step}, epoch {start_epoch + 1}"
                  + (f", {sum(s.rows for s in position.segments)} rows left in it" if position else ""), flush=True)
    else:
        start_epoch = 0

    # Every epoch's plan is known now (it depends on seed, epoch and world size only; a resumed
    # epoch continues its checkpointed position): one data stream for the whole run, so the data
    # actors start once, not once per epoch. It starts now (``Started``): the actors' start-up
    # (seconds of imports, the tokenizer) overlaps building the model and loading the checkpoint.
    stats = stats_actor() if rank == 0 else None
    run_id = data.get("run_id")     # this run's rows only (a sweep's trials share the job's stats actor)
    # what earlier attempts of this run counted, taken before this attempt's stream reads a row
    seen = ray.get(stats.epochs.remote(run_id)) if stats is not None else None
    phases = [position if position is not None and position.epoch == epoch else Position(
        epoch, epoch_segments(data["row_groups"], epoch, seed, int(data.get("chunk_rows", 256))), world)
        for epoch in range(start_epoch, epochs)]
    image_transform = ImageTransform(int(data["image_size"]), train=True)
    batcher = EpochBatcher(Started(stream_blocks(
        [(p.epoch, p.streams()[rank]) for p in phases], uri=data["uri"], files=data["files"], seed=seed,
        languages=data["languages"], k=int(data["k"]), tokenizer=data["tokenizer"], image_transform=image_transform,
        num_actors=int(data.get("data_actors", 1)), cpus_per_actor=float(data.get("cpus_per_actor", 0.8)),
        on_bad_row=data.get("on_bad_row", "skip"), endpoint_url=data.get("endpoint_url"),
        image_keys=bool(data.get("image_keys")), run=run_id)) if phases else (), batch_size)

    # fine-tuning starts from a saved model (a directory every worker can read); pre-training from scratch
    model = load_model(config["init_from"]) if config.get("init_from") else CCRKModel(ModelConfig.from_dict(config["model"]))
    if config.get("init_from") and config["model"].get("temperature") is not None:
        with torch.no_grad():       # fine-tuning may restart the learned temperature (a resume loads its own)
            model.temp.fill_(float(config["model"]["temperature"]))
        model.config.temperature = float(config["model"]["temperature"])
    if config.get("grad_checkpointing"):
        model.set_grad_checkpointing(True)
    optimizer = torch.optim.AdamW(model.param_groups(config["lr"], config["weight_decay"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(warmup_steps, steps_total, config.get("schedule", "cosine")))
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            load_training_state(d, model, optimizer, scheduler)

    module = ray.train.torch.prepare_model(
        ObjectiveModule(model, build_objective(config.get("objective", "one_to_k"), **config.get("objective_args", {}))))
    forward = torch.compile(module) if config.get("compile") else module
    writer = None
    if rank == 0 and config.get("tensorboard_dir"):
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(config["tensorboard_dir"], purge_step=step or None)
    val_batch = None
    if rank == 0 and config.get("val"):
        from ccrk_ray.data.transforms import load_split_batch

        val_langs = config["val"].get("languages") or data["languages"]
        val_batch = load_split_batch(config["val"]["uri"], val_langs, data["tokenizer"], data["image_size"],
                                     endpoint_url=data.get("endpoint_url"))
    trace, attempt = None, 0
    if config.get("trace_dir"):
        attempt = _broadcast_int(int.from_bytes(os.urandom(6), "little"))   # one id per worker-group start
        Path(config["trace_dir"]).mkdir(parents=True, exist_ok=True)
        trace = open(Path(config["trace_dir"]) / f"rank{rank}-pid{os.getpid()}.jsonl", "a")

    log_every, ckpt_every = int(config.get("log_every", 10)), int(config.get("checkpoint_every", 0))
    device = ray.train.torch.get_device()
    precision = config.get("precision", "fp32")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    grad_clip = float(config.get("grad_clip", 0.0))

    def save(phase: Position | None, epoch_done: int, metrics: dict[str, Any]) -> None:
        """Every rank calls it (report is a barrier); rank 0 writes the checkpoint."""
        consumed = _all_gather_int(phase_consumed) if phase is not None else None
        if rank == 0:
            pos = None
            if phase is not None:
                pos = Position(phase.epoch, phase.segments, phase.world, consumed).to_dict()
            progress = {"epoch": epoch_done, "step": step, "position": pos, "best": best}
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, model, optimizer, scheduler, progress)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"checkpoint_{step:08d}_{'e' if pos is None else 'm'}")
        else:
            ray.train.report(metrics)

    metrics: dict[str, Any] = {}
    for phase in phases:
        epoch = phase.epoch
        if step >= steps_total:
            break
        stream = phase.streams()[rank]
        module.train()
        phase_consumed, exhausted = 0, False
        t_epoch, wait, samples, losses, terms = time.perf_counter(), 0.0, 0, [], {}
        t_log, samples_log = time.perf_counter(), 0
        while step < steps_total:
            micro, keys = [], []
            t_wait = time.perf_counter()
            for _ in range(accum):
                b = batcher.next(epoch)
                if not _all_min(b is not None):     # every rank stops together: no half-gathered step
                    micro = None
                    break
                micro.append(b)
            wait += time.perf_counter() - t_wait
            if micro is None:
                exhausted = True
                break
            optimizer.zero_grad(set_to_none=True)
            for i, b in enumerate(micro):
                pos = b.pop(POS_COLUMN)
                key = b.pop(KEY_COLUMN)
                b.pop(EPOCH_COLUMN)
                if trace is not None:         # row keys leave the device only when auditing
                    keys += key.tolist()
                sync = contextlib.nullcontext() if i == accum - 1 or not hasattr(module, "no_sync") else module.no_sync()
                with sync:
                    with autocast:
                        out = forward(b)
                    (out["loss"] / accum).backward()
                for name, value in out.items():
                    terms.setdefault(name, []).append(value.detach().float())
                losses.append(out["loss"].detach().float())
            phase_consumed = int(pos[-1]) + 1
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            samples += batch_size * accum * world
            samples_log += batch_size * accum * world
            if trace is not None:
                trace.write(json.dumps({"step": step, "epoch": epoch, "attempt": attempt, "time": time.time(),
                                        "keys": keys}) + "\n")
                trace.flush()
            if step % log_every == 0 and rank == 0:
                rate = samples_log / (time.perf_counter() - t_log)
                t_log, samples_log = time.perf_counter(), 0
                if writer is not None:
                    for name, values in terms.items():
                        writer.add_scalar(f"train/{name}", float(torch.stack(values[-accum:]).mean()), step)
                    writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                    writer.add_scalar("train/temperature", float(model.temp.detach()), step)
                    writer.add_scalar("train/samples_per_s", rate, step)
                print(f"[train] step {step}/{steps_total} epoch {epoch + 1} loss {float(losses[-1]):.4f} "
                      f"lr {scheduler.get_last_lr()[0]:.2e} {rate:.0f} samples/s", flush=True)
            if ckpt_every and step % ckpt_every == 0 and step < steps_total:
                save(phase, epoch, {"epoch": epoch, "step": step, "loss": float(losses[-1]), "world_size": world})
        if not exhausted:   # stopped by max_steps: the epoch is over anyway when no full step is left
            left = sum(s.rows for s in stream) - phase_consumed
            exhausted = _all_min(int(left >= batch_size * accum)) == 0
        elapsed = time.perf_counter() - t_epoch
        metrics = {"epoch": epoch + 1, "step": step,
                   "loss": float(torch.stack(losses).mean()) if losses else float("nan"),
                   "samples_per_s": samples / elapsed, "data_wait_fraction": wait / elapsed, "world_size": world,
                   "grad_accumulation": accum}
        for name, values in terms.items():
            if name != "loss":
                metrics[f"loss/{name}"] = float(torch.stack(values).mean())
        if stats is not None:   # rows read / skipped by reason for this epoch in this run, over every data actor
            now, before = ray.get(stats.snapshot.remote(epoch, run_id)), seen.get(epoch, {})
            metrics["rows_read"] = now["rows_read"] - before.get("rows_read", 0)
            for reason, n in now["skipped"].items():
                metrics[f"skipped/{reason}"] = n - before.get("skipped", {}).get(reason, 0)
        if val_batch is not None:
            metrics.update(_validate(model, val_batch, val_langs))
            if config.get("best_dir") and (best is None or metrics["val/r_mean"] > best["r_mean"]):
                best = {"r_mean": metrics["val/r_mean"], "step": step,
                        "dir": save_best(model, config["best_dir"], step, metrics["val/r_mean"])}
        if rank == 0 and best is not None:
            metrics["best/r_mean"], metrics["best/step"] = best["r_mean"], best["step"]
        if writer is not None:
            for name, value in metrics.items():
                if name not in ("epoch", "step", "world_size") and isinstance(value, (int, float)):
                    writer.add_scalar(f"epoch/{name}" if "/" not in name else name, value, step)
            writer.flush()
        if rank == 0:
            skipped = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("skipped/") and v}
            val = (f", val r_mean {metrics['val/r_mean']:.1f} MRV t2i {metrics['val/mrv_t2i']}"
                   if val_batch is not None else "")
            print(f"[train] epoch {epoch + 1}/{epochs} step {step} loss {metrics['loss']:.4f} "
                  f"{metrics['samples_per_s']:.0f} samples/s, data wait {100 * metrics['data_wait_fraction']:.0f}%, "
                  f"rows read {metrics.get('rows_read', '?')}, skipped {skipped or 0}{val}", flush=True)
        # An epoch cut short by max_steps keeps its position; a finished one starts the next afresh.
        save(None if exhausted else phase, epoch + 1 if exhausted else epoch, metrics)
    if writer is not None:
        writer.close()
    if trace is not None:
        trace.close()
    return metrics
