"""The training config (``ccrk pretrain --config FILE``; fine-tuning adds a ``task`` section) and
the typed config of the per-worker loop built from it.

The config has five sections; every key and every value's type is checked (an unknown key or a
wrong type is one error naming it):

    output_dir: runs/ccrk              # final model, tokenizer, train_result.json (local)
    storage_path: null                 # Ray Train checkpoints: local or s3://…; default output_dir/ray_results
    name: pretrain                     # the Ray Train run name under storage_path
    data:      DataSection fields      (train/val URIs, languages, K, image size, tokenizer, ...)
    model:     ModelConfig fields      (ccrk_ray.model.ModelConfig: timm/HF names, fusion layers, ...)
    objective: name + ObjectiveConfig fields (ccrk_ray.objectives.styles)
    train:     TrainSection fields     (batch sizes, schedule, precision, checkpoints, ...)
    scaling:   ScalingSection fields   (worker range, CPUs/GPU per worker, max_failures)

``${NAME}`` in any string value is replaced by the environment variable NAME (an unset one is an
error), so one config file serves every cluster: ``train: ${CCRK_DATA_URI}/pretrain``.

Running the same command again with ``--resume`` continues the run from its latest committed
checkpoint (same storage path and name), mid-epoch included. ``ccrk_ray/configs/`` ships examples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ccrk_ray.core.config import ConfigError, build, check_range, check_types, read_config
from ccrk_ray.core.languages import CCRK_LANGUAGES, validate_languages
from ccrk_ray.core.precision import PRECISIONS
from ccrk_ray.core.storage import configure_s3
from ccrk_ray.data.tokenizer import CaptionTokenizer
from ccrk_ray.data.transforms import ImageTransform
from ccrk_ray.model import ModelConfig
from ccrk_ray.model.ccrk import layer_split
from ccrk_ray.model.encoders import check_vision_model
from ccrk_ray.objectives.styles import STYLES, ObjectiveConfig
from ccrk_ray.train.schedule import accumulation

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class DataSection:
    train: str = ""                          # parquet file or prefix: local, s3://, any pyarrow URI
    val: str | None = None                   # small split evaluated after every epoch (rank 0)
    test: str | dict[str, str] | None = None # evaluated with the final model: a URI, or {language: URI}
    translate_test: str | dict[str, str] | None = None   # as test, captions machine-translated to English (IGLUE test_gmt)
    endpoint_url: str | None = None          # S3-compatible endpoint (else AWS_ENDPOINT_URL)
    languages: tuple[str, ...] = CCRK_LANGUAGES
    captions_per_image: int | None = None    # K; default every language
    image_size: int = 224
    crop_scale: tuple[float, float] = (0.8, 1.0)   # training crops: random-resized-crop area range,
    interpolation: str = "bilinear"          # its resampling (bilinear | bicubic),
    hflip: float = 0.0                       # horizontal-flip probability (captions may say left/right),
    randaugment: tuple[int, int] | None = None   # [ops, magnitude]: torchvision RandAugment; null: off
    max_length: int = 40
    tokenizer: str | None = None             # HF name/path; default the model's text_name_or_path
    pre_caption: int | None = None           # normalise captions as CCLM/X-VLM (lowercase, punctuation
                                             # to spaces), keeping this many words; null: as written
    on_bad_row: str = "skip"                 # skip (counted) | raise
    chunk_rows: int = 256                    # shuffle granularity (row-group slices)
    caption_passes: int = 1                  # passes over the images per epoch, each row showing its next
                                             # caption: 5 = COCO/Flickr30K's caption-level epochs (each of 5
                                             # captions one example, as the reference's fine-tuning)
    image_keys: bool = False                 # batches carry image ids: captions of one image are all positives
    data_actors: int = 1                     # decode/tokenise actors per training worker
    cpus_per_actor: float = 0.8
    s3_retries: int | None = None            # S3 request retries / timeouts in seconds (default: the
    s3_connect_timeout: float | None = None  # command line's --s3-*, else $CCRK_S3_*, else 10, 10 s,
    s3_request_timeout: float | None = None  # 120 s: ccrk_ray.core.storage.S3_SETTINGS)


@dataclass
class TrainSection:
    epochs: int = 1
    eval_every: int = 1                      # validate (and keep the best model) every N epochs and after the last
    max_steps: int | None = None             # stop after this many optimiser steps
    batch_size: int = 64                     # images per worker per forward pass
    global_batch_size: int | None = None     # images per optimiser step; default batch_size x max workers
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)   # AdamW's
    warmup: float = 0.1                      # optimiser steps, or a fraction of them when < 1
    schedule: str = "cosine"                 # cosine | linear decay after warm-up
    grad_clip: float = 0.0
    precision: str = "fp32"                  # fp32 | amp_bf16 (alias bf16) | amp / amp_fp16 (alias fp16:
                                             # float16 autocast with a gradient scaler): core/precision.py
    grad_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    checkpoint_every: int = 0                # optimiser steps between checkpoints (0: epoch ends only)
    num_to_keep: int = 2
    log_every: int = 10
    trace_dir: str | None = None             # write each step's row keys (audits, tests)
    pause_after_epoch: int | None = None     # after this epoch's checkpoint, workers wait until
    pause_until: str | None = None           # this file exists (relative: to output_dir): a run
                                             # frozen at a known point (tests, inspecting a run)


@dataclass
class ScalingSection:
    workers: tuple[int, int] = (1, 2)
    cpus_per_worker: float = 1.0
    gpu: bool = False
    max_failures: int = 3
    threads_per_worker: int | None = None    # torch threads; default cpus_per_worker


class RunConfig:
    """What every training config (CCRK's ``PretrainConfig``, NRCCR's) shares: typed sections
    (``SECTIONS``: key → dataclass), free mappings checked later (``MAPPINGS``), reading from YAML
    with ``--set`` items, where Ray Train keeps the run, the CPUs it holds."""

    SECTIONS: dict[str, type] = {}
    MAPPINGS: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config"):
        d = dict(d)
        if "output_dir" not in d or "data" not in d:
            raise ConfigError(f"{where}: needs output_dir and data.train")
        for key, section in cls.SECTIONS.items():
            d[key] = build(section, d.get(key), f"{where}: {key}")
        for key in cls.MAPPINGS:
            if not isinstance(d.get(key, {}), dict):
                raise ConfigError(f"{where}: {key} must be a mapping, got {d[key]!r}")
        return build(cls, d, where).validate()

    @classmethod
    def from_yaml(cls, path: str | Path, sets: Sequence[str] | None = None):
        """The config file, with ``--set section.key=value`` items on top."""
        return cls.from_dict(read_config(path, sets), where=str(path))

    def check_shared(self) -> tuple[int, int]:
        """The checks every run's data, train and scaling sections share; (min, max) workers."""
        d, t, s = self.data, self.train, self.scaling
        if not d.train:
            raise ConfigError("data.train: the training data URI is required")
        check_range("data.max_length", d.max_length, 8, 512)
        check_range("data.chunk_rows", d.chunk_rows, 1)
        check_range("data.caption_passes", d.caption_passes, 1)
        check_range("data.data_actors", d.data_actors, 1)
        if d.on_bad_row not in ("skip", "raise"):
            raise ConfigError(f"data.on_bad_row must be skip or raise, got {d.on_bad_row!r}")
        lo, hi = s.workers = tuple(s.workers)
        if not 1 <= lo <= hi:
            raise ConfigError(f"scaling.workers must be [MIN, MAX] with 1 <= MIN <= MAX, got {list(s.workers)}")
        check_range("train.epochs", t.epochs, 1)
        check_range("train.eval_every", t.eval_every, 1)
        check_range("train.lr", t.lr, 1e-10, 10.0)
        check_range("train.log_every", t.log_every, 1)
        check_range("train.checkpoint_every", t.checkpoint_every, 0)
        check_range("train.num_to_keep", t.num_to_keep, 1)
        if t.max_steps is not None:
            check_range("train.max_steps", t.max_steps, 1)
        if (t.pause_after_epoch is None) != (t.pause_until is None):
            raise ConfigError("train.pause_after_epoch and train.pause_until go together")
        return lo, hi

    def cpus_held(self) -> float:
        """CPUs the run holds at once at its largest: each worker and its data actors."""
        return self.scaling.workers[1] * (self.scaling.cpus_per_worker + self.data.data_actors * self.data.cpus_per_actor)

    @property
    def run_storage(self) -> str:
        return self.storage_path or str(Path(self.output_dir).resolve() / "ray_results")


