"""``ccrk pretrain --config FILE [--resume]``: 1-to-K pre-training on Ray Train from a YAML config.

The config has five sections; every key is checked (an unknown one is an error naming it):

    output_dir: runs/ccrk              # final model, tokenizer, train_result.json (local)
    storage_path: null                 # Ray Train checkpoints: local or s3://…; default output_dir/ray_results
    name: pretrain                     # the Ray Train run name under storage_path
    data:      DataSection fields      (train/val URIs, languages, K, image size, tokenizer, ...)
    model:     ModelConfig fields      (ccrk_ray.model.ModelConfig: timm/HF names, fusion layers, ...)
    objective: name + ObjectiveConfig fields (ccrk_ray.objectives)
    train:     TrainSection fields     (batch sizes, schedule, precision, checkpoints, ...)
    scaling:   ScalingSection fields   (worker range, CPUs/GPU per worker, max_failures)

``${NAME}`` in any string value is replaced by the environment variable NAME (an unset one is an
error), so one config file serves every cluster: ``train: ${CCRK_DATA_URI}/pretrain``.

Running the same command again with ``--resume`` continues the run from its latest committed
checkpoint (same storage path and name), mid-epoch included. ``ccrk_ray/configs/`` ships examples.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ccrk_ray.config import ConfigError, check_range, expand_vars
from ccrk_ray.languages import CCRK_LANGUAGES, validate_languages

CONFIG_DIR = Path(__file__).parent / "configs"
PREPROCESS_FILE = "preprocess.json"
RESULT_FILE = "train_result.json"


@dataclass
class DataSection:
    train: str = ""                          # parquet file or prefix: local, s3://, any pyarrow URI
    val: str | None = None                   # small split evaluated after every epoch (rank 0)
    test: str | dict[str, str] | None = None # evaluated with the final model: a URI, or {language: URI}
    endpoint_url: str | None = None          # S3-compatible endpoint (else AWS_ENDPOINT_URL)
    languages: tuple[str, ...] = CCRK_LANGUAGES
    captions_per_image: int | None = None    # K; default every language
    image_size: int = 224
    max_length: int = 40
    tokenizer: str | None = None             # HF name/path; default the model's text_name_or_path
    on_bad_row: str = "skip"                 # skip (counted) | raise
    chunk_rows: int = 256                    # shuffle granularity (row-group slices)
    image_keys: bool = False                 # batches carry image ids: captions of one image are all positives
    data_actors: int = 1                     # decode/tokenise actors per training worker
    cpus_per_actor: float = 0.8


@dataclass
class TrainSection:
    epochs: int = 1
    max_steps: int | None = None             # stop after this many optimiser steps
    batch_size: int = 64                     # images per worker per forward pass
    global_batch_size: int | None = None     # images per optimiser step; default batch_size x max workers
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.1                      # optimiser steps, or a fraction of them when < 1
    schedule: str = "cosine"                 # cosine | linear decay after warm-up
    grad_clip: float = 0.0
    precision: str = "fp32"                  # fp32 | bf16 (autocast; for GPUs)
    grad_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    checkpoint_every: int = 0                # optimiser steps between checkpoints (0: epoch ends only)
    num_to_keep: int = 2
    log_every: int = 10
    trace_dir: str | None = None             # write each step's row keys (audits, tests)


@dataclass
class ScalingSection:
    workers: tuple[int, int] = (1, 2)
    cpus_per_worker: float = 1.0
    gpu: bool = False
    max_failures: int = 3
    threads_per_worker: int | None = None    # torch threads; default cpus_per_worker


@dataclass
class PretrainConfig:
    output_dir: str
    data: DataSection
    model: dict[str, Any] = field(default_factory=dict)         # ModelConfig fields
    objective: dict[str, Any] = field(default_factory=lambda: {"name": "one_to_k"})
    train: TrainSection = field(default_factory=TrainSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    storage_path: str | None = None
    name: str = "pretrain"

    SECTIONS = {"data": DataSection, "train": TrainSection, "scaling": ScalingSection}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "PretrainConfig":
        d = dict(d)
        _check_keys(d, cls, where)
        if "output_dir" not in d or "data" not in d:
            raise ConfigError(f"{where}: needs output_dir and data.train")
        for key, section in cls.SECTIONS.items():
            value = d.get(key) or {}
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}")
            _check_keys(value, section, f"{where}: {key}")
            d[key] = section(**value)
        for key in ("model", "objective"):
            if not isinstance(d.get(key, {}), dict):
                raise ConfigError(f"{where}: '{key}' must be a mapping")
        return cls(**d).validate()

    @classmethod
    def from_yaml(cls, path: str | Path) -> "PretrainConfig":
        return cls.from_dict(read_yaml(path), where=str(path))

    def validate(self) -> "PretrainConfig":
        from ccrk_ray.model import ModelConfig
        from ccrk_ray.objectives import OBJECTIVES, ObjectiveConfig
        from ccrk_ray.train.loop import accumulation

        d, t, s = self.data, self.train, self.scaling
        if not d.train:
            raise ConfigError("data.train: the training data URI is required")
        d.languages = validate_languages(d.languages, known=None)
        if d.captions_per_image is None:
            d.captions_per_image = len(d.languages)
        check_range("data.captions_per_image", d.captions_per_image, 1, len(d.languages))
        check_range("data.image_size", d.image_size, 32, 2048)
        check_range("data.max_length", d.max_length, 8, 512)
        check_range("data.chunk_rows", d.chunk_rows, 1)
        check_range("data.data_actors", d.data_actors, 1)
        if d.on_bad_row not in ("skip", "raise"):
            raise ConfigError(f"data.on_bad_row must be skip or raise, got {d.on_bad_row!r}")
        lo, hi = s.workers = tuple(s.workers)
        if not 1 <= lo <= hi:
            raise ConfigError(f"scaling.workers must be [MIN, MAX] with 1 <= MIN <= MAX, got {list(s.workers)}")
        check_range("train.epochs", t.epochs, 1)
        check_range("train.batch_size", t.batch_size, 2)
        check_range("train.lr", t.lr, 1e-10, 10.0)
        check_range("train.warmup", t.warmup, 0)
        check_range("train.checkpoint_every", t.checkpoint_every, 0)
        check_range("train.num_to_keep", t.num_to_keep, 1)
        if t.max_steps is not None:
            check_range("train.max_steps", t.max_steps, 1)
        if t.schedule not in ("cosine", "linear"):
            raise ConfigError(f"train.schedule must be cosine or linear, got {t.schedule!r}")
        if t.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision must be fp32 or bf16, got {t.precision!r}")
        if t.global_batch_size is None:
            t.global_batch_size = t.batch_size * hi
        for world in range(lo, hi + 1):      # every worker count the run may get
            try:
                accumulation(t.global_batch_size, t.batch_size, world)
            except ValueError as exc:
                raise ConfigError(f"train.global_batch_size: {exc} (the run may have {lo}..{hi} workers)") from None
        try:
            ModelConfig.from_dict(self.model)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model: {exc}") from None
        objective = dict(self.objective)
        name = objective.pop("name", "one_to_k")
        if name not in OBJECTIVES:
            raise ConfigError(f"objective.name {name!r} is not one of {', '.join(OBJECTIVES)}")
        unknown = sorted(set(objective) - {f.name for f in dataclasses.fields(ObjectiveConfig)})
        if unknown:
            raise ConfigError(f"objective: unknown key(s) {', '.join(unknown)}")
        from ccrk_ray.demo import check_vision_model

        check_vision_model(self.model.get("vision_name", ModelConfig.vision_name))
        return self

    @property
    def run_storage(self) -> str:
        return self.storage_path or str(Path(self.output_dir).resolve() / "ray_results")


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    try:
        d = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({exc})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"--config {path}: expected a mapping at the top level")
    return expand_vars(d, where=str(path))


def _check_keys(d: dict[str, Any], cls, where: str) -> None:
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} "
                          f"(known: {', '.join(f.name for f in dataclasses.fields(cls))})")


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


def objective_args(objective: dict[str, Any], tokenizer, languages) -> tuple[str, dict[str, Any]]:
    """(objective name, ObjectiveConfig kwargs) with the tokenizer's ids filled in."""
    args = dict(objective)
    name = args.pop("name", "one_to_k")
    args.setdefault("languages", list(languages))
    args.setdefault("mask_token_id", tokenizer.mask_token_id)
    args.setdefault("vocab_size", len(tokenizer))
    args.setdefault("special_ids", sorted(set(tokenizer.all_special_ids)))
    return name, args


