"""Mixed-precision names, for training and embedding alike.

open_clip's names mean what they mean there: ``amp`` / ``amp_fp16`` (autocast to float16; in
training with a gradient scaler, so that small gradients do not underflow — what V100/T4 GPUs
need) and ``amp_bf16`` (autocast to bfloat16, no scaler needed). Ours stay as aliases: ``bf16`` is
autocast to bfloat16 (open_clip's ``amp_bf16``) and ``fp16`` autocast to float16 (open_clip's
``amp``); the weights stay float32 in every mode (open_clip's ``pure_*`` modes are not offered).
"""

from __future__ import annotations

AUTOCAST = {"fp32": None, "amp_bf16": "bfloat16", "bf16": "bfloat16", "amp": "float16", "amp_fp16": "float16",
            "fp16": "float16"}
PRECISIONS = tuple(AUTOCAST)


def autocast_dtype(precision: str) -> str | None:
    """The torch dtype name autocast runs in (None: float32 throughout)."""
    if precision not in AUTOCAST:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return AUTOCAST[precision]


def uses_grad_scaler(precision: str) -> bool:
    """Whether training in ``precision`` scales the loss (float16 autocast)."""
    return autocast_dtype(precision) == "float16"
