"""The save/load round trip every model family shares (Hugging Face's ``save_pretrained`` /
``from_pretrained``): ``DIR/config.json`` (the architecture, buildable offline) and
``DIR/model.safetensors`` (the weights; no pickle)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_model
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# Keys of a transformers config that describe where it came from, not the architecture.
_TEXT_CONFIG_PROVENANCE = ("transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype")


def offline_text_config(text_model: nn.Module) -> dict[str, Any]:
    """A text encoder's full transformers config, to rebuild it with no name, path or download."""
    cfg = text_model.config.to_dict()
    for key in _TEXT_CONFIG_PROVENANCE:
        cfg.pop(key, None)
    return cfg


class Pretrained:
    """Mixin of an ``nn.Module`` built from ``config_class`` (``from_dict``) whose ``frozen_config()``
    rebuilds it offline; ``family`` names it in errors."""

    config_class: type
    family: str

    def save_pretrained(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(json.dumps(self.frozen_config(), indent=2, sort_keys=True))
        save_model(self, str(out / WEIGHTS_NAME))
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu"):
        """The saved model, in eval mode (as Hugging Face's ``from_pretrained``); ``.train()`` to train."""
        d = Path(directory)
        if not (d / CONFIG_NAME).is_file() or not (d / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{d} is not a saved {cls.family.upper()} model (needs {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME})")
        model = cls(cls.config_class.from_dict(json.loads((d / CONFIG_NAME).read_text())))
        load_model(model, str(d / WEIGHTS_NAME), device=map_location)
        return model.eval()