def loop_config(cfg: PretrainConfig, check, tokenizer, caption_tokenizer, tensorboard_dir: str | None) -> dict[str, Any]:
    """The train_loop_config of ``ccrk_ray.train.loop.train_loop_per_worker``."""
    d, t, s = cfg.data, cfg.train, cfg.scaling
    name, args = objective_args(cfg.objective, tokenizer, d.languages)
    return dict(
        model=fill_text_config(cfg.model, tokenizer), objective=name, objective_args=args,
        data=dict(uri=d.train, endpoint_url=d.endpoint_url, files=check.files, row_groups=check.row_groups,
                  languages=list(d.languages), k=d.captions_per_image, tokenizer=caption_tokenizer,
                  image_size=d.image_size, chunk_rows=d.chunk_rows,
                  data_actors=d.data_actors, cpus_per_actor=d.cpus_per_actor, on_bad_row=d.on_bad_row,
                  image_keys=d.image_keys),
        val={"uri": d.val, "languages": list(d.languages)} if d.val else None,
        **{k: v for k, v in dataclasses.asdict(t).items() if k != "num_to_keep"},
        threads_per_worker=int(s.threads_per_worker or max(1, s.cpus_per_worker)),
        tensorboard_dir=tensorboard_dir,
    )


def run_training(cfg: PretrainConfig, tokenizer, caption_tokenizer, *, log=print, resume: bool = False,
                 extra: dict[str, Any] | None = None, callbacks: list | None = None) -> dict[str, Any]:
    """Check the data, build the trainer, fit, and save the final model with its tokenizer and
    preprocessing under ``output_dir/model``. ``extra`` goes into the loop config (fine-tuning's
    ``init_from``, ``best_dir``, ``val``); ``callbacks`` into the trainer's RunConfig (Ray Train
    callbacks, e.g. ``ccrk tune``'s report to Tune). Needs Ray initialised. Returns the final
    metrics."""
    from ccrk_ray.data.pipeline import check_dataset, stats_actor
    from ccrk_ray.train.state import load_model
    from ccrk_ray.train.trainer import build_trainer, clean_orphan_checkpoints

    out = Path(cfg.output_dir).resolve()
    check = check_dataset(cfg.data.train, cfg.data.languages, cfg.data.endpoint_url)  # schema errors name the file
    stats_actor(create=True)
    removed = clean_orphan_checkpoints(cfg.run_storage, cfg.name)
    if removed:
        log(f"removed {len(removed)} uncommitted checkpoint dir(s) of an interrupted run: {', '.join(removed)}")
    config = {**loop_config(cfg, check, tokenizer, caption_tokenizer, str(out / "tensorboard")), **(extra or {})}
    config["data"] = {**config["data"], "run_id": uuid.uuid4().hex}     # the data stats of this run
    trainer = build_trainer(config, storage_path=cfg.run_storage, name=cfg.name, num_workers=cfg.scaling.workers,
                            cpus_per_worker=cfg.scaling.cpus_per_worker, use_gpu=cfg.scaling.gpu,
                            max_failures=cfg.scaling.max_failures, num_to_keep=cfg.train.num_to_keep,
                            callbacks=callbacks)
    log(f"training {cfg.model.get('vision_name', 'resnet10t')} + {cfg.model.get('text_name_or_path') or 'text config'} "
        f"({config['objective']}, K={cfg.data.captions_per_image}) on {check.rows} rows, "
        f"{cfg.scaling.workers[0]}-{cfg.scaling.workers[1]} Ray Train workers, global batch "
        f"{cfg.train.global_batch_size}" + (" (resuming)" if resume else ""))
    result = trainer.fit()
    with result.checkpoint.as_directory() as ckpt:
        load_model(ckpt).save_pretrained(out / "model")
    caption_tokenizer.save_pretrained(out / "model")       # evaluation needs the tokenizer and preprocessing
    (out / "model" / PREPROCESS_FILE).write_text(json.dumps(
        {"image_size": cfg.data.image_size, "max_length": cfg.data.max_length,
         "languages": list(cfg.data.languages)}, indent=2))
    metrics = dict(result.metrics or {})
    (out / RESULT_FILE).write_text(json.dumps({"metrics": metrics, "checkpoint": result.checkpoint.path}, indent=2))
    log(f"training done: {metrics.get('step')} steps, final loss {metrics.get('loss', float('nan')):.4f}; "
        f"model saved to {out / 'model'}")
    return metrics


