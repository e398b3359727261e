"""``ccrk demo``: synthetic data → tokenizer → 1-to-K pretraining on Ray → report.

Everything lands under one output directory:

    DIR/data/{train,val,test}/part-*.parquet   the generated data set
    DIR/tokenizer/                             the trained tokenizer (AutoTokenizer-loadable)
    DIR/ray_results/pretrain/                  Ray Train run: checkpoints (per epoch, newest 2)
    DIR/tensorboard/                           TensorBoard event files
    DIR/model/                                 the final model (CCRKModel.from_pretrained)
    DIR/report.json                            per-language recall with chance level, MRV
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ccrk_ray.core.config import ConfigError, check_range
from ccrk_ray.core.files import prepare_out_dir
from ccrk_ray.core.languages import CCRK_LANGUAGES, validate_languages
from ccrk_ray.core.log import get_logger
from ccrk_ray.core.precision import PRECISIONS
from ccrk_ray.core.runtime import local_cpus, ray_session
from ccrk_ray.data.synthetic import generate_split
from ccrk_ray.data.tokenizer import CaptionTokenizer, iter_captions, load_tokenizer, train_tokenizer
from ccrk_ray.eval.evaluate import rank_split_itc
from ccrk_ray.eval.report import report_from_ranks
from ccrk_ray.model import ModelConfig
from ccrk_ray.model.encoders import check_vision_model
from ccrk_ray.train.config import DataSection, PretrainConfig, ScalingSection, TrainSection, objective_args
from ccrk_ray.train.trainer import run_training

log = get_logger(__name__)
MARKER = "ccrk-demo.json"
OUTPUTS = ("data", "tokenizer", "ray_results", "tensorboard", "model", "report.json", "train_result.json", MARKER)


@dataclass
class DemoConfig:
    out: str
    train_images: int = 4000
    val_images: int = 200
    test_images: int = 500
    image_size: int = 64
    languages: tuple[str, ...] = CCRK_LANGUAGES
    captions_per_image: int | None = None      # K; default: every language
    omit_prob: float | dict[str, float] = 0.2  # chance a language's caption leaves out an attribute:
                                               # one for all, or {lang: p} ("*": the others')
    epochs: int = 4
    batch_size: int = 64                       # images per worker per step
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    vision_model: str = "resnet10t"
    vision_kwargs: dict[str, Any] = field(default_factory=dict)
    text_model: str | None = None              # HF name/path; None = tiny XLM-R config below
    text_layers: int = 2
    text_width: int = 128
    tokenizer: str | None = None               # HF name/path; None = --text-model's, else train one
    vocab_size: int = 2000
    max_length: int = 32
    embed_dim: int = 128
    workers: tuple[int, int] = (1, 2)
    cpus_per_worker: int = 1
    chunk_rows: int = 64                       # shuffle granularity: row-group slices of this many rows
    gpu: bool = False                          # one GPU per Ray Train worker
    precision: str = "fp32"                    # fp32 | amp_bf16 | amp (ccrk_ray.core.precision)
    seed: int = 0

    def validate(self) -> "DemoConfig":
        self.languages = validate_languages(self.languages)
        if self.captions_per_image is None:
            self.captions_per_image = len(self.languages)
        check_range("--captions-per-image", self.captions_per_image, 1, len(self.languages))
        check_range("--train-images", self.train_images, 1)
        check_range("--test-images", self.test_images, 2)
        check_range("--val-images", self.val_images, 0)
        check_range("--image-size", self.image_size, 32, 1024)
        self.omit_prob = resolve_omit_prob(self.omit_prob, self.languages)
        check_range("--epochs", self.epochs, 1)
        check_range("--batch-size", self.batch_size, 2)
        check_range("--lr", self.lr, 1e-8, 1.0)
        check_range("--max-length", self.max_length, 8, 512)
        check_range("--embed-dim", self.embed_dim, 8)
        check_range("--vocab-size", self.vocab_size, 100)
        check_range("--cpus-per-worker", self.cpus_per_worker, 1)
        check_range("--chunk-rows", self.chunk_rows, 1)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        lo, hi = self.workers
        if not 1 <= lo <= hi:
            raise ConfigError(f"--workers must be MIN,MAX with 1 <= MIN <= MAX, got {lo},{hi}")
        if self.train_images < self.batch_size * hi:
            raise ConfigError(f"--train-images {self.train_images} is less than one batch per worker "
                              f"({self.batch_size} x {hi} workers)")
        check_vision_model(self.vision_model, flag="--vision-model")
        return self


def resolve_omit_prob(omit_prob: float | Mapping[str, float], languages) -> float | dict[str, float]:
    """One probability, or {language: p} for every language (``"*"`` gives the unnamed ones)."""
    if not isinstance(omit_prob, Mapping):
        check_range("--omit-prob", omit_prob, 0.0, 1.0)
        return float(omit_prob)
    unknown = [k for k in omit_prob if k != "*" and k not in languages]
    if unknown:
        raise ConfigError(f"--omit-prob names language(s) not in --languages: {', '.join(unknown)}")
    missing = [lang for lang in languages if lang not in omit_prob and "*" not in omit_prob]
    if missing:
        raise ConfigError(f"--omit-prob has no value for {', '.join(missing)} (a bare number sets the others)")
    out = {lang: float(omit_prob.get(lang, omit_prob.get("*", 0.0))) for lang in languages}
    for lang, p in out.items():
        check_range(f"--omit-prob {lang}", p, 0.0, 1.0)
    return out


def text_model_config(cfg: DemoConfig, tokenizer) -> dict[str, Any]:
    """The tiny XLM-R text encoder of the demo (ignored when --text-model names a real one)."""
    if cfg.text_model:
        return {}
    return dict(model_type="xlm-roberta", vocab_size=len(tokenizer), hidden_size=cfg.text_width,
                num_hidden_layers=cfg.text_layers, num_attention_heads=max(1, cfg.text_width // 32),
                intermediate_size=cfg.text_width * 2, max_position_embeddings=cfg.max_length + 2,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def demo_cpus(cfg: DemoConfig) -> int:
    """Logical CPUs of the local cluster: each worker and its data actor, plus the read tasks."""
    return local_cpus(cfg.workers[1] * (cfg.cpus_per_worker + 1))


def generate_data(cfg: DemoConfig, out: Path) -> None:
    splits = {"train": cfg.train_images, "val": cfg.val_images, "test": cfg.test_images}
    for i, (split, n) in enumerate(splits.items()):
        if n:
            generate_split(out / "data" / split, split, n, languages=cfg.languages, seed=cfg.seed * 10 + i,
                           omit_prob=cfg.omit_prob, image_size=cfg.image_size)
    log.info("generated %d/%d/%d train/val/test images with captions in %d languages under %s",
             cfg.train_images, cfg.val_images, cfg.test_images, len(cfg.languages), out / "data")


def prepare_tokenizer(cfg: DemoConfig, out: Path):
    """(HF tokenizer, CaptionTokenizer): --tokenizer, else --text-model's, else trained on the captions."""
    if cfg.tokenizer or cfg.text_model:
        # A pretrained text encoder comes with its own vocabulary: use its tokenizer by default.
        tokenizer_path = cfg.tokenizer or cfg.text_model
    else:
        tokenizer_path = str(train_tokenizer(iter_captions(out / "data" / "train", cfg.languages),
                                             out / "tokenizer", vocab_size=cfg.vocab_size))
    tokenizer = load_tokenizer(tokenizer_path)
    log.info("tokenizer %s: %d tokens", tokenizer_path, len(tokenizer))
    return tokenizer, CaptionTokenizer(tokenizer, cfg.max_length)


