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
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

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


def pretrained_mlm_head(model: nn.Module) -> dict[str, nn.Module | nn.Parameter]:
    """The transform (dense, norm) and output bias of a masked-LM model's head: RoBERTa / XLM-R's
    ``lm_head``, BERT's ``cls.predictions``."""
    if hasattr(model, "lm_head") and hasattr(model.lm_head, "dense"):
        head = model.lm_head
        return {"dense": head.dense, "norm": head.layer_norm, "bias": head.bias}
    predictions = getattr(getattr(model, "cls", None), "predictions", None)
    if predictions is not None:
        return {"dense": predictions.transform.dense, "norm": predictions.transform.LayerNorm,
                "bias": predictions.bias}
    raise ValueError(f"{type(model).__name__} has no RoBERTa/BERT MLM head to start the MLM head from")


def build_text_encoder(name_or_path: str | None = None, pretrained: bool = True,
                       config: Mapping[str, Any] | None = None,
                       with_mlm_head: bool = False) -> nn.Module | tuple[nn.Module, dict[str, Any]]:
    """A transformers encoder without its pooler; ``.config.hidden_size`` is its width.
    ``with_mlm_head`` (pre-trained only): ``(encoder, pretrained_mlm_head(...))`` from one load of
    the masked-LM checkpoint."""
    overrides = dict(config or {})
    if with_mlm_head:
        if not (name_or_path and pretrained):
            raise ValueError("an MLM head from the pre-trained text model needs a pre-trained text model")
        mlm = AutoModelForMaskedLM.from_pretrained(name_or_path, trust_remote_code=False, **overrides)
        head = pretrained_mlm_head(mlm)
        model = mlm.base_model
        if getattr(model, "pooler", None) is not None:
            model.pooler = None
        return model, head
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
