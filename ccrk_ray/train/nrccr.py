"""NRCCR training on Ray Train, with the machinery CCRK's runs use (``ccrk_ray.train.loop``: the
epoch plan streamed by Ray Data actors, elastic workers, mid-epoch resume, checkpoints, the best
model store, TensorBoard).

The config (``ccrk nrccr train --config FILE``), every key and type checked:

    output_dir: runs/nrccr
    storage_path: null                  # Ray Train checkpoints (default output_dir/ray_results)
    name: nrccr
    data:    NRCCRDataSection           (train / val / test URIs from `ccrk convert nrccr`, tokenizer, ...)
    model:   NRCCRConfig fields         (ccrk_ray.model.nrccr)
    loss:    NRCCRLossConfig fields     (weights, margin, temperature, beta)
    train:   NRCCRTrainSection          (the reference's: Adam 1e-4, global batch 128, clip 2, ≤ 50 epochs,
                                         discriminator Adam 1e-3, ×0.99 per epoch, halved on a plateau,
                                         early stop after 10 epochs without gain on validation t2i SumR)
    scaling: ScalingSection

One optimiser step per global batch (no accumulation: the hardest negatives and BatchNorm see the
whole global batch, all-gathered); each worker takes global_batch_size / workers rows, so the
global batch must divide by every worker count of ``scaling.workers``.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.train
import ray.train.torch
import torch

from ccrk_ray.core import storage
from ccrk_ray.core.config import ConfigError, check_range
from ccrk_ray.core.log import bars_enabled, get_logger, verbosity
from ccrk_ray.data.batching import EpochBatcher, Started
from ccrk_ray.data.ingest import DatasetCheck, NRCCRStreamTransform, check_dataset, stream_blocks
from ccrk_ray.data.stats import stats_actor
from ccrk_ray.data.nrccr import FEATURES, IMAGE, TRAIN_VIEWS, check_nrccr_schema, item_column, load_nrccr_split
from ccrk_ray.data.tokenizer import CaptionTokenizer, load_tokenizer
from ccrk_ray.data.transforms import ImageTransform
from ccrk_ray.eval.nrccr import evaluate_split, language_report
from ccrk_ray.model.nrccr import NRCCRConfig, NRCCRModel
from ccrk_ray.model.saved import load_model, save_model_dir, Preprocess
from ccrk_ray.objectives.collectives import average_gradients, broadcast_int
from ccrk_ray.objectives.nrccr import NRCCRLoss, NRCCRLossConfig
from ccrk_ray.train.best import BestStore
from ccrk_ray.train.config import RunConfig, ScalingSection, TrainSection, fill_text_config
from ccrk_ray.train.loop import WorkerLoop, prepare_module, run_worker
from ccrk_ray.train.schedule import PlateauSchedule
from ccrk_ray.train.state import load_training_state, save_checkpoint
from ccrk_ray.train.trainer import RESULT_FILE, build_trainer, clean_orphan_checkpoints, prepare_run

log = get_logger(__name__)

DISCRIMINATOR_STATE = "discriminator_optimizer.pt"
VAL_METRIC = "val/t2i_sumr"


@dataclass
class NRCCRDataSection:
    train: str = ""                     # `ccrk convert nrccr` output (source, translation, back_translation views)
    val: str | None = None              # native + native_en views: fused t2i SumR selects the model
    test: str | dict[str, str] | None = None   # {language: URI} (or one URI), evaluated with the final model
    endpoint_url: str | None = None
    tokenizer: str | None = None        # HF name/path; default the model's text_name_or_path
    max_length: int = 64
    max_frames: int = 1                 # frames per item (64 for the reference's videos; 1: image features)
    image_size: int = 224               # image items (a frozen image tower)
    chunk_rows: int = 256
    caption_passes: int = 1             # passes per epoch, each showing an item's next caption
    data_actors: int = 1
    cpus_per_actor: float = 0.8
    on_bad_row: str = "skip"


@dataclass
class NRCCRTrainSection(TrainSection):
    epochs: int = 50
    global_batch_size: int | None = 128
    lr: float = 1e-4
    grad_clip: float = 2.0
    discriminator_lr: float = 1e-3
    lr_decay: float = 0.99              # per epoch
    plateau_factor: float = 0.5         # and on a validation plateau (held >= 3 epochs)
    patience: int = 10                  # early stop: more than this many epochs without gain
    val_fusion_weight: float = 0.2      # native share of the fused validation score (the reference's sim_ratio)
    fusion_weight: float = 0.5          # ... of the test score


@dataclass
class NRCCRTrainConfig(RunConfig):
    output_dir: str
    data: NRCCRDataSection
    model: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)
    train: NRCCRTrainSection = field(default_factory=NRCCRTrainSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    storage_path: str | None = None
    name: str = "nrccr"

    SECTIONS = {"data": NRCCRDataSection, "train": NRCCRTrainSection, "scaling": ScalingSection}
    MAPPINGS = ("model", "loss")

    def validate(self) -> "NRCCRTrainConfig":
        d, t = self.data, self.train
        lo, hi = self.check_shared()
        check_range("data.max_frames", d.max_frames, 1)
        check_range("train.discriminator_lr", t.discriminator_lr, 1e-10, 10.0)
        check_range("train.grad_clip", t.grad_clip, 0)
        check_range("train.lr_decay", t.lr_decay, 1e-6, 1.0)
        check_range("train.plateau_factor", t.plateau_factor, 1e-6, 1.0)
        check_range("train.patience", t.patience, 0)
        check_range("train.val_fusion_weight", t.val_fusion_weight, 0.0, 1.0)
        check_range("train.fusion_weight", t.fusion_weight, 0.0, 1.0)
        if t.global_batch_size is None:
            t.global_batch_size = t.batch_size * hi
        bad = [w for w in range(lo, hi + 1) if t.global_batch_size % w or t.global_batch_size // w < 2]
        if bad:
            raise ConfigError(f"train.global_batch_size {t.global_batch_size} must split into equal batches of at "
                              f"least 2 on every worker count {lo}..{hi} (not {bad})")
        if t.precision != "fp32":
            raise ConfigError("train.precision: NRCCR trains in fp32 (its summed triplet overflows bf16 sums)")
        try:
            model = NRCCRConfig.from_dict(self.model)
            NRCCRLossConfig(**self.loss)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model / loss: {exc}") from None
        if not (d.tokenizer or model.text_name_or_path):
            raise ConfigError("data.tokenizer is needed when model.text_name_or_path is not set")
        return self



@dataclass
class NRCCRStream:
    """What a worker needs to read its share of an NRCCR split."""
    uri: str
    files: list[str]
    row_groups: list[list[int]]
    tokenizer: CaptionTokenizer
    item: str
    max_frames: int
    feature_dim: int | None
    image_size: int
    chunk_rows: int = 256
    caption_passes: int = 1
    data_actors: int = 1
    cpus_per_actor: float = 0.8
    on_bad_row: str = "skip"
    endpoint_url: str | None = None
    run_id: str | None = None

    def image_transform(self, train: bool) -> ImageTransform | None:
        return ImageTransform(self.image_size, train=train) if self.item == IMAGE else None


@dataclass
class NRCCRLoopConfig:
    model: dict[str, Any]
    loss: dict[str, Any]
    data: NRCCRStream
    train: NRCCRTrainSection
    threads_per_worker: int = 1
    tensorboard_dir: str | None = None
    val_uri: str | None = None
    best_dir: str | None = None
    verbosity: int = 0
    progress_bars: bool = False
    init_from: str | None = None


class NRCCREncoders(torch.nn.Module):
    """What DDP wraps: a batch → NRCCR's embeddings (the discriminator is stepped on its own)."""

    def __init__(self, model: NRCCRModel):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.model(batch["visual"], batch.get("visual_mask"), *(
            (batch[f"{v}_ids"], batch[f"{v}_mask"]) for v in TRAIN_VIEWS))


