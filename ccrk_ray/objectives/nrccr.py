"""NRCCR's objective: the weighted sum of its terms over the global batch, and the discriminator's
own loss. Terms (weights as the reference's scripts, ``NRCCR_WEIGHTS``):

- ``triplet``: source caption ↔ item, max-violation triplet summed over the batch;
- ``triplet_translation``: the machine translation ↔ item, the same;
- ``similarity_distillation``: the translation's item↔text similarity distributions follow the
  cross view's (stop-gradient target);
- ``feature_distillation``: SmoothL1 between the translation's and the cross view's features
  (numerically inert at its weight: ~1e-5 for unit vectors against a summed triplet of ~10–100;
  kept, as in the reference);
- ``back_translation``: source ↔ back-translation, the triplet (text–text);
- ``adversarial``: the generator term, translations scored as source sentences by the language
  discriminator.

The embeddings are all-gathered with gradients before the terms (``gather_with_grad``), so every
hardest negative is the global batch's and, once DDP averages the ranks' gradients, the update is
the global-batch one; the adversarial term uses this rank's token states (it is per sentence).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ccrk_ray.model.nrccr import Embeddings
from ccrk_ray.objectives.collectives import gather_with_grad
from ccrk_ray.objectives.losses import (NRCCR_WEIGHTS, discriminator_loss, feature_distillation, generator_loss,
                                        nrccr_triplet, similarity_distillation)


@dataclass
class NRCCRLossConfig:
    weights: dict[str, float] = field(default_factory=lambda: dict(NRCCR_WEIGHTS))
    margin: float = 0.2
    temperature: float = 0.07
    beta: float = 4.0

    def __post_init__(self):
        unknown = sorted(set(self.weights) - set(NRCCR_WEIGHTS))
        if unknown:
            raise ValueError(f"unknown NRCCR loss term(s): {', '.join(unknown)} (known: {', '.join(NRCCR_WEIGHTS)})")
        self.weights = {**NRCCR_WEIGHTS, **self.weights}
        bad = {k: v for k, v in self.weights.items() if v < 0}
        if bad:
            raise ValueError(f"NRCCR loss weights must be >= 0, got {bad}")
        if not any(self.weights.values()):
            raise ValueError("NRCCR loss: every weight is 0, nothing to train")
        if not self.temperature > 0 or self.margin < 0 or not self.beta > 0:
            raise ValueError("NRCCR loss needs temperature > 0, margin >= 0 and beta > 0")


class NRCCRLoss:
    """Embeddings of one batch → ``{"loss": total, term: weighted value, ...}``; terms of weight 0
    are not computed."""

    def __init__(self, config: NRCCRLossConfig | None = None):
        self.config = config or NRCCRLossConfig()

    def __call__(self, emb: Embeddings, discriminator: torch.nn.Module) -> dict[str, torch.Tensor]:
        c, w = self.config, self.config.weights
        item, source, translation, cross, back = (gather_with_grad(x) for x in
                                                  (emb.item, emb.source, emb.translation, emb.cross, emb.back))
        terms = {
            "triplet": lambda: nrccr_triplet(source, item, c.margin),
            "triplet_translation": lambda: nrccr_triplet(translation, item, c.margin),
            "similarity_distillation": lambda: similarity_distillation(cross, translation, item, c.temperature),
            "feature_distillation": lambda: feature_distillation(cross, translation, c.beta),
            "back_translation": lambda: nrccr_triplet(source, back, c.margin),
            "adversarial": lambda: generator_loss(discriminator, emb.translation_states, emb.translation_mask),
        }
        out = {name: w[name] * term() for name, term in terms.items() if w[name] > 0}
        out["loss"] = torch.stack(list(out.values())).sum()
        return out

    @staticmethod
    def discriminator_loss(emb: Embeddings, discriminator: torch.nn.Module) -> torch.Tensor:
        """The discriminator's own loss on detached token states (source = real, translation = fake)."""
        return discriminator_loss(discriminator, emb.source_states, emb.translation_states, emb.source_mask,
                                  emb.translation_mask)