def pretrain(cfg: DemoConfig, out: Path, run_dir: Path, tokenizer, caption_tokenizer, model_cfg: ModelConfig,
             objective: dict[str, Any], train_uri: str | None = None) -> dict[str, Any]:
    """One Ray Train run (``run_training``) on ``train_uri`` (default ``out/data/train``; ``s3://…``
    works the same); the final model is saved to ``run_dir/model``. Ray must be running."""
    pc = PretrainConfig(
        output_dir=str(run_dir),
        data=DataSection(train=train_uri or str(out / "data" / "train"), languages=cfg.languages,
                         captions_per_image=cfg.captions_per_image, image_size=cfg.image_size,
                         max_length=cfg.max_length, chunk_rows=cfg.chunk_rows),
        model=model_cfg.to_dict(), objective=objective,
        train=TrainSection(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                           warmup=cfg.warmup_steps, precision=cfg.precision, seed=cfg.seed, log_every=20),
        scaling=ScalingSection(workers=cfg.workers, cpus_per_worker=cfg.cpus_per_worker, gpu=cfg.gpu,
                               max_failures=0),
    ).validate()
    return run_training(pc, tokenizer, caption_tokenizer)


def demo_model_config(cfg: DemoConfig, tokenizer, fusion_layers: int = 0) -> ModelConfig:
    text_config = text_model_config(cfg, tokenizer)
    if text_config and fusion_layers:
        text_config["num_hidden_layers"] = cfg.text_layers + fusion_layers
    return ModelConfig(vision_name=cfg.vision_model, vision_kwargs=dict(cfg.vision_kwargs),
                       text_name_or_path=cfg.text_model, text_pretrained=bool(cfg.text_model),
                       text_config=text_config, embed_dim=cfg.embed_dim, fusion_layers=fusion_layers,
                       text_layers=cfg.text_layers if fusion_layers and not cfg.text_model else None)


