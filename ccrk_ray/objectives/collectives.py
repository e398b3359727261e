"""The one place where tensors cross process boundaries: features for the global-batch losses,
and the small integers the training loop agrees on (stop together, step counts, ids).

``gather_with_grad`` concatenates a tensor from every rank (rank order) with gradients flowing back
to each rank's own slice. When every rank then computes the same global loss, each rank's local
gradient is world_size × dL/dx, which DDP's gradient averaging turns into the exact gradient of the
global-batch loss.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x

    with warnings.catch_warnings():
        # Deprecated in favour of a private API (torch.distributed._functional_collectives) but
        # still the public autograd-aware gather in torch 2.4 ... 2.14; keep the logs clean.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x), dim=0)


class _GatherLocalGrad(torch.autograd.Function):
    """All-gather whose backward keeps only this rank's slice of its own gradient (no sum over ranks)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.start, ctx.stop = rank() * x.shape[0], (rank() + 1) * x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad[ctx.start:ctx.stop]


def gather_local_grad(x: torch.Tensor) -> torch.Tensor:
    """The gather of the CCLM / X-VLM / CCRK reference code (its ``AllGather``): each rank's
    gradient reaches only its own slice from its own loss, so after DDP's averaging the encoders
    get 1/world_size of the global-batch ITC gradient (MITM and CMLM, computed locally, keep
    theirs). ``ITC_GRADIENTS["reference"]``, to reproduce the paper's loss balance."""
    if world_size() == 1:
        return x
    return _GatherLocalGrad.apply(x)


# How ITC features cross ranks: "exact" (the global-batch gradient) or "reference" (the CCRK code's)
ITC_GRADIENTS = {"exact": gather_with_grad, "reference": gather_local_grad}


def _int_tensor(value: int) -> torch.Tensor | None:
    """``value`` as a 1-element tensor on the device the process group communicates on (NCCL
    needs CUDA tensors), or None when there is no group of more than one process."""
    if world_size() == 1:
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return torch.tensor([value], dtype=torch.int64, device=device)


def all_min(value: int) -> int:
    """The smallest ``value`` over the ranks (every rank stops together when one runs dry)."""
    t = _int_tensor(value)
    if t is None:
        return value
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


def broadcast_int(value: int) -> int:
    """Rank 0's ``value`` on every rank."""
    t = _int_tensor(value)
    if t is None:
        return value
    dist.broadcast(t, src=0)
    return int(t)


def all_gather_int(value: int) -> list[int]:
    """Every rank's ``value``, in rank order."""
    t = _int_tensor(value)
    if t is None:
        return [value]
    out = [torch.zeros_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return [int(x) for x in out]


def all_gather_floats(values: list[float]) -> list[list[float]]:
    """Every rank's list of ``values`` (the same length on every rank), in rank order."""
    if world_size() == 1:
        return [list(values)]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.zeros_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return [x.tolist() for x in out]


def average_gradients(params) -> None:
    """Average the ``.grad`` of ``params`` over the ranks (in place): what DDP does for a module it
    wraps, for one kept outside it (NRCCR's discriminator, stepped on its own)."""
    if world_size() == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world_size()
