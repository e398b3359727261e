"""The per-worker training function run by Ray Train's TorchTrainer: orchestration of named steps.

``train_loop_per_worker(ray_train_config(LoopConfig))`` (``ccrk_ray.train.config.LoopConfig``):

1. ``resume_point``: step, best and data position of the latest committed checkpoint, read
   without fetching its weights;
2. ``open_stream``: every epoch's plan is known from (seed, epoch, world size), so one Ray Data
   stream serves the whole run, started now so that the data actors' start-up overlaps step 3;
3. ``build``: model (fresh, or ``init_from`` a saved model), optimiser, schedule, and the
   checkpoint's states;
4. per epoch, ``run_epoch`` → ``step`` per optimiser step (gradient accumulation =
   global batch / (batch × workers), recomputed whenever the worker count changes, so the LR
   schedule in optimiser steps stays the same), ``checkpoint`` every ``checkpoint_every`` steps;
5. ``finish_epoch``: data counts, ``validate`` and the best-model store on rank 0, and a
   checkpoint carrying the plan position, so a restarted or resized worker group continues the
   epoch where it left off: rows trained before it are not trained again.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train.v2._internal.execution import context as _train_context
import torch
from ray.experimental.tqdm_ray import tqdm as ray_tqdm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from ccrk_ray.core.log import get_logger, setup_logging
from ccrk_ray.core.precision import autocast_dtype, uses_grad_scaler
from ccrk_ray.core.runtime import quiet_ray_loggers
from ccrk_ray.data.batching import EpochBatcher, Started
from ccrk_ray.data.ingest import stream_blocks
from ccrk_ray.data.stats import stats_actor
from ccrk_ray.data.plan import CYCLE_COLUMN, EPOCH_COLUMN, KEY_COLUMN, POS_COLUMN, Position, epoch_segments
from ccrk_ray.data.transforms import ImageTransform, load_split
from ccrk_ray.eval.report import report_from_ranks
from ccrk_ray.eval.retrieval import evaluate_in_process
from ccrk_ray.model import CCRKModel, ModelConfig
from ccrk_ray.model.saved import load_model
from ccrk_ray.objectives.collectives import all_gather_floats, all_gather_int, all_min, broadcast_int
from ccrk_ray.objectives.styles import ObjectiveModule, build_objective
from ccrk_ray.train.best import BestStore
from ccrk_ray.train.config import LoopConfig
from ccrk_ray.train.schedule import accumulation, lr_factor, total_steps, warmup_steps
from ccrk_ray.train.state import load_training_state, read_progress, save_checkpoint

log = get_logger(__name__)


@dataclass
class Resume:
    """Where a (re)started worker group begins."""
    step: int = 0
    epoch: int = 0
    position: Position | None = None
    best: dict[str, Any] | None = None
    progress: dict[str, Any] = field(default_factory=dict)     # the checkpoint's progress.json


def resume_point(world: int) -> Resume:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Resume()
    progress_ = read_progress(checkpoint.filesystem, checkpoint.path)
    position = Position.from_dict(progress_["position"]).resume(world) if progress_.get("position") else None
    return Resume(step=progress_["step"], epoch=position.epoch if position else progress_["epoch"],
                  position=position, best=progress_.get("best"), progress=progress_)


def epoch_phases(cfg: LoopConfig, start: Resume, world: int) -> list[Position]:
    """The plan of every epoch left: a resumed epoch continues its checkpointed position."""
    d, seed = cfg.data, cfg.train.seed
    return [start.position if start.position is not None and start.position.epoch == epoch else Position(
        epoch, epoch_segments(d.row_groups, epoch, seed, d.chunk_rows, d.caption_passes), world)
        for epoch in range(start.epoch, cfg.train.epochs)]


def open_stream(cfg: LoopConfig, phases: list[Position], rank: int) -> EpochBatcher:
    d = cfg.data
    if not phases:
        return EpochBatcher((), cfg.train.batch_size)
    return EpochBatcher(Started(stream_blocks(
        [(p.epoch, p.streams()[rank]) for p in phases], uri=d.uri, files=d.files, seed=cfg.train.seed,
        languages=d.languages, k=d.k, tokenizer=d.tokenizer, image_transform=d.image_transform or ImageTransform(d.image_size, train=True),
        num_actors=d.data_actors, cpus_per_actor=d.cpus_per_actor, on_bad_row=d.on_bad_row,
        endpoint_url=d.endpoint_url, image_keys=d.image_keys, caption_passes=d.caption_passes, run=d.run_id)),
        cfg.train.batch_size)


def build_model(cfg: LoopConfig) -> CCRKModel:
    """Fine-tuning starts from a saved model (a directory every worker reads); pre-training fresh."""
    if not cfg.init_from:
        return CCRKModel(ModelConfig.from_dict(cfg.model))
    model = load_model(cfg.init_from).with_image_size(cfg.data.image_size)
    temperature = cfg.model.get("temperature")
    if temperature is not None:      # fine-tuning may restart the learned temperature (a resume loads its own)
        with torch.no_grad():
            model.temp.fill_(float(temperature))
        model.config.temperature = float(temperature)
    return model


def prepare_module(module: torch.nn.Module, ignore=()) -> torch.nn.Module:
    """``ray.train.torch.prepare_model`` (DDP with several workers), DDP told to skip the
    parameters named in ``ignore``: ones the loss never reaches, which DDP would otherwise wait
    for on every step and fail."""
    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, list(ignore))
    return ray.train.torch.prepare_model(module)


class WorkerLoop:
    """One worker's run: the state the named steps share."""

    def __init__(self, cfg: LoopConfig):
        ctx = ray.train.get_context()
        self.cfg, self.t = cfg, cfg.train
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(cfg.threads_per_worker)
        torch.manual_seed(self.t.seed)
        self.batch_size, self.accum = self.batch_plan()
        self.steps_total = total_steps(cfg.data.row_groups, int(self.t.global_batch_size), self.t.epochs,
                                       self.t.max_steps, passes=cfg.data.caption_passes)
        start = resume_point(self.world)
        self.start, self.stopped = start, False
        self.step, self.best = start.step, start.best
        if self.rank == 0 and ray.train.get_checkpoint() is not None:
            rows_left = f", {sum(s.rows for s in start.position.segments)} rows left in it" if start.position else ""
            log.info("resumed at step %d, epoch %d%s", self.step, start.epoch + 1, rows_left)
        # The data stream first: its actors start while the model is built.
        self.stats = stats_actor() if self.rank == 0 else None
        # what earlier attempts of this run counted, taken before this attempt's stream reads a row
        self.seen = ray.get(self.stats.epochs.remote(cfg.data.run_id)) if self.stats is not None else None
        self.phases = epoch_phases(cfg, start, self.world)
        self.batcher = self.open_stream()
        self.build()
        self.writer = SummaryWriter(cfg.tensorboard_dir, purge_step=self.step or None) \
            if self.rank == 0 and cfg.tensorboard_dir else None
        self.val_batch = self.load_validation() if self.rank == 0 and cfg.val_uri else None
        self.open_trace()

    # -- what a model family changes (NRCCR: ccrk_ray.train.nrccr) --------------------------------
    def batch_plan(self) -> tuple[int, int]:
        """(rows per forward pass on this worker, gradient accumulation steps)."""
        return self.t.batch_size, accumulation(int(self.t.global_batch_size), self.t.batch_size, self.world)

    def open_stream(self) -> EpochBatcher:
        return open_stream(self.cfg, self.phases, self.rank)

    def load_validation(self):
        cfg = self.cfg
        return load_split(cfg.val_uri, cfg.val_languages, cfg.data.tokenizer, cfg.data.image_size,
                          endpoint_url=cfg.data.endpoint_url)

    def extra_progress(self) -> dict[str, Any]:
        """More of the run's state for the checkpoint's progress.json (plain values)."""
        return {}

    def save(self, directory: str, state: dict[str, Any]) -> None:
        save_checkpoint(directory, self.model, self.optimizer, self.scheduler, state, self.scaler)

    def build(self) -> None:
        """Model, optimiser and schedule, with the checkpoint's states when resuming."""
        self.model = build_model(self.cfg)
        if self.t.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.optimizer = torch.optim.AdamW(self.model.param_groups(self.t.lr, self.t.weight_decay),
                                           betas=tuple(self.t.betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(
            warmup_steps(self.t.warmup, self.steps_total), self.steps_total, self.t.schedule))
        self.device = ray.train.torch.get_device()
        dtype = autocast_dtype(self.t.precision)
        self.autocast = torch.autocast(self.device.type, dtype=getattr(torch, dtype or "float32"),
                                       enabled=dtype is not None)
        # float16 autocast: the loss is scaled so that small gradients do not underflow
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=uses_grad_scaler(self.t.precision))
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                load_training_state(d, self.model, self.optimizer, self.scheduler, self.scaler)
        module = ObjectiveModule(self.model, build_objective(self.cfg.objective, **self.cfg.objective_args))
        self.module = prepare_module(module, module.unused_parameter_names())
        self.forward = torch.compile(self.module) if self.t.compile else self.module

    def open_trace(self) -> None:
        """With ``trace_dir``, each worker appends the row keys of every optimiser step (audits, tests)."""
        self.trace, self.attempt = None, 0
        if self.t.trace_dir:
            self.attempt = broadcast_int(int.from_bytes(os.urandom(6), "little"))   # one id per worker-group start
            Path(self.t.trace_dir).mkdir(parents=True, exist_ok=True)
            self.trace = open(Path(self.t.trace_dir) / f"rank{self.rank}-pid{os.getpid()}.jsonl", "a")

    def run(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        for phase in self.phases:
            if self.step >= self.steps_total or self.stopped:
                break
            metrics = self.run_epoch(phase)
        if self.writer is not None:
            self.writer.close()
        if self.trace is not None:
            self.trace.close()
        return metrics

    def next_micro_batches(self, epoch: int) -> list[dict[str, torch.Tensor]] | None:
        """``accum`` batches, or None once any rank's epoch is over (all ranks stop together)."""
        micro = []
        for _ in range(self.accum):
            b = self.batcher.next(epoch)
            if not all_min(b is not None):
                return None
            micro.append(b)
        return micro

    def train_step(self, micro: list[dict[str, torch.Tensor]], tally: "EpochTally") -> int:
        """One optimiser step over the micro-batches; returns the rows consumed in the epoch so far."""
        self.optimizer.zero_grad(set_to_none=True)
        keys: list[int] = []
        for i, b in enumerate(micro):
            pos, key = b.pop(POS_COLUMN), b.pop(KEY_COLUMN)
            b.pop(EPOCH_COLUMN)
            b.pop(CYCLE_COLUMN, None)
            if self.trace is not None:         # row keys leave the device only when auditing
                keys += key.tolist()
            last = i == self.accum - 1 or not hasattr(self.module, "no_sync")
            with contextlib.nullcontext() if last else self.module.no_sync():
                with self.autocast:
                    out = self.forward(b)
                self.scaler.scale(out["loss"] / self.accum).backward()
            tally.add(out)
        if self.t.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)          # clip the true gradients
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.grad_clip)
        self.scaler.step(self.optimizer)                  # skipped when a gradient is inf/NaN (fp16)
        self.scaler.update()
        if self.scaler.is_enabled():
            tally.note("grad_scale", self.scaler.get_scale())
        self.scheduler.step()
        self.step += 1
        tally.samples += self.batch_size * self.accum * self.world
        if self.trace is not None:
            self.trace.write(json.dumps({"step": self.step, "epoch": tally.epoch, "attempt": self.attempt,
                                         "time": time.time(), "keys": keys}) + "\n")
            self.trace.flush()
        return int(pos[-1]) + 1

    def run_epoch(self, phase: Position) -> dict[str, Any]:
        epoch = phase.epoch
        self.module.train()
        tally, consumed, exhausted = EpochTally(epoch, world_share=self.world), 0, False
        bar = epoch_bar(self.steps_for(phase), f"epoch {epoch + 1}/{self.t.epochs}",
                        self.rank == 0 and self.cfg.progress_bars)
        while self.step < self.steps_total:
            t_wait = time.perf_counter()
            micro = self.next_micro_batches(epoch)
            tally.wait += time.perf_counter() - t_wait
            if micro is None:
                exhausted = True
                break
            t_step = time.perf_counter()
            consumed = self.train_step(micro, tally)
            tally.compute += time.perf_counter() - t_step
            tally.steps += 1
            bar.update(1)
            if self.step % self.t.log_every == 0 and self.rank == 0:
                self.log_step(tally, bar)
            if self.t.checkpoint_every and self.step % self.t.checkpoint_every == 0 and self.step < self.steps_total:
                self.checkpoint(phase, consumed, epoch, {"epoch": epoch, "step": self.step,
                                                         "loss": tally.last_loss(), "world_size": self.world})
        bar.close()
        if not exhausted:   # stopped by max_steps: the epoch is over anyway when no full step is left
            left = sum(s.rows for s in phase.streams()[self.rank]) - consumed
            exhausted = all_min(int(left >= self.batch_size * self.accum)) == 0
        self.epoch_complete = exhausted
        metrics = self.finish_epoch(epoch, tally)
        # An epoch cut short by max_steps keeps its position; a finished one starts the next afresh.
        self.checkpoint(None if exhausted else phase, consumed, epoch + 1 if exhausted else epoch, metrics)
        self.maybe_pause(epoch + 1)
        return metrics

    def maybe_pause(self, epochs_done: int) -> None:
        """``train.pause_after_epoch``: after that epoch's checkpoint, wait until ``pause_until``
        exists (rank 0 writes ``<pause_until>.waiting`` first), so a test or a person can act on a
        run frozen at a known point instead of racing it."""
        if self.t.pause_after_epoch != epochs_done or not self.t.pause_until:
            return
        gate = Path(self.t.pause_until)
        if not gate.exists():
            if self.rank == 0:
                Path(f"{gate}.waiting").write_text(json.dumps({"step": self.step, "epoch": epochs_done}))
                log.info("paused after epoch %d until %s exists", epochs_done, gate)
            while not gate.exists():
                time.sleep(0.05)

    def steps_for(self, phase: Position) -> int:
        rows = sum(s.rows for s in phase.streams()[self.rank])
        return max(0, min(rows // (self.batch_size * self.accum), self.steps_total - self.step))

    def log_step(self, tally: "EpochTally", bar) -> None:
        rate = tally.rate()
        lr = self.scheduler.get_last_lr()[0]
        bar.set_description(f"epoch {tally.epoch + 1}/{self.t.epochs} loss {tally.last_loss():.4f} "
                            f"lr {lr:.2e} {rate:.0f} samples/s")
        if self.writer is not None:
            for name, values in tally.terms.items():
                self.writer.add_scalar(f"train/{name}", float(torch.stack(values[-self.accum:]).mean()), self.step)
            self.writer.add_scalar("train/lr", lr, self.step)
            if hasattr(self.model, "temp"):
                self.writer.add_scalar("train/temperature", float(self.model.temp.detach()), self.step)
            self.writer.add_scalar("train/samples_per_s", rate, self.step)
        if not self.cfg.progress_bars:
            log.info("step %d/%d epoch %d loss %.4f lr %.2e %.0f samples/s", self.step, self.steps_total,
                     tally.epoch + 1, tally.last_loss(), lr, rate)

    def finish_epoch(self, epoch: int, tally: "EpochTally") -> dict[str, Any]:
        metrics = {"epoch": epoch + 1, "step": self.step, **tally.summary(), "world_size": self.world,
                   "grad_accumulation": self.accum}
        for r, (rate, data_ms, batch_ms) in enumerate(all_gather_floats(tally.timing())):
            metrics.update({f"worker/{r}/samples_per_s": rate, f"worker/{r}/data_ms_per_step": data_ms,
                            f"worker/{r}/batch_ms_per_step": batch_ms})
        if self.stats is not None:   # rows read / skipped by reason for this epoch in this run, over every data actor
            now, before = ray.get(self.stats.snapshot.remote(epoch, self.cfg.data.run_id)), self.seen.get(epoch, {})
            metrics["rows_read"] = now["rows_read"] - before.get("rows_read", 0)
            for reason, n in now["skipped"].items():
                metrics[f"skipped/{reason}"] = n - before.get("skipped", {}).get(reason, 0)
        last = epoch + 1 >= self.t.epochs or (self.t.max_steps and self.step >= self.t.max_steps)
        if self.val_batch is not None and ((epoch + 1) % self.t.eval_every == 0 or last):
            metrics.update(self.validate())
            self.keep_best(metrics, epoch)
        if self.rank == 0 and self.best is not None:
            name = self.best.get("metric", "val/r_mean").rsplit("/", 1)[-1]      # r_mean (CCRK), t2i_sumr (NRCCR)
            metrics[f"best/{name}"], metrics["best/step"] = self.best["score"], self.best["step"]
        if self.writer is not None:
            for name, value in metrics.items():
                if name not in ("epoch", "step", "world_size") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"epoch/{name}" if "/" not in name else name, value, self.step)
            self.writer.flush()
        if self.rank == 0:
            log_epoch(metrics, self.t.epochs)
        return metrics

    def validate(self) -> dict[str, float]:
        """ITC ranking of the validation split by rank 0's model, every caption counting
        (``evaluate_in_process``)."""
        langs = list(self.cfg.val_languages)
        self.model.eval()
        report = report_from_ranks(evaluate_in_process(self.model, self.val_batch))
        self.model.train()
        out = {"val/r_mean": report["mean"]["r_mean"], "val/mrv_t2i": report["mrv"]["t2i"],
               "val/mrv_i2t": report["mrv"]["i2t"]}
        for lang in langs:
            for d in ("t2i", "i2t"):
                out[f"val/{lang}/{d}_R@1"] = report["languages"][lang][d]["R@1"]
        return out

    def keep_best(self, metrics: dict[str, Any], epoch: int) -> None:
        if self.cfg.best_dir and (self.best is None or metrics["val/r_mean"] > self.best["score"]):
            mrv = [metrics[k] for k in ("val/mrv_t2i", "val/mrv_i2t") if metrics.get(k) is not None]
            self.best = BestStore(self.cfg.best_dir).save_model(
                self.model, metric="val/r_mean", score=metrics["val/r_mean"], step=self.step, epoch=epoch + 1,
                r_mean=metrics["val/r_mean"], mrv=sum(mrv) / len(mrv) if len(mrv) == 2 else None)

    def checkpoint(self, phase: Position | None, consumed: int, epoch_done: int, metrics: dict[str, Any]) -> None:
        """Every rank calls it (``ray.train.report`` is a barrier); rank 0 writes the checkpoint."""
        gathered = all_gather_int(consumed) if phase is not None else None
        if self.rank != 0:
            ray.train.report(metrics)
            return
        pos = Position(phase.epoch, phase.segments, phase.world, gathered).to_dict() if phase is not None else None
        state = {"epoch": epoch_done, "step": self.step, "position": pos, "best": self.best, **self.extra_progress()}
        with tempfile.TemporaryDirectory() as tmp:
            self.save(tmp, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_{self.step:08d}_{'e' if pos is None else 'm'}")


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass


def epoch_bar(total: int, desc: str, show: bool):
    """A progress bar of optimiser steps drawn by the driver (Ray's tqdm for workers)."""
    return ray_tqdm(total=total, desc=desc) if show else _NoBar()


@dataclass
class EpochTally:
    """Losses, samples, data wait and step (batch) time of one epoch on one worker."""
    epoch: int
    samples: int = 0
    wait: float = 0.0                 # seconds waiting for the next batch
    compute: float = 0.0              # seconds in optimiser steps (forward, backward, update)
    steps: int = 0
    world_share: int = 1              # workers the (global) sample count is shared by
    losses: list[torch.Tensor] = field(default_factory=list)
    terms: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)
    _mark: tuple[float, int] = field(default=(0.0, 0))

    def __post_init__(self):
        self._mark = (self.start, 0)

    def add(self, out: dict[str, torch.Tensor]) -> None:
        for name, value in out.items():
            self.terms.setdefault(name, []).append(value.detach().float())
        self.losses.append(out["loss"].detach().float())

    def note(self, name: str, value: float) -> None:
        """A logged value that is not a loss term (e.g. the float16 gradient scale)."""
        self.terms.setdefault(name, []).append(torch.tensor(float(value)))

    def timing(self) -> list[float]:
        """[samples/s, data ms per step, batch ms per step] of this worker in this epoch."""
        elapsed, steps = time.perf_counter() - self.start, max(1, self.steps)
        return [self.samples / self.world_share / elapsed if elapsed else 0.0, 1000 * self.wait / steps,
                1000 * self.compute / steps]


    def last_loss(self) -> float:
        return float(self.losses[-1]) if self.losses else float("nan")

    def rate(self) -> float:
        """Samples/s since the previous call."""
        now, (then, samples) = time.perf_counter(), self._mark
        self._mark = (now, self.samples)
        return (self.samples - samples) / max(now - then, 1e-9)

    def summary(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        out = {"loss": float(torch.stack(self.losses).mean()) if self.losses else float("nan"),
               "samples_per_s": self.samples / elapsed, "data_wait_fraction": self.wait / elapsed}
        for name, values in self.terms.items():
            if name != "loss":
                out[f"loss/{name}"] = float(torch.stack(values).mean())
        return out


def log_epoch(metrics: dict[str, Any], epochs: int) -> None:
    skipped = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("skipped/") and v}
    val = (f", val r_mean {metrics['val/r_mean']:.1f} MRV t2i {metrics['val/mrv_t2i']}"
           if "val/r_mean" in metrics else "")
    workers = sorted({k.split("/")[1] for k in metrics if k.startswith("worker/")}, key=int)
    per_worker = "; ".join(f"w{r} {metrics[f'worker/{r}/samples_per_s']:.0f}/s data {metrics[f'worker/{r}/data_ms_per_step']:.0f} ms "
                           f"batch {metrics[f'worker/{r}/batch_ms_per_step']:.0f} ms" for r in workers)
    log.info("epoch %d/%d step %d loss %.4f %.0f samples/s, data wait %.0f%%, rows read %s, skipped %s%s%s",
             metrics["epoch"], epochs, metrics["step"], metrics["loss"], metrics["samples_per_s"],
             100 * metrics["data_wait_fraction"], metrics.get("rows_read", "?"), skipped or 0, val,
             f" [per step: {per_worker}]" if per_worker else "")


def ray_train_config(cfg) -> dict[str, bytes]:
    """The ``train_loop_config`` of a run's trainer: its loop config, pickled. Ray Train's
    controller unpickles this dict too, and as bytes it imports nothing there; the config object
    itself would make the controller import its module's torch, timm and transformers (~5 s of
    CPU, before the controller starts any worker)."""
    return {"loop": pickle.dumps(cfg)}


def train_loop_per_worker(config: dict[str, bytes]) -> dict[str, Any]:
    """Ray Train's entry point: ``config`` is ``ray_train_config`` of the run's ``LoopConfig``."""
    return run_worker(WorkerLoop, config)


def run_worker(loop_class: type[WorkerLoop], config: dict[str, bytes]) -> dict[str, Any]:
    """A worker's logging set up as the command's, then ``loop_class(cfg).run()`` on the loop
    config of ``ray_train_config``."""
    cfg = pickle.loads(config["loop"])
    setup_logging(cfg.verbosity)
    # Ray Train logs each report at INFO under a logger named by its file, not under "ray.train"
    quiet_ray_loggers(_train_context.__file__)
    return loop_class(cfg).run()
