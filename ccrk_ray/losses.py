"""Contrastive objectives of CCRK as pure tensor math (no Ray, no model).

Conventions: features are L2-normalised by the caller. Text features of a batch of N images with K
captions each are ordered *image-major*: the K captions of image 0, then the K of image 1, ...
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TEMPERATURE_MIN = 0.001
TEMPERATURE_MAX = 0.5
TEMPERATURE_INIT = 0.07


def captions_per_image(num_images: int, num_texts: int) -> int:
    """K = text rows / image rows, with an error when it is not a whole positive number."""
    if num_images <= 0:
        raise ValueError(f"need at least one image, got {num_images}")
    if num_texts % num_images != 0 or num_texts == 0:
        raise ValueError(
            f"text rows ({num_texts}) are not a whole multiple of image rows ({num_images}); "
            "1-to-K needs K captions per image, ordered image-major"
        )
    return num_texts // num_images


def one_to_k_contrastive(image_feat: torch.Tensor, text_feat: torch.Tensor,
                         temperature: torch.Tensor | float) -> torch.Tensor:
    """1-to-K contrastive loss (CCRK ITC).

    ``image_feat`` N×d, ``text_feat`` (N·K)×d image-major. logits = image_feat @ text_featᵀ / τ.
    Y (N × N·K) is 1 where a caption belongs to the image. Image→text: each image row is a
    softmax over all N·K captions, with all K own captions as positives of equal weight
    (loss_i2t = mean over rows of −Σ_j Y_ij log softmax_j). Text→image: each caption column is a
    softmax over the N images (loss_t2i = mean over columns of −log softmax at its image).
    Result = (loss_i2t + loss_t2i) / 2 / K, so K = 1 is the symmetric CLIP InfoNCE.
    """
    if image_feat.dim() != 2 or text_feat.dim() != 2 or image_feat.shape[1] != text_feat.shape[1]:
        raise ValueError(f"need N×d image and (N·K)×d text features, got {tuple(image_feat.shape)} "
                         f"and {tuple(text_feat.shape)}")
    n = image_feat.shape[0]
    k = captions_per_image(n, text_feat.shape[0])
    logits = image_feat @ text_feat.t() / temperature            # N × N·K
    owner = torch.arange(n, device=logits.device).repeat_interleave(k)  # image of each caption
    targets = (owner.unsqueeze(0) == torch.arange(n, device=logits.device).unsqueeze(1)).to(logits.dtype)
    loss_i2t = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t2i = F.cross_entropy(logits.t(), owner)                # mean over the N·K columns
    return (loss_i2t + loss_t2i) / 2 / k
