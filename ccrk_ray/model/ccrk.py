"""The dual encoder with projections to a shared space, and its save/load round trip.

``save_pretrained(dir)`` writes ``config.json`` (everything needed to rebuild the architecture
offline, including the text encoder's full HF config) and ``model.safetensors``;
``CCRKModel.from_pretrained(dir)`` rebuilds and loads them without any download or pickle.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ccrk_ray.losses import TEMPERATURE_INIT, TEMPERATURE_MAX, TEMPERATURE_MIN
from ccrk_ray.model.encoders import build_text_encoder, build_vision_encoder, text_cls, vision_mean_std

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class ModelConfig:
    vision_name: str = "resnet10t"
    vision_pretrained: bool = False
    vision_checkpoint: str | None = None
    vision_kwargs: dict[str, Any] = field(default_factory=dict)
    text_name_or_path: str | None = None
    text_pretrained: bool = True
    text_config: dict[str, Any] = field(default_factory=dict)
    embed_dim: int = 256
    temperature: float = TEMPERATURE_INIT

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class CCRKModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {config.embed_dim}")
        if not TEMPERATURE_MIN <= config.temperature <= TEMPERATURE_MAX:
            raise ValueError(f"temperature must be in [{TEMPERATURE_MIN}, {TEMPERATURE_MAX}], "
                             f"got {config.temperature}")
        self.config = config
        self.vision = build_vision_encoder(config.vision_name, pretrained=config.vision_pretrained,
                                           checkpoint_path=config.vision_checkpoint, **config.vision_kwargs)
        self.text = build_text_encoder(config.text_name_or_path, pretrained=config.text_pretrained,
                                       config=config.text_config)
        self.vision_proj = nn.Linear(self.vision.num_features, config.embed_dim)
        self.text_proj = nn.Linear(self.text.config.hidden_size, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(config.temperature)))
        mean, std = vision_mean_std(self.vision)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def temperature(self) -> torch.Tensor:
        """Learnable temperature, clamped to [0.001, 0.5]."""
        return self.temp.clamp(TEMPERATURE_MIN, TEMPERATURE_MAX)

    def normalize_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """uint8 N×3×H×W in [0, 255] → float, normalised with the vision encoder's mean/std.
        Float input is taken as already normalised."""
        if pixel_values.dtype != torch.uint8:
            return pixel_values
        return (pixel_values.float() / 255.0 - self.pixel_mean) / self.pixel_std

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_proj(self.vision(self.normalize_pixels(pixel_values))), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_cls(self.text, input_ids, attention_mask)), dim=-1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(image features N×d, text features (N·K)×d image-major, temperature) of a 1-to-K batch.

        ``input_ids``/``attention_mask`` are N×K×L (or already flat (N·K)×L). Everything the loss
        needs comes out of forward so that DDP sees every parameter used in its forward pass.
        """
        if input_ids.dim() == 3:
            input_ids, attention_mask = input_ids.flatten(0, 1), attention_mask.flatten(0, 1)
        return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask), self.temperature

    # --- save / load -------------------------------------------------------------------------
    def frozen_config(self) -> dict[str, Any]:
        """Config that rebuilds this architecture offline: no pretrained loading, full text config."""
        d = self.config.to_dict()
        text_cfg = self.text.config.to_dict()
        for k in ("transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype"):
            text_cfg.pop(k, None)
        d.update(vision_pretrained=False, vision_checkpoint=None, text_name_or_path=None,
                 text_pretrained=False, text_config=text_cfg)
        return d

    def save_pretrained(self, directory: str | Path) -> Path:
        from safetensors.torch import save_model

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(json.dumps(self.frozen_config(), indent=2, sort_keys=True))
        save_model(self, str(out / WEIGHTS_NAME))
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> "CCRKModel":
        from safetensors.torch import load_model

        d = Path(directory)
        if not (d / CONFIG_NAME).is_file() or not (d / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{d} is not a saved CCRK model (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        model = cls(ModelConfig.from_dict(json.loads((d / CONFIG_NAME).read_text())))
        load_model(model, str(d / WEIGHTS_NAME), device=map_location)
        return model
