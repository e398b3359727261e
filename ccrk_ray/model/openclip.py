"""open_clip models behind the encoder API evaluation uses (``encode_image``, ``encode_text``).

``ccrk evaluate --model openclip:ARCH --pretrained TAG_OR_FILE`` evaluates any open_clip model
(e.g. ``xlm-roberta-base-ViT-B-32`` / ``laion5b_s13b_b90k``, ``nllb-clip-base``) with the
model's own preprocessing and tokenizer. ``ARCH`` is a name open_clip knows or a model config
JSON file (registered with ``open_clip.add_model_config`` in every process that builds it).
open_clip is an optional dependency (``pip install ccrk-ray[openclip]``), imported only here and
only when such a model is used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ccrk_ray.core.config import ConfigError, first_line
from ccrk_ray.model.saved import load_model

PREFIX = "openclip:"
# Preprocessing the data path reproduces exactly (ccrk_ray.data.transforms.ImageTransform.resize)
RESIZE_MODES = ("shortest", "squash")


def open_clip():
    """The open_clip module, or a ConfigError saying how to install it."""
    try:
        return importlib.import_module("open_clip")
    except ImportError:
        raise ConfigError("openclip: models need open_clip: pip install 'ccrk-ray[openclip]' "
                          "(or open_clip_torch)") from None


def is_openclip(model: object) -> bool:
    return isinstance(model, OpenClipSpec) or (isinstance(model, str) and model.startswith(PREFIX))


@dataclass(frozen=True)
class OpenClipSpec:
    """An open_clip model: ``arch`` (a name, or a model config JSON file) and ``pretrained`` (a tag
    open_clip knows, a weights file, or None: random weights)."""
    arch: str
    pretrained: str | None = None

    @classmethod
    def parse(cls, model: str, pretrained: str | None = None) -> "OpenClipSpec":
        arch = model[len(PREFIX):] if model.startswith(PREFIX) else model
        if not arch:
            raise ConfigError(f"--model {model}: name the open_clip architecture, e.g. openclip:ViT-B-32")
        return cls(arch, pretrained)

    def model_name(self) -> str:
        """The name open_clip knows the architecture by (registering a config file first)."""
        path = Path(self.arch)
        if path.suffix == ".json":
            if not path.is_file():
                raise ConfigError(f"--model {PREFIX}{self.arch}: no such model config file")
            open_clip().add_model_config(path)
            return path.stem
        return self.arch

    @property
    def label(self) -> str:
        """The model's name in reports and CLIP_benchmark files (as CLIP_benchmark's ``model``)."""
        return Path(self.arch).stem if self.arch.endswith(".json") else self.arch


class OpenClipModel(nn.Module):
    """An open_clip model with CCRKModel's encoder API: ``encode_image`` takes uint8 pixels (the
    model's mean/std applied here) or normalised floats, ``encode_text`` token ids (the attention
    mask is the tokenizer's business in open_clip); both L2-normalised. No ITM head."""

    has_fusion = False

    def __init__(self, spec: OpenClipSpec):
        super().__init__()
        oc = open_clip()
        name = spec.model_name()
        try:
            self.model, _, _ = oc.create_model_and_transforms(name, pretrained=spec.pretrained)
        except (RuntimeError, ValueError, OSError) as exc:
            raise ConfigError(f"open_clip model {name!r} (pretrained {spec.pretrained!r}): {first_line(exc)}") from None
        self.model.eval()
        cfg = dict(getattr(self.model.visual, "preprocess_cfg", None) or {})
        size = cfg.get("size", getattr(self.model.visual, "image_size", 224))
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        if isinstance(size, (tuple, list)) and size[0] != size[1]:
            raise ConfigError(f"open_clip model {name!r} takes {size[0]}x{size[1]} images: only square inputs are "
                              "supported")
        self.resize_mode = cfg.get("resize_mode", "shortest")
        if self.resize_mode not in RESIZE_MODES or cfg.get("interpolation", "bicubic") != "bicubic":
            raise ConfigError(f"open_clip model {name!r} preprocesses with resize_mode {self.resize_mode!r}, "
                              f"interpolation {cfg.get('interpolation')!r}: supported are bicubic "
                              f"{' / '.join(RESIZE_MODES)}")
        mean = cfg.get("mean", getattr(self.model.visual, "image_mean", None)) or (0.48145466, 0.4578275, 0.40821073)
        std = cfg.get("std", getattr(self.model.visual, "image_std", None)) or (0.26862954, 0.26130258, 0.27577711)
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.context_length = int(getattr(self.model, "context_length", 77))

    def normalize_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dtype != torch.uint8:
            return pixel_values
        return (pixel_values.float() / 255.0 - self.pixel_mean) / self.pixel_std

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(self.normalize_pixels(pixel_values)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.model.encode_text(input_ids), dim=-1)


class OpenClipTokenizer:
    """open_clip's tokenizer of a model with ``CaptionTokenizer``'s interface (``(input_ids,
    attention_mask)`` T×context_length int64, ``max_length``). It pickles as its spec and is built
    on first use in each process (a BPE tokenizer pickles to megabytes)."""

    def __init__(self, spec: OpenClipSpec, context_length: int):
        self.spec, self.max_length = spec, int(context_length)
        self._tokenizer = None

    def __getstate__(self):
        return {"spec": self.spec, "max_length": self.max_length}

    def __setstate__(self, state):
        self.spec, self.max_length, self._tokenizer = state["spec"], state["max_length"], None

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if self._tokenizer is None:
            self._tokenizer = open_clip().get_tokenizer(self.spec.model_name(), context_length=self.max_length)
        ids = self._tokenizer(list(texts)).numpy().astype(np.int64)
        pad = getattr(getattr(self._tokenizer, "tokenizer", None), "pad_token_id", None) or 0
        return ids, (ids != pad).astype(np.int64)


def load_encoders(model: "str | Path | OpenClipSpec") -> nn.Module:
    """What evaluation embeds with: an ``OpenClipSpec`` as an ``OpenClipModel``, else a saved CCRK
    model (a model directory or a training checkpoint); eval mode."""
    if isinstance(model, OpenClipSpec):
        return OpenClipModel(model)
    return load_model(model).eval()
