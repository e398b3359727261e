"""The CCRK model (CCLM / X-VLM design) and its save/load round trip.

- a timm vision encoder giving a pooled token plus patch tokens;
- a transformers text encoder whose first ``text_layers`` layers encode text alone;
- ``fusion_layers`` fusion layers in which text attends to image tokens (cross-attention),
  initialised from the text model's upper layers (self-attention, feed-forward);
- heads: image/text projections to the shared space (ITC), a 2-way matching head (ITM) and an
  MLM head tied to the word embeddings (CMLM). With ``fusion_layers=0`` the model is a plain dual
  encoder (ITC only), which is what the demo trains.

``save_pretrained(dir)`` writes ``config.json`` (everything needed to rebuild the architecture
offline, including the text encoder's full HF config) and ``model.safetensors``;
``CCRKModel.from_pretrained(dir)`` rebuilds and loads them without any download or pickle.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ccrk_ray.model.encoders import build_text_encoder, build_vision_encoder, vision_mean_std
from ccrk_ray.model.fusion import FRESH_PREFIXES, FusionLayer, ITMHead, MLMHead
from ccrk_ray.model.pretrained import Pretrained, offline_text_config

# The learned ITC temperature starts at TEMPERATURE_INIT and is clamped to [MIN, MAX] when used.
TEMPERATURE_MIN = 0.001
TEMPERATURE_MAX = 0.5
TEMPERATURE_INIT = 0.07

TEXT_POSITIONS = ("model", "from_zero")



@dataclass
class ModelConfig:
    vision_name: str = "resnet10t"
    vision_pretrained: bool = False
    vision_checkpoint: str | None = None
    vision_kwargs: dict[str, Any] = field(default_factory=dict)
    text_name_or_path: str | None = None
    text_pretrained: bool = True
    text_config: dict[str, Any] = field(default_factory=dict)
    text_layers: int | None = None      # text-only layers (None: all but the fusion layers)
    fusion_layers: int = 0              # cross-attention layers taken from the layers above
    text_layers_from: list[int] | None = None   # the text model's layers to keep, by index: text, then fusion
    cross_proj: bool = True             # project vision tokens to the text width for fusion (False: the
                                        # cross-attention reads the vision width, as CCLM/X-VLM do)
    fusion_dropout: float = 0.0
    text_positions: str = "model"       # "model": the text model's own position ids (XLM-R counts from
                                        # padding_idx + 1); "from_zero": 0..L-1 on every row (CCLM/X-VLM/CCRK)
    image_mean: list[float] | None = None   # pixel normalisation (None: the vision model's own)
    image_std: list[float] | None = None
    embed_dim: int = 256
    temperature: float | None = TEMPERATURE_INIT
    lr_mult: float = 2.0                # LR multiplier of newly initialised parameters
    mlm_head_from_pretrained: bool = False  # start the MLM head from the text model's own (XLM-R lm_head)

    def __post_init__(self):
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")
        # None only in a fine-tuning config: the loaded model keeps its learned temperature
        if self.temperature is not None and not TEMPERATURE_MIN <= self.temperature <= TEMPERATURE_MAX:
            raise ValueError(f"temperature must be in [{TEMPERATURE_MIN}, {TEMPERATURE_MAX}], got {self.temperature}")
        if not self.lr_mult > 0:
            raise ValueError(f"lr_mult must be > 0, got {self.lr_mult}")
        if self.fusion_layers < 0:
            raise ValueError(f"fusion_layers must be >= 0, got {self.fusion_layers}")
        if self.text_positions not in TEXT_POSITIONS:
            raise ValueError(f"text_positions must be one of {', '.join(TEXT_POSITIONS)}, got {self.text_positions!r}")
        if not 0.0 <= self.fusion_dropout < 1.0:
            raise ValueError(f"fusion_dropout must be in [0, 1), got {self.fusion_dropout}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None and (len(value) != 3 or (name == "image_std" and min(value) <= 0)):
                raise ValueError(f"{name} must be 3 numbers (std > 0), got {value}")
        if self.text_layers_from is not None:
            if not self.text_layers_from or len(set(self.text_layers_from)) != len(self.text_layers_from) \
                    or min(self.text_layers_from) < 0:
                raise ValueError(f"text_layers_from must be distinct layer indices >= 0, got {self.text_layers_from}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def pretrained_vision(self) -> bool:
        return self.vision_pretrained or bool(self.vision_checkpoint)

    @property
    def pretrained_text(self) -> bool:
        return bool(self.text_name_or_path) and self.text_pretrained


def layer_split(config: ModelConfig, total: int) -> tuple[int, int]:
    """(text layers, fusion layers) of ``config`` on a text encoder of ``total`` layers; ValueError
    when they do not fit."""
    if config.text_layers_from is not None:
        if max(config.text_layers_from) >= total:
            raise ValueError(f"text_layers_from {config.text_layers_from} names a layer the text encoder's "
                             f"{total} layers do not have")
        total = len(config.text_layers_from)
    n_fusion = config.fusion_layers
    n_text = config.text_layers if config.text_layers is not None else total - n_fusion
    if n_fusion < 0 or n_text < 1 or n_text + n_fusion > total:
        raise ValueError(f"text_layers={n_text} + fusion_layers={n_fusion} do not fit the text encoder's "
                         f"{total} layers")
    return n_text, n_fusion


def _token_layout(features: torch.Tensor, width: int, output_fmt: str | None) -> torch.Tensor:
    """timm ``forward_features`` output → B×T×C tokens (NCHW, NHWC or already B×T×C)."""
    if features.dim() == 3:
        return features
    if features.dim() != 4:
        raise ValueError(f"unexpected vision feature shape {tuple(features.shape)}")
    if output_fmt == "NHWC" or (output_fmt is None and features.shape[-1] == width and features.shape[1] != width):
        return features.flatten(1, 2)
    return features.flatten(2).transpose(1, 2)


class CCRKModel(Pretrained, nn.Module):
    family = "ccrk"
    config_class = ModelConfig

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.temperature is None:
            raise ValueError("temperature must be set to build a model (null only in a fine-tuning config)")
        self.config = config
        self.vision = build_vision_encoder(config.vision_name, pretrained=config.vision_pretrained,
                                           checkpoint_path=config.vision_checkpoint, **config.vision_kwargs)
        pretrained_head = None
        if config.mlm_head_from_pretrained and config.fusion_layers:
            self.text, pretrained_head = build_text_encoder(config.text_name_or_path, pretrained=config.text_pretrained,
                                                            config=config.text_config, with_mlm_head=True)
        else:
            self.text = build_text_encoder(config.text_name_or_path, pretrained=config.text_pretrained,
                                           config=config.text_config)
        text_cfg = self.text.config
        hidden = text_cfg.hidden_size
        self.vision_to_text = None
        self._split_text_layers(config)

        self.vision_proj = nn.Linear(self.vision.num_features, config.embed_dim)
        self.text_proj = nn.Linear(hidden, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(config.temperature)))
        mean, std = vision_mean_std(self.vision)
        mean, std = config.image_mean or mean, config.image_std or std
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        if config.fusion_layers:
            eps = getattr(text_cfg, "layer_norm_eps", 1e-12)
            self.itm_head = ITMHead(hidden)
            self.mlm_head = MLMHead(self.text.get_input_embeddings(), eps)
            if pretrained_head is not None:
                self.mlm_head.load_pretrained(**pretrained_head)

    def _split_text_layers(self, config: ModelConfig) -> None:
        """Keep the text model's first ``text_layers`` layers (of ``text_layers_from`` when given) for
        text alone and turn the next ``fusion_layers`` into fusion layers (their self-attention and
        feed-forward weights carried over, cross-attention fresh)."""
        layers = getattr(getattr(self.text, "encoder", None), "layer", None)
        if layers is None:
            if config.fusion_layers or config.text_layers or config.text_layers_from:
                raise ValueError(f"{type(self.text).__name__} has no encoder.layer list to split into text and "
                                 "fusion layers")
            self.fusion = nn.ModuleList()
            return
        n_text, n_fusion = layer_split(config, len(layers))
        if config.text_layers_from is not None:
            layers = [layers[i] for i in config.text_layers_from]
        cfg = self.text.config
        hidden, vision_width = cfg.hidden_size, self.vision.num_features
        kv_dim = hidden
        if n_fusion and vision_width != hidden:
            if config.cross_proj:
                self.vision_to_text = nn.Linear(vision_width, hidden)
            else:
                kv_dim = vision_width
        fusion = []
        for layer in layers[n_text:n_text + n_fusion]:
            f = FusionLayer(hidden, cfg.num_attention_heads, cfg.intermediate_size,
                            getattr(cfg, "layer_norm_eps", 1e-12), dropout=config.fusion_dropout, kv_dim=kv_dim)
            f.load_hf_layer(layer)
            fusion.append(f)
        self.fusion = nn.ModuleList(fusion)
        self.text.encoder.layer = nn.ModuleList(list(layers)[:n_text])
        self.text.config.num_hidden_layers = n_text

    @property
    def temperature(self) -> torch.Tensor:
        """Learnable temperature, clamped to [0.001, 0.5]."""
        return self.temp.clamp(TEMPERATURE_MIN, TEMPERATURE_MAX)

    @property
    def has_fusion(self) -> bool:
        return len(self.fusion) > 0

    # --- encoders ---------------------------------------------------------------------------
    def normalize_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """uint8 N×3×H×W in [0, 255] → float, normalised with the vision encoder's mean/std.
        Float input is taken as already normalised."""
        if pixel_values.dtype != torch.uint8:
            return pixel_values
        return (pixel_values.float() / 255.0 - self.pixel_mean) / self.pixel_std

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """B×(1+T)×C_vision: the pooled token first, then the patch tokens."""
        features = self.vision.forward_features(self.normalize_pixels(pixel_values))
        pooled = self.vision.forward_head(features, pre_logits=True)
        tokens = _token_layout(features, self.vision.num_features, getattr(self.vision, "output_fmt", None))
        return torch.cat([pooled.unsqueeze(1), tokens], dim=1)

    def image_feature(self, tokens: torch.Tensor) -> torch.Tensor:
        """The normalised ITC feature of the pooled token."""
        return F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image_feature(self.image_tokens(pixel_values))

    def text_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """B×L×h from the text-only layers."""
        kwargs = {}
        if self.config.text_positions == "from_zero":
            kwargs["position_ids"] = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return self.text(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state

    def text_feature(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_feature(self.text_hidden(input_ids, attention_mask))

    def fuse(self, text_hidden: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Text states conditioned on the image through the fusion layers: B×L×h."""
        if not self.has_fusion:
            raise ValueError("this model has no fusion layers (fusion_layers=0): ITM/MLM need them")
        image = self.vision_to_text(image_tokens) if self.vision_to_text is not None else image_tokens
        h = text_hidden
        for layer in self.fusion:
            h = layer(h, text_mask, image)
        return h

    def match_logits(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
        """P image–caption pairs (row i of each input) → P×2 ITM logits (column 1: they match)."""
        hidden = self.text_hidden(input_ids, attention_mask)
        return self.itm_head(self.fuse(hidden, attention_mask, self.image_tokens(pixel_values)))

    def mlm_logits(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """P pairs → P×L×V masked-token logits of each caption position, conditioned on its image."""
        hidden = self.text_hidden(input_ids, attention_mask)
        return self.mlm_head(self.fuse(hidden, attention_mask, self.image_tokens(pixel_values)))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(image features N×d, text features (N·K)×d image-major, temperature) of a 1-to-K batch.

        ``input_ids``/``attention_mask`` are N×K×L (or already flat (N·K)×L).
        """
        if input_ids.dim() == 3:
            input_ids, attention_mask = input_ids.flatten(0, 1), attention_mask.flatten(0, 1)
        return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask), self.temperature

    def input_size(self) -> int | None:
        """The image side the vision encoder is built for, or None when it takes any size (CNNs)."""
        embed = getattr(self.vision, "patch_embed", None)
        size = getattr(embed, "img_size", None)
        if size is None or not getattr(embed, "strict_img_size", True):
            return None
        return int(size[0]) if isinstance(size, (tuple, list)) else int(size)

    def with_image_size(self, image_size: int) -> "CCRKModel":
        """This model for ``image_size`` inputs. A vision encoder built for one size (Swin, ViT) is
        rebuilt for the new one, its resolution-dependent weights resized by timm's own checkpoint
        filter (Swin: the window scaled with the image, 7 at 224 → 12 at 384 as the reference's
        384 configs, relative-position tables interpolated; ViT: position embeddings resampled).
        Same size, or an encoder that takes any size: the model itself, unchanged."""
        old = self.input_size()
        if old is None or old == image_size:
            return self
        kwargs = dict(self.config.vision_kwargs, img_size=image_size)
        window = getattr(getattr(self.vision, "layers", [None])[0], "blocks", [None])[0]
        window = getattr(getattr(window, "attn", None), "window_size", None)
        if window is not None:
            new_window = image_size * int(window[0]) / old
            if new_window != int(new_window):
                raise ValueError(f"{image_size} px does not scale the {old} px model's window {window[0]} to a whole "
                                 "number of patches (Swin: use a multiple of 32 whose window divides the feature maps)")
            kwargs["window_size"] = int(new_window)
        filter_fn = getattr(sys.modules[type(self.vision).__module__], "checkpoint_filter_fn", None)
        vision = build_vision_encoder(self.config.vision_name, **kwargs)
        state = self.vision.state_dict()
        with warnings.catch_warnings():     # timm's interpolation notes internal tensor layouts
            warnings.simplefilter("ignore", UserWarning)
            state = filter_fn(state, vision) if filter_fn is not None else state
        missing, unexpected = vision.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.endswith(("relative_position_index", "attn_mask"))]:
            raise ValueError(f"cannot move {self.config.vision_name} from {old} to {image_size} px: missing {missing}, "
                             f"unexpected {unexpected}")
        self.vision = vision.to(self.vision_proj.weight.device)
        self.config.vision_kwargs = kwargs
        return self

    # --- optimisation -----------------------------------------------------------------------
    def new_parameter_names(self) -> set[str]:
        """Parameters initialised fresh while others come from pre-trained weights (these get
        ``lr_mult``). Empty when nothing is pre-trained: then there is nothing to favour."""
        vision_pre, text_pre = self.config.pretrained_vision, self.config.pretrained_text
        if not (vision_pre or text_pre):
            return set()
        new = set()
        for name, _ in self.named_parameters():
            from_vision = name.startswith("vision.") and vision_pre
            from_text = text_pre and (name.startswith("text.") or (
                name.startswith("fusion.") and not name.split(".", 2)[2].startswith(FRESH_PREFIXES)))
            from_mlm = (name.startswith("mlm_head.") and self.config.mlm_head_from_pretrained and text_pre)
            if not (from_vision or from_text or from_mlm):
                new.add(name)
        return new

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward (less memory, ~30% more compute) in both encoders."""
        if hasattr(self.vision, "set_grad_checkpointing"):
            self.vision.set_grad_checkpointing(enable)
        if not getattr(self.text, "supports_gradient_checkpointing", False):
            return
        kwargs = {"use_reentrant": False}
        if hasattr(self.text, "activation_checkpointing_enable"):     # transformers 5 renamed them
            if enable:
                self.text.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.text.activation_checkpointing_disable()
        elif enable:
            self.text.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            self.text.gradient_checkpointing_disable()

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: (pre-trained | new) × (decayed | not: biases, norms, temperature)."""
        new = self.new_parameter_names()
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            no_decay = p.dim() < 2 or name == "temp"
            groups.setdefault((name in new, no_decay), []).append(p)
        return [{"params": ps, "lr": lr * (self.config.lr_mult if is_new else 1.0),
                 "weight_decay": 0.0 if no_decay else weight_decay}
                for (is_new, no_decay), ps in sorted(groups.items())]

    # --- save / load -------------------------------------------------------------------------
    def frozen_config(self) -> dict[str, Any]:
        """Config that rebuilds this architecture offline: no pretrained loading, full text config."""
        d = self.config.to_dict()
        text_cfg = offline_text_config(self.text)
        n_text = self.text.config.num_hidden_layers
        text_cfg["num_hidden_layers"] = n_text + len(self.fusion)
        d.update(vision_pretrained=False, vision_checkpoint=None, text_name_or_path=None, text_layers_from=None,
                 mlm_head_from_pretrained=False,
                 text_pretrained=False, text_config=text_cfg, text_layers=n_text)
        return d