@dataclass
class PretrainConfig(RunConfig):
    output_dir: str
    data: DataSection
    model: dict[str, Any] = field(default_factory=dict)         # ModelConfig fields
    objective: dict[str, Any] = field(default_factory=lambda: {"name": "one_to_k"})
    train: TrainSection = field(default_factory=TrainSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    storage_path: str | None = None
    name: str = "pretrain"

    SECTIONS = {"data": DataSection, "train": TrainSection, "scaling": ScalingSection}
    MAPPINGS = ("model", "objective")

    def validate(self) -> "PretrainConfig":
        d, t, s = self.data, self.train, self.scaling
        d.languages = validate_languages(d.languages, known=None)
        if d.captions_per_image is None:
            d.captions_per_image = len(d.languages)
        check_range("data.captions_per_image", d.captions_per_image, 1, len(d.languages))
        check_range("data.image_size", d.image_size, 32, 2048)
        lo, hi = self.check_shared()
        check_range("train.batch_size", t.batch_size, 2)
        check_range("train.warmup", t.warmup, 0)
        if t.schedule not in ("cosine", "linear"):
            raise ConfigError(f"train.schedule must be cosine or linear, got {t.schedule!r}")
        if t.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
        check_range("train.grad_clip", t.grad_clip, 0)
        check_range("train.weight_decay", t.weight_decay, 0)
        t.betas = tuple(t.betas)
        if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {list(t.betas)}")
        if d.pre_caption is not None:
            check_range("data.pre_caption", d.pre_caption, 1)
        try:
            train_transform(d)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"data: {exc} (crop_scale, interpolation, hflip, randaugment)") from None
        check_range("scaling.cpus_per_worker", s.cpus_per_worker, 0.01)
        check_range("scaling.max_failures", s.max_failures, -1)
        check_range("data.cpus_per_actor", d.cpus_per_actor, 0.01)
        try:
            configure_s3(d.s3_retries, d.s3_connect_timeout, d.s3_request_timeout, override=False)
        except ConfigError as exc:
            raise ConfigError(f"data.s3_*: {exc}") from None
        if t.global_batch_size is None:
            t.global_batch_size = t.batch_size * hi
        for world in range(lo, hi + 1):      # every worker count the run may get
            try:
                accumulation(t.global_batch_size, t.batch_size, world)
            except ValueError as exc:
                raise ConfigError(f"train.global_batch_size: {exc} (the run may have {lo}..{hi} workers)") from None
        model = build(ModelConfig, self.model, "model")
        objective = dict(self.objective)
        name = objective.pop("name", "one_to_k")
        if name not in STYLES:
            raise ConfigError(f"objective.name {name!r} is not one of {', '.join(STYLES)}")
        check_types(ObjectiveConfig, objective, "objective")
        check_vision_model(model.vision_name)
        layers = model.text_config.get("num_hidden_layers") if not model.text_name_or_path else None
        if layers is not None:      # a named text model's depth is known once it loads (in the workers)
            try:
                layer_split(model, int(layers))
            except ValueError as exc:
                raise ConfigError(f"model: {exc}") from None
        return self

