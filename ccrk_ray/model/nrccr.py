"""The NRCCR model (ACM MM 2022, "Cross-Lingual Cross-Modal Retrieval with Noise-Robust Learning"),
a family of its own beside CCRK's, with the same save/load round trip.

Text side (one encoder for every view of a caption):
- a multilingual transformers encoder (mBERT by default, any HF encoder), its embeddings and the
  layers not listed in ``train_layers`` frozen (the reference fine-tunes layers 3–11 of mBERT for
  images, 5–11 for videos);
- a shared head: input projection (LayerNorm, dropout, linear, ReLU), learned positions, one
  attention layer. Each view (source, translation, back-translation) attends to itself; the cross
  view lets the source's tokens attend to the translation's (no residual, as the reference) and is
  pooled together with the translation's projected tokens.
- masked mean pooling (the reference averages padding positions too, which makes a caption's
  embedding depend on the longest caption of its batch; we average real tokens only).

Item side, per ``visual``: ``frames`` (precomputed frame features: projection, positions,
attention layers, masked mean), ``vector`` (a precomputed image feature: linear + ReLU) or ``clip``
(a frozen timm image tower, e.g. a CLIP ViT, then a trainable linear layer).

Both sides are mapped into the common space by their own linear → BatchNorm → dropout (Xavier
initialised) and L2-normalised. The language discriminator of the adversarial term is part of
the model (``discriminator``) but has its own optimiser.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

from ccrk_ray.model.encoders import build_text_encoder, build_vision_encoder, vision_mean_std
from ccrk_ray.model.pretrained import Pretrained, offline_text_config

FAMILY = "nrccr"
VISUALS = ("frames", "vector", "clip")
DISCRIMINATORS = ("weak", "not-so-weak", "strong")
IMAGE_TRAIN_LAYERS = list(range(3, 12))       # the reference's layer_list for Multi30K / MSCOCO
VIDEO_TRAIN_LAYERS = list(range(5, 12))       # ... and for VATEX / MSR-VTT-CN


@dataclass
class NRCCRConfig:
    text_name_or_path: str | None = "bert-base-multilingual-cased"
    text_pretrained: bool = True
    text_config: dict[str, Any] = field(default_factory=dict)
    train_layers: list[int] | None = field(default_factory=lambda: list(IMAGE_TRAIN_LAYERS))  # None: all
    text_hidden: int = 768              # width of the shared text head
    text_heads: int = 8
    key_query_size: int = 512           # the reference's query/key width, split over the heads
    text_max_positions: int = 250
    visual: str = "vector"
    visual_dim: int = 2048              # precomputed feature width (frames / vector)
    video_hidden: int = 1024
    video_heads: int = 8
    video_layers: int = 1
    max_frames: int = 80
    clip_name: str | None = None        # timm image tower for visual="clip"
    clip_pretrained: bool = False
    clip_checkpoint: str | None = None
    clip_kwargs: dict[str, Any] = field(default_factory=dict)
    common_dim: int = 1536
    dropout: float = 0.2
    discriminator: str = "not-so-weak"
    image_mean: list[float] | None = None
    image_std: list[float] | None = None

    def __post_init__(self):
        if self.visual not in VISUALS:
            raise ValueError(f"visual must be one of {', '.join(VISUALS)}, got {self.visual!r}")
        if self.discriminator not in DISCRIMINATORS:
            raise ValueError(f"discriminator must be one of {', '.join(DISCRIMINATORS)}, got {self.discriminator!r}")
        if self.visual == "clip" and not self.clip_name:
            raise ValueError("visual 'clip' needs clip_name (a timm image model)")
        for name in ("text_hidden", "text_heads", "key_query_size", "video_hidden", "video_heads", "common_dim",
                     "visual_dim", "max_frames", "text_max_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.video_layers < 1:
            raise ValueError(f"video_layers must be >= 1, got {self.video_layers}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NRCCRConfig":
        d = {k: v for k, v in d.items() if k != "family"}
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown NRCCR model config key(s): {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {"family": FAMILY, **dataclasses.asdict(self)}


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real positions (``mask`` B×L, 1 = real) of B×L×h states."""
    m = mask.to(states.dtype).unsqueeze(-1)
    return (states * m).sum(1) / m.sum(1).clamp(min=1.0)


class InputProjection(nn.Module):
    """LayerNorm → dropout → linear → ReLU, token-wise (the reference's ``LinearLayer``)."""

    def __init__(self, d_in: int, d_out: int, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        self.drop = nn.Dropout(dropout)
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.linear(self.drop(self.norm(x))))


