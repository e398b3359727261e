"""The one place where features cross process boundaries.

``gather_with_grad`` concatenates a tensor from every rank (rank order) with gradients flowing back
to each rank's own slice. When every rank then computes the same global loss, each rank's local
gradient is world_size × dL/dx, which DDP's gradient averaging turns into the exact gradient of the
global-batch loss.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # Deprecated in favour of a private API (torch.distributed._functional_collectives) but
        # still the public autograd-aware gather in torch 2.4 ... 2.14; keep the logs clean.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x), dim=0)
