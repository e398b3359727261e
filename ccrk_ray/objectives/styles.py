"""Training objectives: each turns (model, batch) into a dict of named losses, ``"loss"`` being the
total to optimise. The training loop knows nothing else about them.

- ``one_to_k`` (CCRK): 1-to-K ITC over the global batch + MITM (positive caption drawn among the
  K languages favouring the hardest, hard negatives from ITC similarities) + CMLM on the chosen
  positive caption conditioned on the image; optional VICReg-style terms.
- ``one_to_one`` (cross-modal style baseline): every image paired with ONE caption in a randomly
  drawn language per step; CLIP InfoNCE + ITM + MLM on that pair.
- ``cross_lingual`` (cross-lingual style baseline): image–English ITC + English–other-language
  text–text InfoNCE (other languages reach the image only through English); ITM + MLM on the
  image–English pair.
Terms whose weight is 0 are not computed (the demo trains ITC alone on a model without fusion
layers). A batch is ``pixel_values`` N×3×H×W, ``input_ids``/``attention_mask`` N×K×L.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from ccrk_ray.objectives.collectives import ITC_GRADIENTS, gather_with_grad, rank, world_size
from ccrk_ray.objectives.losses import (contrastive_with_ids, mask_tokens, matching_loss, mlm_loss, one_to_k_contrastive,
                             one_to_k_contrastive_local, sample_mitm, vicreg_terms)


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop padding columns beyond the longest caption of the batch (batches arrive padded to
    the configured max length; most captions are far shorter, and text cost grows with length)."""
    longest = int(attention_mask.sum(dim=-1).max())
    return input_ids[..., :longest], attention_mask[..., :longest]


