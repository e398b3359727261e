"""Training objectives: each turns (model, batch) into a dict of named losses with ``"loss"`` the
total to optimise. The training loop knows nothing else about them.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from ccrk_ray.distributed import gather_with_grad
from ccrk_ray.losses import one_to_k_contrastive


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop padding columns beyond the longest caption of the batch (batches arrive padded to
    the configured max length; most captions are far shorter, and text cost grows with length)."""
    longest = int(attention_mask.sum(dim=-1).max())
    return input_ids[..., :longest], attention_mask[..., :longest]


def one_to_k(model, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CCRK ITC: every image against its K captions at once, negatives over the global batch."""
    input_ids, attention_mask = trim_padding(batch["input_ids"], batch["attention_mask"])
    image_feat, text_feat, temperature = model(batch["pixel_values"], input_ids, attention_mask)
    itc = one_to_k_contrastive(gather_with_grad(image_feat), gather_with_grad(text_feat), temperature)
    return {"loss": itc, "itc": itc, "temperature": temperature.detach()}


OBJECTIVES: dict[str, Callable] = {"one_to_k": one_to_k}


def get_objective(name: str) -> Callable:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]
