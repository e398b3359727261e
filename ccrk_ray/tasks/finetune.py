"""``ccrk finetune --task TASK --config FILE --start-from MODEL [--resume]``: the paper's downstream
retrieval tasks, each from a shipped task config (``ccrk_ray/configs/tasks/<task>.yaml``) that your
config file overrides key by key.

Your config has the same sections as ``ccrk pretrain``'s (``ccrk_ray.train.config``) plus ``task``;
``data.train``/``data.val``/``data.test`` point at the task's data converted with ``ccrk convert``
(``data.test``: one URI, or ``{language: URI}`` when each language has its own test images, as
MSCOCO's ja/zh sets and WIT do; ``data.translate_test`` the same for IGLUE's translate-test files,
each language's test captions machine-translated into English). The run:

1. starts from the model in CKPT (a saved model or a training checkpoint; its tokenizer and
   preprocessing come with it) or from the pre-trained encoders a model spec names
   (``StartingPoint``), on ``task.train_languages``;
2. trains ITC with positives by image id (every caption of the same image is a positive; MITM
   never draws one as a negative), plus ITM when the model has fusion layers;
3. validates on ``data.val`` in ``task.val_languages`` after every epoch and keeps the model with
   the best ``r_mean``;
4. evaluates that model on every test set (``ccrk evaluate``: per-language recall, MRV, two-stage
   re-ranking with ``task.k_test``), translate-test sets included, and writes
   ``output_dir/report.json``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ccrk_ray.core.config import ConfigError, build, check_range, deep_merge, read_config, read_yaml
from ccrk_ray.core.languages import validate_languages
from ccrk_ray.core.log import get_logger
from ccrk_ray.core.runtime import ray_session
from ccrk_ray.data.tokenizer import CaptionTokenizer, load_tokenizer
from ccrk_ray.eval.evaluate import evaluate_test_sets, run_cpus
from ccrk_ray.model.ccrk import TEMPERATURE_MAX, TEMPERATURE_MIN, CCRKModel, ModelConfig
from ccrk_ray.model.saved import Preprocess, model_config, resolve_model_dir
from ccrk_ray.train.best import BestStore
from ccrk_ray.train.config import CONFIG_DIR, PretrainConfig
from ccrk_ray.train.trainer import check_training_data, prepare_run, run_training

log = get_logger(__name__)

TASK_DIR = CONFIG_DIR / "tasks"
# The paper's fine-tuning tasks; *_de/_fr/_cs/_ja/_zh: the single-language fine-tunes (started
# from the English fine-tuned model)
TASKS = ("multi30k", "mscoco", "xflickrco", "xflickrco_fewshot", "wit",
         "multi30k_de", "multi30k_fr", "multi30k_cs", "mscoco_ja", "mscoco_zh")


@dataclass
class TaskSection:
    name: str = ""
    train_languages: tuple[str, ...] = ("en",)
    val_languages: tuple[str, ...] | None = None      # default: train_languages
    test_languages: tuple[str, ...] = ("en",)
    k_test: int | None = None                         # two-stage re-ranking depth (None: ITC only)
    zero_shot: bool = False                           # test languages were never trained on (documentation)
    # {language: N}: that language's test set is also reported as the average of N consecutive
    # folds (COCO's 1K protocol: {en: 5, ja: 5} on the 5K test sets)
    test_folds: dict[str, int] = field(default_factory=dict)


@dataclass
class FinetuneConfig(PretrainConfig):
    task: TaskSection = field(default_factory=TaskSection)
    name: str = "finetune"

    SECTIONS = {**PretrainConfig.SECTIONS, "task": TaskSection}

    def validate(self) -> "FinetuneConfig":
        t = self.task
        if t.name not in TASKS:
            raise ConfigError(f"task.name {t.name!r} is not one of {', '.join(TASKS)}")
        t.train_languages = validate_languages(t.train_languages, known=None)
        t.val_languages = validate_languages(t.val_languages or t.train_languages, known=None)
        t.test_languages = validate_languages(t.test_languages, known=None)
        if t.k_test is not None and t.k_test < 1:
            raise ConfigError(f"task.k_test must be >= 1 or null, got {t.k_test}")
        for lang, n in t.test_folds.items():
            if lang not in t.test_languages:
                raise ConfigError(f"task.test_folds has {lang!r}, not among task.test_languages")
            if not isinstance(n, int) or isinstance(n, bool) or n < 2:
                raise ConfigError(f"task.test_folds.{lang} must be a whole number >= 2, got {n!r}")
        self.data.languages = t.train_languages
        self.data.image_keys = True
        for key in ("test", "translate_test"):
            sets = getattr(self.data, key)
            if isinstance(sets, dict):
                unknown = sorted(set(sets) - set(t.test_languages))
                if unknown:
                    raise ConfigError(f"data.{key} has sets for {', '.join(unknown)}, not among task.test_languages")
        return super().validate()


SPEC_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class StartingPoint:
    """What fine-tuning starts from (``--start-from``).

    - A saved CCRK model or training checkpoint (``model_dir``): every weight comes from it, with
      its tokenizer and preprocessing.
    - A model spec file (``spec``: a YAML file whose ``model:`` section is a ``ModelConfig``, as in
      a ``ccrk pretrain`` config, e.g. that config itself): the encoders it names are loaded
      pre-trained (timm ``vision_pretrained``/``vision_checkpoint``, an HF ``text_name_or_path``)
      and CCRK's own layers (projections, fusion cross-attention, ITM/MLM heads, temperature) start
      fresh, with ``model.lr_mult`` times the learning rate -- fine-tuning without CCRK
      pre-training, the baseline that shows what pre-training buys. Its optional ``data:`` section
      may give ``tokenizer``, ``image_size`` and ``max_length``; the tokenizer defaults to the text
      encoder's own (``text_name_or_path``). Local paths in it may be relative to the spec file.
    """
    source: Path
    model_dir: Path | None = None
    spec: dict[str, Any] | None = None

    @classmethod
    def of(cls, checkpoint: str | Path) -> "StartingPoint":
        path = Path(checkpoint)
        if path.is_file() and path.suffix in SPEC_SUFFIXES:
            d = read_yaml(path)
            if not isinstance(d.get("model"), dict):
                raise ConfigError(f"--start-from {checkpoint}: a model spec file needs a model: mapping "
                                  "(ModelConfig keys, as in a ccrk pretrain config)")
            build(ModelConfig, d["model"], f"--start-from {checkpoint}: model")
            # local files named relative to the spec are found from any worker's directory
            here = path.resolve().parent
            for section, key in (("model", "vision_checkpoint"), ("model", "text_name_or_path"), ("data", "tokenizer")):
                value = (d.get(section) or {}).get(key)
                if isinstance(value, str) and not Path(value).is_absolute() and (here / value).exists():
                    d[section][key] = str(here / value)
            return cls(path.resolve(), spec=d)
        model_dir = resolve_model_dir(path, flag="--start-from").resolve()
        return cls(model_dir, model_dir=model_dir)

    @property
    def model(self) -> dict[str, Any]:
        """The model config: the saved model's, or the spec's."""
        if self.model_dir is not None:
            return model_config(self.model_dir)
        return dict(self.spec["model"])

    @property
    def fresh_layers(self) -> bool:
        """Whether some parameters start fresh beside pre-trained ones (``lr_mult`` then applies)."""
        if self.model_dir is not None:
            return False                 # every weight comes from the saved model
        m = ModelConfig.from_dict(self.model)
        return m.pretrained_vision or m.pretrained_text

    def data_defaults(self) -> dict[str, Any]:
        """Preprocessing (and tokenizer) that come with the starting point; the user's config wins."""
        if self.model_dir is not None:
            pre = Preprocess.read(self.model_dir)
            sizes = {"image_size": pre.image_size, "max_length": pre.max_length, "pre_caption": pre.pre_caption}
            return {**{k: v for k, v in sizes.items() if v is not None}, "tokenizer": str(self.model_dir)}
        data = self.spec.get("data") or {}
        out = {k: data[k] for k in ("image_size", "max_length", "tokenizer") if data.get(k) is not None}
        if "tokenizer" not in out and self.model.get("text_name_or_path"):
            out["tokenizer"] = self.model["text_name_or_path"]
        return out

    @property
    def init_from(self) -> str | None:
        """What the training loop loads: the saved model, or None (the loop builds the model from
        the config, encoders pre-trained, as pre-training does)."""
        return str(self.model_dir) if self.model_dir is not None else None

    def describe(self) -> str:
        return str(self.model_dir) if self.model_dir is not None else f"pre-trained encoders of {self.source}"


