"""A saved model directory: the one place that finds, writes and reads it.

    DIR/config.json, model.safetensors    the model (``CCRKModel`` / ``NRCCRModel.save_pretrained``)
    DIR/tokenizer.json, ...               its tokenizer (``AutoTokenizer``-loadable)
    DIR/preprocess.json                   image_size, max_length, languages of training

``resolve_model_dir`` accepts a model directory or a training checkpoint (its ``model/``), so every
command that takes a model (``--model``, ``--start-from``) reads either the same way.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ccrk_ray.core.config import ConfigError, first_line
from ccrk_ray.model.ccrk import CCRKModel
from ccrk_ray.model.pretrained import CONFIG_NAME, WEIGHTS_NAME
from ccrk_ray.model.nrccr import NRCCRModel

PREPROCESS_FILE = "preprocess.json"
CHECKPOINT_MODEL_DIR = "model"        # where a training checkpoint keeps its model


@dataclass(frozen=True)
class Preprocess:
    """How images and captions were prepared for the model (evaluation repeats it)."""
    image_size: int | None = None
    max_length: int | None = None
    languages: tuple[str, ...] = ()
    pre_caption: int | None = None      # caption normalisation word count (``data.tokenizer.pre_caption``)

    @classmethod
    def of(cls, data) -> "Preprocess":
        """The preprocessing of a training config's data section."""
        return cls(data.image_size, data.max_length, tuple(data.languages), data.pre_caption)

    @classmethod
    def read(cls, directory: str | Path) -> "Preprocess":
        path = Path(directory) / PREPROCESS_FILE
        if not path.is_file():
            return cls()
        d = json.loads(path.read_text())
        return cls(d.get("image_size"), d.get("max_length"), tuple(d.get("languages") or ()), d.get("pre_caption"))

    def write(self, directory: str | Path) -> None:
        d = asdict(self)
        d["languages"] = list(self.languages)
        (Path(directory) / PREPROCESS_FILE).write_text(json.dumps(d, indent=2))


def resolve_model_dir(path: str | Path, flag: str = "--model", family: str | None = None) -> Path:
    """The saved model of ``path``: a model directory, or a training checkpoint's ``model/``; with
    ``family``, one of that family (a clear error naming the other otherwise)."""
    p = Path(path)
    if (p / CHECKPOINT_MODEL_DIR / CONFIG_NAME).is_file():
        p = p / CHECKPOINT_MODEL_DIR
    if not (p / CONFIG_NAME).is_file():
        raise ConfigError(f"{flag} {path} is not a saved model or a training checkpoint (no {CONFIG_NAME})")
    if not (p / WEIGHTS_NAME).is_file():
        raise ConfigError(f"{flag} {path}: {p} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    check_weights(p)
    found = model_family(p)
    if family is not None and found != family:
        raise ConfigError(f"{path} holds a saved {found.upper()} model, this command takes a {family.upper()} one")
    return p


def check_weights(directory: str | Path) -> None:
    """The weights file's header and size are consistent (a cut or corrupt download is caught here,
    in a moment, not when the first Ray actor loads it)."""
    path = Path(directory) / WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
    except Exception as exc:        # safetensors raises its own SafetensorError, or OSError
        raise ConfigError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None


def model_config(directory: str | Path) -> dict[str, Any]:
    """The saved model's ``config.json`` (architecture), without loading weights."""
    return json.loads((Path(directory) / CONFIG_NAME).read_text())


# The model families a saved directory can hold (``config.json``'s "family"; none = CCRK).
FAMILIES = {"ccrk": CCRKModel, "nrccr": NRCCRModel}


def model_family(directory: str | Path) -> str:
    return model_config(directory).get("family", "ccrk")


def load_model(path: str | Path, family: str = "ccrk") -> CCRKModel | NRCCRModel:
    """The model of a saved model directory or a training checkpoint, of the family a command
    expects (a clear error naming the other family otherwise)."""
    return FAMILIES[family].from_pretrained(resolve_model_dir(path, family=family))


def save_model_dir(directory: str | Path, model: CCRKModel, caption_tokenizer=None,
                   preprocess: Preprocess | None = None) -> Path:
    """Write the model, and its tokenizer and preprocessing when given, to ``directory``."""
    out = model.save_pretrained(directory)
    if caption_tokenizer is not None:
        caption_tokenizer.save_pretrained(out)
    if preprocess is not None:
        preprocess.write(out)
    return out