def prepare_run(cfg: PretrainConfig, resume: bool) -> Path:
    """The output directory, refusing to start over an earlier run unless resuming it."""
    out = Path(cfg.output_dir).resolve()
    if not resume:
        from ccrk_ray.train.trainer import run_exists

        if (out / RESULT_FILE).exists():
            raise ConfigError(f"{out} holds a finished run; pass --resume to continue it or pick another output_dir")
        if run_exists(cfg.run_storage, cfg.name):
            raise ConfigError(f"{cfg.run_storage}/{cfg.name} holds an interrupted run; pass --resume to continue it")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=list))
    return out


def run_pretrain(cfg: PretrainConfig, resume: bool = False) -> dict[str, Any]:
    from ccrk_ray.demo import _log, init_ray
    from ccrk_ray.tokenizer import CaptionTokenizer, load_tokenizer

    t0 = time.perf_counter()
    prepare_run(cfg, resume)
    source = cfg.data.tokenizer or cfg.model.get("text_name_or_path")
    if not source:
        raise ConfigError("data.tokenizer: a tokenizer name or path is needed when the text model is built from "
                          "a config")
    tokenizer = load_tokenizer(source)
    caption_tokenizer = CaptionTokenizer(tokenizer, cfg.data.max_length)
    import ray

    started = init_ray(num_cpus=int(cfg.scaling.workers[1] * (cfg.scaling.cpus_per_worker + cfg.data.cpus_per_actor)) + 2)
    try:
        metrics = run_training(cfg, tokenizer, caption_tokenizer, log=lambda m: _log(m, t0), resume=resume)
        if cfg.data.test:
            from ccrk_ray.finetune import evaluate_tests

            out = Path(cfg.output_dir).resolve()
            metrics["test"] = evaluate_tests(cfg, out / "model", cfg.data.languages, None, dataset=cfg.name,
                                             log=lambda m: _log(m, t0))
        return metrics
    finally:
        if started:
            ray.shutdown()