@dataclass
class ObjectiveConfig:
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    vicreg_weights: dict[str, float] = field(default_factory=lambda: {"invariance": 0.0, "variance": 0.0,
                                                                      "covariance": 0.0})
    mask_prob: float = 0.4
    max_masks: int = 10
    mask_rule: str = "bernoulli"           # bernoulli | count (the reference: round(p·len) tokens): losses.mask_tokens
    mask_span_prob: float = 0.0            # count rule: a chosen position starts a 2..mask_max_span span
    mask_max_span: int = 3
    itc_gradient: str = "exact"            # exact | reference: collectives.ITC_GRADIENTS
    mask_token_id: int | None = None
    vocab_size: int | None = None
    special_ids: Sequence[int] = ()
    languages: Sequence[str] = ()          # batch column order; cross_lingual needs "en" among them
    local_loss: bool = False               # one_to_k ITC: local rows × global columns (memory linear in N)

    def __post_init__(self):
        for name in ("itm_weight", "mlm_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        unknown = set(self.vicreg_weights) - {"invariance", "variance", "covariance"}
        if unknown:
            raise ValueError(f"unknown VICReg term(s): {', '.join(sorted(unknown))}")
        if self.itc_gradient not in ITC_GRADIENTS:
            raise ValueError(f"itc_gradient must be one of {', '.join(ITC_GRADIENTS)}, got {self.itc_gradient!r}")
        if self.mlm_weight > 0 and (self.mask_token_id is None or self.vocab_size is None):
            raise ValueError("mlm_weight > 0 needs mask_token_id and vocab_size (from the tokenizer)")


class Objective:
    name = "base"

    def __init__(self, config: ObjectiveConfig | None = None, **kwargs):
        self.config = config or ObjectiveConfig(**kwargs)

    def check_model(self, model) -> None:
        c = self.config
        if (c.itm_weight > 0 or c.mlm_weight > 0) and not model.has_fusion:
            raise ValueError(f"objective {self.name!r} with itm_weight={c.itm_weight}, mlm_weight={c.mlm_weight} "
                             "needs a model with fusion_layers > 0 (or set both weights to 0)")

    def unused_modules(self, model) -> list[str]:
        """The model's parts this objective never computes (their weights are 0): an ITC-only run
        on a model with fusion layers leaves the fusion layers and both heads without gradients."""
        c = self.config
        names = ([] if c.itm_weight > 0 else ["itm_head"]) + ([] if c.mlm_weight > 0 else ["mlm_head"])
        if c.itm_weight <= 0 and c.mlm_weight <= 0:
            names += ["fusion", "vision_to_text"]
        return [n for n in names if getattr(model, n, None) is not None]

    # shared pieces ---------------------------------------------------------------------------
    def matching_and_mlm(self, model, image_tokens, image_feat, text_hidden, text_feat, input_ids, attention_mask,
                         k: int, temperature, image_key: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """MITM and CMLM on the local batch: text rows are image-major with K per image. With
        ``image_key`` (N,), rows of the same image are never each other's negatives."""
        c, out = self.config, {}
        if c.itm_weight <= 0 and c.mlm_weight <= 0:
            return out
        same = None if image_key is None else image_key.view(-1, 1) == image_key.view(1, -1)
        with torch.no_grad():
            sample = sample_mitm(image_feat @ text_feat.t() / temperature, k, same_image=same)
        pos = sample.pos_text
        if c.itm_weight > 0:
            pos_h, pos_m = text_hidden[pos], attention_mask[pos]
            texts = torch.cat([pos_h, pos_h, text_hidden[sample.neg_text]])
            masks = torch.cat([pos_m, pos_m, attention_mask[sample.neg_text]])
            images = torch.cat([image_tokens, image_tokens[sample.neg_image], image_tokens])
            out["itm"] = matching_loss(model.itm_head(model.fuse(texts, masks, images)))
        if c.mlm_weight > 0:
            masked, labels = mask_tokens(input_ids[pos], attention_mask[pos], mask_token_id=c.mask_token_id,
                                         vocab_size=c.vocab_size, special_ids=c.special_ids,
                                         mask_prob=c.mask_prob, max_masks=c.max_masks, rule=c.mask_rule,
                                         span_prob=c.mask_span_prob, max_span=c.mask_max_span)
            fused = model.fuse(model.text_hidden(masked, attention_mask[pos]), attention_mask[pos], image_tokens)
            out["mlm"] = mlm_loss(model.mlm_head(fused), labels)
        return out

    def total(self, terms: dict[str, torch.Tensor], image_feat, text_feat) -> dict[str, torch.Tensor]:
        c = self.config
        loss = terms["itc"]
        if "itm" in terms:
            loss = loss + c.itm_weight * terms["itm"]
        if "mlm" in terms:
            loss = loss + c.mlm_weight * terms["mlm"]
        vic = vicreg_terms(image_feat, text_feat)
        for name, value in vic.items():
            weight = c.vicreg_weights.get(name, 0.0)
            if weight > 0:
                loss = loss + weight * value
            terms[f"vicreg_{name}"] = value if weight > 0 else value.detach()
        return {"loss": loss, **terms}

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """ITC features of every rank (``itc_gradient``: how their gradient flows back)."""
        return ITC_GRADIENTS[self.config.itc_gradient](x)

    def encode(self, model, pixel_values, input_ids, attention_mask):
        image_tokens = model.image_tokens(pixel_values)
        text_hidden = model.text_hidden(input_ids, attention_mask)
        return image_tokens, model.image_feature(image_tokens), text_hidden, model.text_feature(text_hidden)

    def __call__(self, model, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class OneToK(Objective):
    name = "one_to_k"

    def __call__(self, model, batch):
        ids, mask = trim_padding(batch["input_ids"], batch["attention_mask"])
        n, k = ids.shape[:2]
        ids, mask = ids.flatten(0, 1), mask.flatten(0, 1)
        image_tokens, image_feat, text_hidden, text_feat = self.encode(model, batch["pixel_values"], ids, mask)
        temperature = model.temperature
        all_image, all_text = self.gather(image_feat), self.gather(text_feat)
        keys = batch.get("image_key")
        if keys is not None:        # fine-tuning: every caption of the same image id is a positive
            if self.config.local_loss and world_size() > 1:
                raise ValueError("local_loss is not supported with image ids (fine-tuning); turn it off")
            all_keys = gather_with_grad(keys)
            itc = contrastive_with_ids(all_image, all_text, all_keys, all_keys.repeat_interleave(k), temperature)
        elif self.config.local_loss and world_size() > 1:
            itc = one_to_k_contrastive_local(image_feat, text_feat, all_image, all_text, rank(), temperature)
        else:
            itc = one_to_k_contrastive(all_image, all_text, temperature)
        terms = {"itc": itc}
        terms.update(self.matching_and_mlm(model, image_tokens, image_feat, text_hidden, text_feat, ids, mask,
                                           k, temperature, image_key=keys))
        terms["temperature"] = temperature.detach()
        return self.total(terms, image_feat, text_feat)


class OneToOne(Objective):
    """Each image with one caption in a language drawn at random per image and step."""
    name = "one_to_one"

    def __call__(self, model, batch):
        ids, mask = trim_padding(batch["input_ids"], batch["attention_mask"])
        n, k = ids.shape[:2]
        pick = torch.randint(0, k, (n,), device=ids.device)
        rows = torch.arange(n, device=ids.device)
        ids, mask = ids[rows, pick], mask[rows, pick]
        image_tokens, image_feat, text_hidden, text_feat = self.encode(model, batch["pixel_values"], ids, mask)
        temperature = model.temperature
        terms = {"itc": one_to_k_contrastive(self.gather(image_feat), self.gather(text_feat), temperature)}
        terms.update(self.matching_and_mlm(model, image_tokens, image_feat, text_hidden, text_feat, ids, mask,
                                           1, temperature))
        terms["temperature"] = temperature.detach()
        return self.total(terms, image_feat, text_feat)


class CrossLingual(Objective):
    """Image–English ITC plus English–other-language text–text InfoNCE."""
    name = "cross_lingual"

    def __init__(self, config: ObjectiveConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        langs = list(self.config.languages)
        if "en" not in langs:
            raise ValueError(f"objective 'cross_lingual' needs English among the languages, got {langs}")
        self.en = langs.index("en")

    def __call__(self, model, batch):
        ids, mask = trim_padding(batch["input_ids"], batch["attention_mask"])
        n, k = ids.shape[:2]
        if k != len(self.config.languages):
            raise ValueError(f"objective 'cross_lingual' needs all {len(self.config.languages)} languages per image "
                             f"in config order, got K={k}")
        flat_ids, flat_mask = ids.flatten(0, 1), mask.flatten(0, 1)
        image_tokens, image_feat, text_hidden, text_feat = self.encode(model, batch["pixel_values"], flat_ids,
                                                                       flat_mask)
        temperature = model.temperature
        per_image = text_feat.view(n, k, -1)
        en_feat = per_image[:, self.en]
        en_all = self.gather(en_feat)
        itc = one_to_k_contrastive(self.gather(image_feat), en_all, temperature)
        others = [j for j in range(k) if j != self.en]
        ttc = (torch.stack([one_to_k_contrastive(en_all, self.gather(per_image[:, j]), temperature)
                            for j in others]).mean() if others else itc.new_zeros(()))
        terms = {"itc": itc + ttc, "itc_image_en": itc.detach(), "ttc_en_other": ttc.detach()}
        en_rows = torch.arange(n, device=ids.device) * k + self.en
        terms.update(self.matching_and_mlm(model, image_tokens, image_feat, text_hidden[en_rows], en_feat,
                                           flat_ids[en_rows], flat_mask[en_rows], 1, temperature))
        terms["temperature"] = temperature.detach()
        return self.total(terms, image_feat, text_feat)


# The training styles by name: CCRK's 1-to-K and the two baselines it is compared with.
STYLES: dict[str, type[Objective]] = {cls.name: cls for cls in (OneToK, OneToOne, CrossLingual)}


def build_objective(name: str, **kwargs) -> Objective:
    if name not in STYLES:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(STYLES)}")
    return STYLES[name](**kwargs)


class ObjectiveModule(nn.Module):
    """Model + objective as one module, so that DDP wraps a forward that computes every loss."""

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        objective.check_model(model)
        self.model = model
        self.objective = objective

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.objective(self.model, batch)

    def unused_parameter_names(self) -> list[str]:
        """Names (as DDP names them) of the parameters the objective never computes, for DDP to
        skip: with more than one worker it fails on a parameter without gradient. A weight tied to
        a used part (the MLM head's word embeddings) stays in."""
        unused = self.objective.unused_modules(self.model)
        used = {id(p) for name, child in self.model.named_children() if name not in unused for p in child.parameters()}
        used |= {id(p) for p in self.model.parameters(recurse=False)}
        return [f"model.{name}.{n}" for name in unused
                for n, p in getattr(self.model, name).named_parameters(remove_duplicate=False) if id(p) not in used]