def _text_positions(model: dict[str, Any]) -> int | None:
    """Position embeddings of the text encoder, when known without a download."""
    positions = (model.get("text_config") or {}).get("max_position_embeddings")
    path = model.get("text_name_or_path")
    if positions is None and path and (Path(path) / "config.json").is_file():
        positions = json.loads((Path(path) / "config.json").read_text()).get("max_position_embeddings")
    return positions


def load_config(task: str, config_path: str | Path, checkpoint: str | Path,
                sets: Sequence[str] | None = None) -> tuple[FinetuneConfig, StartingPoint]:
    """What comes with the starting point (tokenizer, preprocessing), then the task's shipped
    defaults (the paper's fine-tuning resolution), then the user's file and its ``--set`` items."""
    if task not in TASKS:
        raise ConfigError(f"--task {task!r} is not one of {', '.join(TASKS)}")
    start = StartingPoint.of(checkpoint)
    saved = start.model
    merged = deep_merge({"data": start.data_defaults()}, read_yaml(TASK_DIR / f"{task}.yaml"))
    if not saved.get("fusion_layers"):      # a dual encoder: the task's ITM/MLM weights do not apply to it
        merged.setdefault("objective", {}).update(itm_weight=0.0, mlm_weight=0.0)
    user = read_config(config_path, sets)
    if user.get("task", {}).get("name", task) != task:
        raise ConfigError(f"{config_path}: task.name {user['task']['name']!r} does not match --task {task}")
    merged = deep_merge(merged, user)
    if not merged.get("data", {}).get("tokenizer"):
        raise ConfigError(f"{config_path}: data.tokenizer is required: the model spec {start.source} names no "
                          "text encoder to take it from")
    # the model is the starting point's; the config may only change training-time settings of it
    overrides = merged.get("model", {})
    allowed = {"lr_mult", "temperature"}
    if set(overrides) - allowed:
        raise ConfigError(f"model: only {', '.join(sorted(allowed))} can be set when fine-tuning "
                          f"(the architecture is the checkpoint's), got {', '.join(sorted(set(overrides) - allowed))}")
    if overrides.get("temperature") is not None:
        check_range("model.temperature", overrides["temperature"], TEMPERATURE_MIN, TEMPERATURE_MAX)
    if start.model_dir is not None:
        # model.temperature is where the ITC temperature starts; null (the default): the checkpoint's learned one
        merged["model"] = {**saved, "temperature": None, **overrides}
    else:
        merged["model"] = {**saved, **{k: v for k, v in overrides.items() if v is not None}}
    positions = _text_positions(saved)
    max_length = merged.get("data", {}).get("max_length")
    if positions and max_length and max_length > positions - 2:
        raise ConfigError(f"data.max_length {max_length} exceeds what the checkpoint's text encoder takes "
                          f"({positions - 2} tokens)")
    objective = merged.setdefault("objective", {})
    if not saved.get("fusion_layers"):
        objective.setdefault("itm_weight", 0.0)
        objective.setdefault("mlm_weight", 0.0)
        merged.setdefault("task", {})["k_test"] = None
    return FinetuneConfig.from_dict(merged, where=str(config_path)), start