def fill_text_config(model: dict[str, Any], tokenizer) -> dict[str, Any]:
    """A text encoder built from a config takes its vocabulary size and special ids from the
    tokenizer unless the config sets them."""
    model = dict(model)
    if model.get("text_config") and not model.get("text_name_or_path"):
        tc = dict(model["text_config"])
        tc.setdefault("vocab_size", len(tokenizer))
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            tc.setdefault(key, getattr(tokenizer, key))
        model["text_config"] = tc
    return model


def train_transform(d: DataSection) -> ImageTransform:
    """The training images' transform of a data section (ValueError: a bad value)."""
    return ImageTransform(d.image_size, train=True, scale=tuple(d.crop_scale), hflip_prob=d.hflip,
                          interpolation=d.interpolation,
                          randaugment=tuple(d.randaugment) if d.randaugment is not None else None)


def objective_args(objective: dict[str, Any], tokenizer, languages) -> tuple[str, dict[str, Any]]:
    """(objective name, ObjectiveConfig kwargs) with the tokenizer's ids filled in."""
    args = dict(objective)
    name = args.pop("name", "one_to_k")
    args.setdefault("languages", list(languages))
    args.setdefault("mask_token_id", tokenizer.mask_token_id)
    args.setdefault("vocab_size", len(tokenizer))
    args.setdefault("special_ids", sorted(set(tokenizer.all_special_ids)))
    return name, args