class LearnedPositions(nn.Module):
    """Add a learned position embedding, then LayerNorm and dropout."""

    def __init__(self, max_positions: int, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(max_positions, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.embed.num_embeddings:
            raise ValueError(f"sequence of {x.shape[1]} positions, the model has {self.embed.num_embeddings}")
        return self.drop(self.norm(x + self.embed(torch.arange(x.shape[1], device=x.device))))


class AttentionLayer(nn.Module):
    """One multi-head attention layer as the reference's ``BertAttention``: queries and keys of
    ``key_query_size`` split over the heads, values of the hidden width, scores scaled by
    √(hidden / heads); the output's dense + dropout + LayerNorm adds the query back (residual)
    except in cross mode."""

    def __init__(self, hidden: int, heads: int, key_query_size: int = 512, dropout: float = 0.1):
        super().__init__()
        if hidden % heads or key_query_size % heads:
            raise ValueError(f"hidden {hidden} and key/query size {key_query_size} must be multiples of {heads} heads")
        self.heads, self.scale = heads, math.sqrt(hidden / heads)
        self.query, self.key = nn.Linear(hidden, key_query_size), nn.Linear(hidden, key_query_size)
        self.value = nn.Linear(hidden, hidden)
        self.attn_drop = nn.Dropout(dropout)
        self.dense, self.out_drop, self.norm = nn.Linear(hidden, hidden), nn.Dropout(dropout), nn.LayerNorm(hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, context: torch.Tensor, query_mask: torch.Tensor,
                context_mask: torch.Tensor, cross: bool = False) -> torch.Tensor:
        scores = self._split(self.query(query)) @ self._split(self.key(context)).transpose(-1, -2) / self.scale
        allowed = (query_mask.unsqueeze(2) * context_mask.unsqueeze(1)).unsqueeze(1).to(scores.dtype)   # B×1×Lq×L
        probs = self.attn_drop(torch.softmax(scores + (1.0 - allowed) * -10000.0, dim=-1))
        out = (probs @ self._split(self.value(context))).transpose(1, 2).flatten(2)
        out = self.out_drop(self.dense(out))
        return self.norm(out if cross else out + query)


class TextViews(NamedTuple):
    """Pooled text features of one batch (before the common-space mapping) and the encoder's token
    states of source and translation (the discriminator's input)."""
    source: torch.Tensor
    translation: torch.Tensor
    cross: torch.Tensor
    back: torch.Tensor
    source_states: torch.Tensor
    translation_states: torch.Tensor


class Embeddings(NamedTuple):
    """Common-space (L2-normalised) embeddings of one training batch."""
    item: torch.Tensor
    source: torch.Tensor
    translation: torch.Tensor
    cross: torch.Tensor
    back: torch.Tensor
    source_states: torch.Tensor
    translation_states: torch.Tensor
    source_mask: torch.Tensor
    translation_mask: torch.Tensor


class SharedTextHead(nn.Module):
    def __init__(self, d_in: int, cfg: NRCCRConfig):
        super().__init__()
        self.project = InputProjection(d_in, cfg.text_hidden)
        self.positions = LearnedPositions(cfg.text_max_positions, cfg.text_hidden)
        self.attention = AttentionLayer(cfg.text_hidden, cfg.text_heads, cfg.key_query_size)

    def tokens(self, states: torch.Tensor) -> torch.Tensor:
        return self.positions(self.project(states))

    def pooled(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(self.attention(tokens, tokens, mask, mask), mask)

    def cross(self, source: torch.Tensor, source_mask: torch.Tensor, translation: torch.Tensor,
              translation_mask: torch.Tensor) -> torch.Tensor:
        attended = self.attention(source, translation, source_mask, translation_mask, cross=True)
        return masked_mean(torch.cat([attended, translation], 1), torch.cat([source_mask, translation_mask], 1))


class FrameEncoder(nn.Module):
    """Precomputed frame features B×T×D (mask B×T) → projection, positions, attention, masked mean."""

    def __init__(self, cfg: NRCCRConfig):
        super().__init__()
        self.project = InputProjection(cfg.visual_dim, cfg.video_hidden)
        self.positions = LearnedPositions(cfg.max_frames, cfg.video_hidden)
        self.layers = nn.ModuleList(AttentionLayer(cfg.video_hidden, cfg.video_heads, cfg.key_query_size)
                                    for _ in range(cfg.video_layers))
        self.out_dim = cfg.video_hidden

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.positions(self.project(frames))
        for layer in self.layers:
            x = layer(x, x, mask, mask)
        return masked_mean(x, mask)


class VectorEncoder(nn.Module):
    """A precomputed image feature B×D → ReLU(linear)."""

    def __init__(self, cfg: NRCCRConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.visual_dim, cfg.visual_dim)
        self.out_dim = cfg.visual_dim

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.relu(self.proj(features))


class FrozenTowerEncoder(nn.Module):
    """Pixels → a frozen timm image tower (no gradient, eval mode always) → a trainable linear layer."""

    def __init__(self, cfg: NRCCRConfig):
        super().__init__()
        self.tower = build_vision_encoder(cfg.clip_name, pretrained=cfg.clip_pretrained,
                                          checkpoint_path=cfg.clip_checkpoint, **cfg.clip_kwargs)
        self.tower.requires_grad_(False)
        self.proj = nn.Linear(self.tower.num_features, cfg.visual_dim)
        self.out_dim = cfg.visual_dim

    def train(self, mode: bool = True):
        super().train(mode)
        self.tower.eval()
        return self

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            feats = self.tower(pixels)
        return self.proj(feats.float())


def normalise_pixels(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 B×3×H×W (as the data pipeline delivers them) → the tower's normalised floats; float
    input is taken as already normalised."""
    if pixels.dtype != torch.uint8:
        return pixels
    m = torch.tensor(mean, device=pixels.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=pixels.device).view(1, -1, 1, 1)
    return (pixels.float() / 255.0 - m) / s


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are the global batch's when a process group of more
    than one rank runs (every rank's rows all-gathered with gradients; ranks hold equal batches), as
    one process with the whole batch would have them. ``SyncBatchNorm`` does this on GPUs only;
    this works on CPU (gloo) too. Otherwise, and in eval mode, it is BatchNorm1d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        n, rank = x.shape[0], dist.get_rank()
        with warnings.catch_warnings():     # the autograd-aware gather is deprecated, still public (torch 2.14)
            warnings.simplefilter("ignore", FutureWarning)
            full = torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)
        return super().forward(full)[rank * n:(rank + 1) * n]


class CommonSpace(nn.Module):
    """Linear → BatchNorm (over the global batch) → dropout, Xavier-uniform initialised, then L2
    normalisation."""

    def __init__(self, d_in: int, d_out: int, dropout: float):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.bn = GlobalBatchNorm1d(d_out)
        self.drop = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.drop(self.bn(self.linear(x))), dim=-1)


class ResBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv1d(hidden, hidden, 5, padding=2)
        self.conv2 = nn.Conv1d(hidden, hidden, 5, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.3 * self.conv2(F.relu(self.conv1(F.relu(x))))


class LanguageDiscriminator(nn.Module):
    """Source sentence or translation? Token states B×L×h (mask B×L) → B×2 logits, as the
    reference's sentence-level discriminators: ``weak`` (linear), ``not-so-weak`` (MLP 256-128,
    tanh) on the mean of the tokens, ``strong`` (1-d convolutions over the tokens, then the mean,
    then linear)."""

    def __init__(self, kind: str, hidden: int, classes: int = 2):
        super().__init__()
        if kind not in DISCRIMINATORS:
            raise ValueError(f"discriminator must be one of {', '.join(DISCRIMINATORS)}, got {kind!r}")
        self.kind = kind
        self.tokens = (nn.Sequential(nn.Conv1d(hidden, 128, 1), ResBlock(128), ResBlock(128), ResBlock(128))
                       if kind == "strong" else None)
        width = 128 if kind == "strong" else hidden
        self.head = (nn.Sequential(nn.Linear(width, 256), nn.Tanh(), nn.Linear(256, 128), nn.Tanh(),
                                   nn.Linear(128, classes))
                     if kind == "not-so-weak" else nn.Linear(width, classes))

    def forward(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if states.dim() != 3:
            raise ValueError(f"token states must be B×L×h, got {tuple(states.shape)}")
        if self.tokens is not None:
            states = self.tokens(states.transpose(1, 2)).transpose(1, 2)
        pooled = states.mean(1) if mask is None else masked_mean(states, mask)
        return self.head(pooled)


class NRCCRModel(Pretrained, nn.Module):
    family = FAMILY
    config_class = NRCCRConfig

    def __init__(self, config: NRCCRConfig):
        super().__init__()
        self.config = config
        pretrained = bool(config.text_name_or_path) and config.text_pretrained
        self.text = build_text_encoder(config.text_name_or_path, pretrained=pretrained, config=config.text_config)
        width = self.text.config.hidden_size
        self.text_head = SharedTextHead(width, config)
        self.visual = {"frames": FrameEncoder, "vector": VectorEncoder, "clip": FrozenTowerEncoder}[config.visual](config)
        self.item_map = CommonSpace(self.visual.out_dim, config.common_dim, config.dropout)
        self.text_map = CommonSpace(config.text_hidden, config.common_dim, config.dropout)
        self.discriminator = LanguageDiscriminator(config.discriminator, width)
        self.freeze_text(config.train_layers)
        if config.visual == "clip":
            mean, std = vision_mean_std(self.visual.tower)
            self.image_mean = tuple(config.image_mean or mean)
            self.image_std = tuple(config.image_std or std)

    def freeze_text(self, train_layers: list[int] | None) -> None:
        """Freeze the text encoder except its layers ``train_layers`` (None: train all of it; the
        embeddings are frozen whenever a list is given)."""
        self.text.requires_grad_(train_layers is None)
        if train_layers is None:
            return
        n = self.text.config.num_hidden_layers
        bad = [i for i in train_layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"train_layers {bad} outside the text encoder's {n} layers")
        for name, param in self.text.named_parameters():
            if any(f".layer.{i}." in f".{name}" for i in train_layers):
                param.requires_grad_(True)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """What the main optimiser steps: every trainable parameter except the discriminator's."""
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("discriminator.")]

    # -- text -------------------------------------------------------------------------------
    def _states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids=ids, attention_mask=mask).last_hidden_state

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Common-space embeddings of captions (any language; the evaluation path)."""
        return self.text_map(self.text_head.pooled(self.text_head.tokens(self._states(ids, mask)), mask))

    def text_views(self, source: tuple[torch.Tensor, torch.Tensor], translation: tuple[torch.Tensor, torch.Tensor],
                   back: tuple[torch.Tensor, torch.Tensor]) -> TextViews:
        (s_ids, s_mask), (t_ids, t_mask), (b_ids, b_mask) = source, translation, back
        s_states, t_states = self._states(s_ids, s_mask), self._states(t_ids, t_mask)
        s_tok, t_tok = self.text_head.tokens(s_states), self.text_head.tokens(t_states)
        b_tok = self.text_head.tokens(self._states(b_ids, b_mask))
        return TextViews(source=self.text_head.pooled(s_tok, s_mask), translation=self.text_head.pooled(t_tok, t_mask),
                         cross=self.text_head.cross(s_tok, s_mask, t_tok, t_mask),
                         back=self.text_head.pooled(b_tok, b_mask), source_states=s_states,
                         translation_states=t_states)

    # -- items ------------------------------------------------------------------------------
    def encode_item(self, visual: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Common-space embeddings of items: frame features B×T×D with mask B×T, image features
        B×D (or B×1×D, as the data pipeline holds them), or pixels B×3×H×W (uint8 from the pipeline,
        normalised here with the tower's mean/std), per ``config.visual``."""
        if self.config.visual == "vector" and visual.dim() == 3:
            visual = visual[:, 0]
        if self.config.visual == "frames" and mask is None:
            mask = torch.ones(visual.shape[:2], dtype=torch.long, device=visual.device)
        if self.config.visual == "clip":
            visual = normalise_pixels(visual, self.image_mean, self.image_std)
        return self.item_map(self.visual(visual, mask))

    def forward(self, visual: torch.Tensor, visual_mask: torch.Tensor | None, source, translation, back) -> Embeddings:
        """One training batch: items and the three views of each item's caption (``(ids, mask)`` each)."""
        views = self.text_views(source, translation, back)
        # each view through the mapping on its own (its own BatchNorm statistics), as the reference
        mapped = [self.text_map(v) for v in (views.source, views.translation, views.cross, views.back)]
        return Embeddings(self.encode_item(visual, visual_mask), *mapped, views.source_states,
                          views.translation_states, source[1], translation[1])

    # -- save / load ------------------------------------------------------------------------
    def frozen_config(self) -> dict[str, Any]:
        """Config that rebuilds this architecture offline: no pretrained loading, full text config."""
        d = self.config.to_dict()
        text_cfg = offline_text_config(self.text)
        d.update(text_name_or_path=None, text_pretrained=False, text_config=text_cfg, clip_pretrained=False,
                 clip_checkpoint=None)
        if self.config.visual == "clip":
            d.update(image_mean=list(self.image_mean), image_std=list(self.image_std))
        return d
