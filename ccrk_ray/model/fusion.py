"""Fusion layers (CCLM / X-VLM design): text tokens attend to themselves, then to image tokens by
cross-attention, then a feed-forward block; post-LayerNorm like BERT/XLM-R.

When the text encoder is a pre-trained BERT-family model (XLM-R, BERT, RoBERTa), each fusion
layer's self-attention and feed-forward weights are copied from one of that model's upper
layers (``FusionLayer.from_hf_layer``); cross-attention always starts fresh.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Parameter names of a fusion layer that never come from a pre-trained text layer.
FRESH_PREFIXES = ("cross_attn.", "cross_norm.")


class FusionLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float = 1e-12, dropout: float = 0.0,
                 kv_dim: int | None = None):
        """``kv_dim``: width of the image tokens the cross-attention reads (default ``hidden``)."""
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} attention heads")
        self.self_attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.self_norm = nn.LayerNorm(hidden, eps=eps)
        kv_dim = kv_dim or hidden
        self.cross_attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True,
                                                kdim=kv_dim, vdim=kv_dim)
        self.cross_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn_in = nn.Linear(hidden, intermediate)
        self.ffn_out = nn.Linear(intermediate, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor,
                image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``text`` B×L×h with ``text_mask`` B×L (1 = token), ``image`` B×T×h (``image_mask`` B×T)."""
        pad = text_mask == 0
        h = self.self_norm(text + self.dropout(self.self_attn(text, text, text, key_padding_mask=pad,
                                                              need_weights=False)[0]))
        img_pad = None if image_mask is None else image_mask == 0
        h = self.cross_norm(h + self.dropout(self.cross_attn(h, image, image, key_padding_mask=img_pad,
                                                             need_weights=False)[0]))
        return self.ffn_norm(h + self.dropout(self.ffn_out(F.gelu(self.ffn_in(h)))))

    @torch.no_grad()
    def load_hf_layer(self, layer: nn.Module) -> None:
        """Copy self-attention and feed-forward weights from a BERT-family layer
        (``attention.self.{query,key,value}``, ``attention.output.{dense,LayerNorm}``,
        ``intermediate.dense``, ``output.{dense,LayerNorm}``)."""
        try:
            att = layer.attention
            q, k, v = att.self.query, att.self.key, att.self.value
            pairs = [(self.self_attn.out_proj, att.output.dense), (self.self_norm, att.output.LayerNorm),
                     (self.ffn_in, layer.intermediate.dense), (self.ffn_out, layer.output.dense),
                     (self.ffn_norm, layer.output.LayerNorm)]
        except AttributeError as exc:
            raise ValueError(f"cannot initialise fusion layers from {type(layer).__name__}: not a BERT-family "
                             f"layer ({exc})") from None
        self.self_attn.in_proj_weight.copy_(torch.cat([q.weight, k.weight, v.weight], dim=0))
        self.self_attn.in_proj_bias.copy_(torch.cat([q.bias, k.bias, v.bias], dim=0))
        for ours, theirs in pairs:
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)


class ITMHead(nn.Module):
    """2-way image–text matching head on the fused first token (X-VLM's MLP: its LayerNorm keeps
    PyTorch's default eps 1e-5 whatever the text model's)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.LayerNorm(2 * hidden), nn.GELU(),
                                 nn.Linear(2 * hidden, 2))

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.net(fused[:, 0])


class MLMHead(nn.Module):
    """Masked-token prediction head whose output matrix is tied to the word embeddings."""

    def __init__(self, word_embeddings: nn.Embedding, eps: float = 1e-12):
        super().__init__()
        hidden = word_embeddings.embedding_dim
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.word_embeddings = word_embeddings      # shared module: weights tied, not copied
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(fused))), self.word_embeddings.weight, self.bias)

    @torch.no_grad()
    def load_pretrained(self, dense: nn.Linear, norm: nn.LayerNorm, bias: nn.Parameter) -> None:
        """Take a pre-trained masked-LM head's transform and output bias (its decoder is the tied
        word embeddings here too)."""
        self.dense.load_state_dict(dense.state_dict())
        self.norm.load_state_dict(norm.state_dict())
        self.norm.eps = norm.eps
        self.bias.copy_(bias)