@dataclass
class StreamConfig:
    """What a worker needs to read its share of the training data (``ccrk_ray.data.ingest``)."""
    uri: str
    files: list[str]                         # from ``check_dataset``: the files and their row groups
    row_groups: list[list[int]]
    languages: tuple[str, ...]
    k: int
    tokenizer: CaptionTokenizer
    image_size: int
    image_transform: ImageTransform | None = None     # training images (None: this size, defaults)
    chunk_rows: int = 256
    caption_passes: int = 1
    data_actors: int = 1
    cpus_per_actor: float = 0.8
    on_bad_row: str = "skip"
    image_keys: bool = False
    endpoint_url: str | None = None
    run_id: str | None = None                # the key of this run's rows in the data stats actor


@dataclass
class LoopConfig:
    """Everything ``ccrk_ray.train.loop.train_loop_per_worker`` needs, typed.

    ``init_from``: a saved model every worker can read (fine-tuning; ``model["temperature"]``, when
    not null, restarts its ITC temperature); otherwise the model is built from ``model``.
    ``val_uri``/``val_languages``: a small split ranked by rank 0 after every epoch; with
    ``best_dir`` the model of the best validation ``r_mean`` is kept there (``BestStore``)."""
    model: dict[str, Any]
    objective: str
    objective_args: dict[str, Any]
    data: StreamConfig
    train: "TrainSection"
    threads_per_worker: int = 1
    tensorboard_dir: str | None = None
    val_uri: str | None = None
    val_languages: tuple[str, ...] = ()
    best_dir: str | None = None
    init_from: str | None = None
    verbosity: int = 0                       # the command's --verbose/--quiet, for the workers' log lines
    progress_bars: bool = False              # the driver is at a terminal: bars (else a log line every log_every)


def loop_config(cfg: PretrainConfig, check, tokenizer, caption_tokenizer: CaptionTokenizer,
                tensorboard_dir: str | None, run_id: str | None = None) -> LoopConfig:
    """The loop config of a training config, with the data check's file list and the tokenizer."""
    d, s = cfg.data, cfg.scaling
    name, args = objective_args(cfg.objective, tokenizer, d.languages)
    stream = StreamConfig(uri=d.train, files=list(check.files), row_groups=[list(g) for g in check.row_groups],
                          languages=tuple(d.languages), k=int(d.captions_per_image), tokenizer=caption_tokenizer,
                          image_size=d.image_size, image_transform=train_transform(d), chunk_rows=d.chunk_rows,
                          caption_passes=d.caption_passes, data_actors=d.data_actors,
                          cpus_per_actor=d.cpus_per_actor, on_bad_row=d.on_bad_row, image_keys=d.image_keys,
                          endpoint_url=d.endpoint_url, run_id=run_id)
    train = cfg.train
    if train.pause_until:
        train = dataclasses.replace(train, pause_until=str(Path(cfg.output_dir).resolve() / train.pause_until))
    return LoopConfig(model=fill_text_config(cfg.model, tokenizer), objective=name, objective_args=args, data=stream,
                      train=train, threads_per_worker=int(s.threads_per_worker or max(1, s.cpus_per_worker)),
                      tensorboard_dir=tensorboard_dir, val_uri=d.val, val_languages=tuple(d.languages))