class NRCCRWorkerLoop(WorkerLoop):
    """``WorkerLoop`` with NRCCR's model, two optimisers, per-epoch schedule and fused validation."""

    def batch_plan(self) -> tuple[int, int]:
        return int(self.t.global_batch_size) // self.world, 1

    def open_stream(self) -> EpochBatcher:
        d = self.cfg.data
        if not self.phases:
            return EpochBatcher((), self.batch_size)
        return EpochBatcher(Started(stream_blocks(
            [(p.epoch, p.streams()[self.rank]) for p in self.phases], uri=d.uri, files=d.files,
            seed=self.t.seed, num_actors=d.data_actors, cpus_per_actor=d.cpus_per_actor,
            endpoint_url=d.endpoint_url, run=d.run_id, transform=NRCCRStreamTransform, tokenizer=d.tokenizer,
            views=TRAIN_VIEWS, item=d.item, max_frames=d.max_frames, feature_dim=d.feature_dim,
            image_transform=d.image_transform(train=True), rng_seed=self.t.seed + self.rank,
            on_bad_row=d.on_bad_row, caption_passes=d.caption_passes)), self.batch_size)

    def load_validation(self):
        d = self.cfg.data
        return load_nrccr_split(self.cfg.val_uri, d.tokenizer, max_frames=d.max_frames, feature_dim=d.feature_dim,
                                image_transform=d.image_transform(train=False), endpoint_url=d.endpoint_url)

    def build(self) -> None:
        cfg = self.cfg
        self.model = NRCCRModel(NRCCRConfig.from_dict(cfg.model)) if not cfg.init_from else \
            load_model(cfg.init_from, family="nrccr")
        self.disc = self.model.discriminator
        self.optimizer = torch.optim.Adam(self.model.encoder_parameters(), lr=self.t.lr)
        self.disc_optimizer = torch.optim.Adam(self.disc.parameters(), lr=self.t.discriminator_lr)
        self.schedule = PlateauSchedule(self.t.lr_decay, self.t.plateau_factor, patience=self.t.patience)
        self.schedule.load(self.start.progress.get("schedule"))
        self.lr_scale = float(self.start.progress.get("lr_scale", 1.0))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: self.lr_scale)
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                load_training_state(d, self.model, self.optimizer, self.scheduler)
                self.disc_optimizer.load_state_dict(torch.load(Path(d) / DISCRIMINATOR_STATE, weights_only=True))
        self.loss = NRCCRLoss(NRCCRLossConfig(**cfg.loss))
        encoders = NRCCREncoders(self.model)
        # the discriminator has its own optimiser and step (gradients averaged by hand)
        self.module = prepare_module(encoders, [f"model.discriminator.{n}" for n, _ in self.disc.named_parameters()])
        self.forward = self.module
        self.device = ray.train.torch.get_device()
        self.encoder_params = self.model.encoder_parameters()

    def train_step(self, micro, tally) -> int:
        (b,) = micro
        pos = b.pop("_pos")
        for col in ("_key", "_epoch", "_cycle"):
            b.pop(col, None)
        emb = self.forward(b)
        terms = {}
        if self.loss.config.weights["adversarial"] > 0:
            # the discriminator first, on detached token states (its gradients averaged over the ranks) ...
            self.disc_optimizer.zero_grad(set_to_none=True)
            disc_loss = NRCCRLoss.discriminator_loss(emb, self.disc)
            disc_loss.backward()
            average_gradients(self.disc.parameters())
            self.disc_optimizer.step()
            terms["discriminator"] = disc_loss.detach()
        # ... then the encoders against the updated discriminator, as the reference
        out = self.loss(emb, self.disc)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        if self.t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.encoder_params, self.t.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        tally.add({**out, **terms})
        tally.samples += self.batch_size * self.world
        return int(pos[-1]) + 1

    def validate(self) -> dict[str, float]:
        weight = self.t.val_fusion_weight
        report = language_report(evaluate_split(self.model, self.val_batch, weight), weight)
        t2i = report["t2i"]
        return {VAL_METRIC: t2i["R@1"] + t2i["R@5"] + t2i["R@10"], "val/sumr": report["SumR"],
                "val/t2i_R@1": t2i["R@1"], "val/native_t2i_R@1": report["native"]["t2i"]["R@1"],
                "val/translated_t2i_R@1": report["translated"]["t2i"]["R@1"]}

    def keep_best(self, metrics: dict[str, Any], epoch: int) -> None:
        if not self.epoch_complete:     # cut short by max_steps: the epoch's end decides, after a resume
            return
        self.epoch_decision = self.schedule.after_epoch(metrics[VAL_METRIC])
        if self.epoch_decision[1] and self.cfg.best_dir:
            self.best = BestStore(self.cfg.best_dir).save_model(
                self.model, metric=VAL_METRIC, score=metrics[VAL_METRIC], step=self.step, epoch=epoch + 1)

    def finish_epoch(self, epoch: int, tally) -> dict[str, Any]:
        self.epoch_decision = None
        metrics = super().finish_epoch(epoch, tally)
        # rank 0 validated: every rank takes its decision (the LR factor and whether to stop)
        factor, _, stop = self.epoch_decision or (self.t.lr_decay, False, False)
        halved = broadcast_int(int(factor < self.t.lr_decay))
        self.stopped = bool(broadcast_int(int(stop)))
        if self.epoch_complete:
            self.lr_scale *= self.t.lr_decay * (self.t.plateau_factor if halved else 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = self.t.lr * self.lr_scale
        metrics["lr_next"] = self.t.lr * self.lr_scale
        if self.rank == 0 and VAL_METRIC in metrics:
            log.info("epoch %d: validation fused t2i SumR %.1f (native alone R@1 %.1f, translation alone %.1f), "
                     "next lr %.2e", epoch + 1, metrics[VAL_METRIC], metrics["val/native_t2i_R@1"],
                     metrics["val/translated_t2i_R@1"], metrics["lr_next"])
        if self.stopped and self.rank == 0:
            log.info("early stop after epoch %d: no gain on %s for more than %d epochs", epoch + 1, VAL_METRIC,
                     self.t.patience)
        return metrics

    def extra_progress(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state(), "lr_scale": self.lr_scale}

    def save(self, directory: str, state: dict[str, Any]) -> None:
        save_checkpoint(directory, self.model, self.optimizer, self.scheduler, state)
        torch.save(self.disc_optimizer.state_dict(), Path(directory) / DISCRIMINATOR_STATE)


def nrccr_loop_per_worker(config: dict[str, bytes]) -> dict[str, Any]:
    return run_worker(NRCCRWorkerLoop, config)


def check_nrccr_data(cfg: NRCCRTrainConfig) -> tuple[DatasetCheck, str, int | None]:
    """The training split's footers and schema (errors name the file and column), its item kind
    and feature width, before anything starts."""
    holder: dict[str, Any] = {}

    def check(schema, where):
        item = item_column(schema)
        holder.setdefault("item", item)
        if item != holder["item"]:
            raise ConfigError(f"{where}: holds {item} items, other files of the split hold {holder['item']}")
        check_nrccr_schema(schema, TRAIN_VIEWS, item, where)

    check_ = check_dataset(cfg.data.train, (), cfg.data.endpoint_url, check_schema=check)
    dim = None
    if holder["item"] == FEATURES:
        fs, _ = storage.resolve(cfg.data.train, cfg.data.endpoint_url)
        first = pq.ParquetFile(fs.open_input_file(check_.files[0])).read_row_group(0, columns=[FEATURES])
        dim = len(first.column(FEATURES)[0].as_py()[0])
    return check_, holder["item"], dim


def run_nrccr_training(cfg: NRCCRTrainConfig, *, resume: bool = False,
                       check: tuple[DatasetCheck, str, int | None] | None = None) -> dict[str, Any]:
    """Fit on Ray Train; save the final and best models (with tokenizer) under ``output_dir``."""
    out = prepare_run(cfg, resume)
    check_, item, dim = check or check_nrccr_data(cfg)
    stats_actor(create=True)
    removed = clean_orphan_checkpoints(cfg.run_storage, cfg.name)
    if removed:
        log.info("removed %d uncommitted checkpoint dir(s) of an interrupted run: %s", len(removed), ", ".join(removed))
    model = dict(cfg.model)
    if item == FEATURES:
        model.setdefault("visual", "frames" if cfg.data.max_frames > 1 else "vector")
        model["visual_dim"] = dim
    hf = load_tokenizer(cfg.data.tokenizer or model["text_name_or_path"])
    tokenizer = CaptionTokenizer(hf, cfg.data.max_length)
    model = fill_text_config(model, hf)
    stream = NRCCRStream(uri=cfg.data.train, files=list(check_.files), row_groups=[list(g) for g in check_.row_groups],
                         tokenizer=tokenizer, item=item, max_frames=cfg.data.max_frames, feature_dim=dim,
                         image_size=cfg.data.image_size, chunk_rows=cfg.data.chunk_rows,
                         caption_passes=cfg.data.caption_passes, data_actors=cfg.data.data_actors,
                         cpus_per_actor=cfg.data.cpus_per_actor, on_bad_row=cfg.data.on_bad_row,
                         endpoint_url=cfg.data.endpoint_url, run_id=uuid.uuid4().hex)
    train = cfg.train
    if train.pause_until:
        train = dataclasses.replace(train, pause_until=str(out / train.pause_until))
    loop = NRCCRLoopConfig(model=model, loss=dict(cfg.loss), data=stream, train=train,
                           threads_per_worker=int(cfg.scaling.threads_per_worker or max(1, cfg.scaling.cpus_per_worker)),
                           tensorboard_dir=str(out / "tensorboard"), val_uri=cfg.data.val,
                           best_dir=str(out / "best") if cfg.data.val else None, verbosity=verbosity(),
                           progress_bars=bars_enabled())
    trainer = build_trainer(loop, storage_path=cfg.run_storage, name=cfg.name, num_workers=cfg.scaling.workers,
                            cpus_per_worker=cfg.scaling.cpus_per_worker, use_gpu=cfg.scaling.gpu,
                            max_failures=cfg.scaling.max_failures, num_to_keep=cfg.train.num_to_keep,
                            train_fn=nrccr_loop_per_worker)
    log.info("training NRCCR (%s items, %s) on %d items, %d-%d Ray Train workers, global batch %d%s", item,
             model.get("text_name_or_path") or "text config", check_.rows, *cfg.scaling.workers,
             cfg.train.global_batch_size, " (resuming)" if resume else "")
    result = trainer.fit()
    preprocess = Preprocess(cfg.data.image_size if item == IMAGE else None, cfg.data.max_length)
    with result.checkpoint.as_directory() as ckpt:
        save_model_dir(out / "model", load_model(ckpt, family="nrccr"), tokenizer, preprocess)
    best = BestStore(str(out / "best")).download(str(out / "best_model")) if cfg.data.val else None
    if best is not None:          # the selected model, usable like the final one
        tokenizer.save_pretrained(out / "best_model")
        preprocess.write(out / "best_model")
    metrics = {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in (result.metrics or {}).items()}
    summary = {"metrics": metrics, "best": best, "model": str(out / "model"),
               "best_model": str(out / "best_model") if best is not None else None,
               "max_frames": cfg.data.max_frames, "item": item}
    (out / RESULT_FILE).write_text(json.dumps(summary, indent=2, default=str))
    return summary

