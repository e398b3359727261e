"""Encoder factories: one code path for tiny configs and real pretrained names/paths.

Vision: any ``timm.create_model`` name plus kwargs. ``pretrained`` weights come from a local file
when ``checkpoint_path`` is given (never downloaded in tests), or from timm's hub when
``pretrained=True`` alone.
Text: any transformers encoder, by HF name or local path (``from_pretrained``), or built from a
config dict (``{"model_type": "xlm-roberta", "hidden_size": 128, ...}``), optionally on top of a
named config (name + ``pretrained=False`` = that architecture, freshly initialised).
"""

from __future__ import annotations

from typing import Any, Mapping

import timm
import timm.data
from torch import nn
from transformers import AutoConfig, AutoModel

from ccrk_ray.core.config import ConfigError

HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


def check_vision_model(name: str, flag: str = "model.vision_name") -> None:
    """Fail before Ray starts on a vision model name timm does not know (hub names pass)."""
    if not name.startswith(HUB_PREFIXES) and not timm.is_model(name):
        raise ConfigError(f"{flag} {name!r} is not a timm model (see timm.list_models())")


def build_vision_encoder(name: str, pretrained: bool = False, checkpoint_path: str | None = None,
                         **kwargs: Any) -> nn.Module:
    """A timm model that returns pooled features (``num_classes=0``); ``.num_features`` is its width."""
    kwargs = dict(kwargs)
    kwargs.setdefault("num_classes", 0)
    if checkpoint_path:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(checkpoint_path))
        pretrained = True
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:  # timm raises RuntimeError for unknown names
        if "Unknown model" in str(exc):
            raise ValueError(f"unknown timm vision model {name!r}") from None
        raise


def vision_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean/std the timm model was (pre)trained with (ImageNet's when unknown)."""
    cfg = timm.data.resolve_model_data_config(model)
    return tuple(cfg["mean"]), tuple(cfg["std"])


def build_text_encoder(name_or_path: str | None = None, pretrained: bool = True,
                       config: Mapping[str, Any] | None = None) -> nn.Module:
    """A transformers encoder without its pooler; ``.config.hidden_size`` is its width."""
    overrides = dict(config or {})
    if name_or_path and pretrained:
        model = AutoModel.from_pretrained(name_or_path, trust_remote_code=False, **overrides)
    else:
        if name_or_path:
            cfg = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False, **overrides)
        else:
            if "model_type" not in overrides:
                raise ValueError("text encoder needs a name/path or a config with 'model_type'")
            model_type = overrides.pop("model_type")
            cfg = AutoConfig.for_model(model_type, **overrides)
        model = AutoModel.from_config(cfg)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # unused: we take the first token; an unused pooler breaks DDP
    return model