def evaluate_split(uri: str, model_dir: str, languages, tokenizer, image_size: int,
                   num_actors: int = 1) -> dict[str, Any]:
    """Per-language retrieval report of a saved model on a parquet split (ITC, the same ranking
    as ``ccrk evaluate --itc-only``). Ray must be running."""
    _, ranks = rank_split_itc(uri, model_dir, languages, tokenizer, image_size, actors=num_actors)
    return report_from_ranks(ranks)


def prepare_experiment(cfg: DemoConfig, marker: str, outputs: tuple[str, ...], command: str,
                       keep_same: bool = False, selection: tuple[str, ...] = ()):
    """The output folder (with ``marker`` holding the config), the synthetic data and the tokenizer
    of a demo or a comparison: (output folder, HF tokenizer, CaptionTokenizer). ``keep_same``: a
    folder whose marker holds this config keeps what it has (its data, tokenizer and runs: the
    experiment resumes or grows); the config fields in ``selection`` only choose which runs to
    report (each run has its own folder), so they may differ, and so may the folder's path (a
    moved or copied folder is the same experiment). Any other earlier output is cleared."""
    cfg.validate()
    out = Path(cfg.out).resolve()
    config = json.dumps(dataclasses.asdict(cfg), indent=2, default=list)

    def fixed(c: dict[str, Any]) -> str:
        return json.dumps({k: v for k, v in c.items() if k not in selection and k != "out"}, default=list)

    same = False
    if keep_same and (out / marker).is_file() and (out / "data" / "test").is_dir() \
            and (cfg.tokenizer or cfg.text_model or (out / "tokenizer").is_dir()):
        try:
            same = fixed(json.loads((out / marker).read_text())) == fixed(json.loads(config))
        except json.JSONDecodeError:
            same = False
    if same:
        log.info("%s holds this experiment's data and runs: finished runs are kept", out)
        (out / marker).write_text(config)
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.text_model or str(out / "tokenizer"))
        return out, tokenizer, CaptionTokenizer(tokenizer, cfg.max_length)
    prepare_out_dir(out, marker, outputs, command)
    (out / marker).write_text(config)
    generate_data(cfg, out)
    return (out, *prepare_tokenizer(cfg, out))


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    out, tokenizer, caption_tokenizer = prepare_experiment(cfg, MARKER, OUTPUTS, "demo")
    with ray_session(demo_cpus(cfg)):
        # The demo trains 1-to-K ITC alone on a dual encoder: ITM and MLM weights are 0.
        _, args = objective_args({"itm_weight": 0.0, "mlm_weight": 0.0}, tokenizer, cfg.languages)
        train_metrics = pretrain(cfg, out, out, tokenizer, caption_tokenizer, demo_model_config(cfg, tokenizer),
                                 {"name": "one_to_k", **args})
        log.info("ranking the %d test images in %d languages", cfg.test_images, len(cfg.languages))
        report = evaluate_split(str(out / "data" / "test"), str(out / "model"), cfg.languages, caption_tokenizer,
                                cfg.image_size)
    report["train"] = train_metrics
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    log.info("report written to %s", out / "report.json")
    return report