def run_finetune(task: str, config_path: str | Path, checkpoint: str | Path, resume: bool = False,
                 sets: Sequence[str] | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg, start = load_config(task, config_path, checkpoint, sets)
    out = prepare_run(cfg, resume)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    caption_tokenizer = CaptionTokenizer(tokenizer, cfg.data.max_length, cfg.data.pre_caption)
    best_store = BestStore(f"{cfg.run_storage.rstrip('/')}/{cfg.name}/best")
    check = check_training_data(cfg)
    with ray_session(run_cpus(cfg.cpus_held())):
        log.info("fine-tuning %s on task %s (train %s; test %s)", start.describe(), task,
                 ", ".join(cfg.task.train_languages), ", ".join(cfg.task.test_languages))
        metrics = run_training(cfg, tokenizer, caption_tokenizer, resume=resume, init_from=start.init_from,
                               best_dir=best_store.uri, val_languages=cfg.task.val_languages, check=check)
        local = out / "best_download"
        shutil.rmtree(local, ignore_errors=True)
        best = best_store.download(str(local))
        if best is not None:       # the final model/ becomes the best on validation
            CCRKModel.from_pretrained(local).save_pretrained(out / "model")
            shutil.rmtree(local)
            log.info("best validation r_mean %.2f at step %d: saved to %s", best["score"], best["step"], out / "model")
        tests = evaluate_test_sets(cfg.data.test, out / "model", out / "test", cfg.task.test_languages,
                                   cfg.task.k_test, dataset=task, folds=cfg.task.test_folds)
        tests.update(evaluate_test_sets(cfg.data.translate_test, out / "model", out / "test", cfg.task.test_languages,
                                        cfg.task.k_test, dataset=task, name="translate_test"))
    report = {"task": dataclasses.asdict(cfg.task), "train": metrics, "best": best, "test": tests,
              "seconds": round(time.perf_counter() - t0, 1)}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=list))
    log.info("report written to %s", out / "report.json")
    return report
