"""Contrastive objectives of CCRK as pure tensor math (no Ray, no model).

Conventions: features are L2-normalised by the caller. Text features of a batch of N images with K
captions each are ordered *image-major*: the K captions of image 0, then the K of image 1, ...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

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


# ---------------------------------------------------------------------------------------------
# Hard-negative sampling and matching (ITM) loss
# ---------------------------------------------------------------------------------------------

_SAMPLING_EPS = 1e-5    # added to every softmax weight, as in the reference CCRK sampler


class MitmSample(NamedTuple):
    """Indices drawn by :func:`sample_mitm`, each a LongTensor of length N.

    ``pos_text[i]``: the positive caption (a text row, in ``[i·K, i·K + K)``) of image i;
    ``neg_text[i]``: a hard-negative caption of image i (a text row owned by another image);
    ``neg_image[i]``: a hard-negative image (≠ i) for the caption ``pos_text[i]``.
    """

    pos_text: torch.Tensor
    neg_text: torch.Tensor
    neg_image: torch.Tensor


@torch.no_grad()
def sample_mitm(sim_i2t: torch.Tensor, k: int, generator: torch.Generator | None = None,
                same_image: torch.Tensor | None = None) -> MitmSample:
    """Draw the positive caption and the hard negatives of CCRK's multi-lingual ITM (MITM).

    ``sim_i2t`` is the N × (N·K) matrix image_feat @ text_featᵀ / τ (image-major captions, so
    caption j belongs to image j // K); it must be finite. With w = softmax(sim_i2t, dim=1) + 1e-5:

    * positive: among its own K captions, image i draws language l with probability
      ∝ (max(w) + 1e-5 − w[i, i·K + l]), max over the whole matrix, so the *least* similar
      language (the hardest positive) is drawn most often; ``pos_text[i] = i·K + l``;
    * negative caption: image i draws column j with probability ∝ w[i, j], its own K columns
      set to 0 (harder = more similar negatives are drawn more often);
    * negative image: with v = softmax(sim_i2tᵀ, dim=1) + 1e-5 (each caption over the N images),
      caption ``pos_text[i]`` draws image m with probability ∝ v[pos_text[i], m], v[·, i] set to 0.

    ``same_image`` (N×N bool, optional; fine-tuning with image ids) marks rows that are the same
    image (e.g. two captions of it in one batch): neither its captions nor the image itself are
    drawn as negatives of the other.

    Each of the three is a single ``torch.multinomial`` call over the whole batch (no Python loop
    over images, no host sync), so a positive is never returned as a negative. This is the
    vectorised form of the reference ``get_unialign_matching_loss`` with ``neg_sample_type=1``.
    """
    if sim_i2t.dim() != 2:
        raise ValueError(f"sim_i2t must be N × (N·K), got shape {tuple(sim_i2t.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (captions per image) must be an int >= 1, got {k!r}")
    n, width = sim_i2t.shape
    if n < 2:
        raise ValueError(f"hard negatives need at least 2 images per batch, got N={n}")
    if width != n * k:
        raise ValueError(f"sim_i2t has {width} columns, expected N·K = {n}·{k} = {n * k}")

    sim = sim_i2t.detach().float()
    rows = torch.arange(n, device=sim.device)

    w = F.softmax(sim, dim=1) + _SAMPLING_EPS                    # N × N·K
    own = w.view(n, n, k)[rows, rows]                            # N × K, w[i, i·K + l]
    max_weight = w.max() + _SAMPLING_EPS
    pos_local = torch.multinomial(max_weight - own, 1, generator=generator).squeeze(1)
    pos_text = rows * k + pos_local

    neg_w = w.clone()
    neg_w.view(n, n, k)[rows, rows] = 0.0                        # no own caption as a negative
    if same_image is not None:
        if same_image.shape != (n, n):
            raise ValueError(f"same_image must be N×N = {n}×{n}, got {tuple(same_image.shape)}")
        neg_w.view(n, n, k).masked_fill_(same_image.unsqueeze(-1), 0.0)
    neg_text = torch.multinomial(neg_w, 1, generator=generator).squeeze(1)

    v = F.softmax(sim.t(), dim=1) + _SAMPLING_EPS                # N·K × N
    neg_img_w = v[pos_text]                                      # row i: caption pos_text[i]
    neg_img_w[rows, rows] = 0.0                                  # its owner is image i
    if same_image is not None:
        neg_img_w.masked_fill_(same_image, 0.0)
    neg_image = torch.multinomial(neg_img_w, 1, generator=generator).squeeze(1)
    return MitmSample(pos_text, neg_text, neg_image)


def matching_loss(itm_logits: torch.Tensor) -> torch.Tensor:
    """Image–text matching cross-entropy.

    ``itm_logits`` is (3N)×2, rows ordered [N positives (image i, pos_text[i]);
    N (neg_image[i], pos_text[i]); N (image i, neg_text[i])]. Labels are 1 for the first N rows
    and 0 for the other 2N; result = mean over the 3N rows of −log softmax(itm_logits)[label].
    """
    if itm_logits.dim() != 2 or itm_logits.shape[1] != 2:
        raise ValueError(f"itm_logits must be (3N)×2, got shape {tuple(itm_logits.shape)}")
    rows = itm_logits.shape[0]
    if rows == 0 or rows % 3 != 0:
        raise ValueError(f"itm_logits has {rows} rows, expected a positive multiple of 3 "
                         "([positives; neg image; neg text])")
    n = rows // 3
    labels = torch.zeros(rows, dtype=torch.long, device=itm_logits.device)
    labels[:n] = 1
    return F.cross_entropy(itm_logits, labels)


# ---------------------------------------------------------------------------------------------
# Masked language modelling
# ---------------------------------------------------------------------------------------------

IGNORE_INDEX = -100
MASK_RULES = ("bernoulli", "count")


def count_rule_targets(candidates: torch.Tensor, lengths: torch.Tensor, mask_prob: float, max_masks: int,
                       span_prob: float, max_span: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """B×L bool: the targets of ``mask_tokens``'s ``count`` rule with spans (a loop per row on the
    host: B×L is at most a few thousand positions per step; without spans ``mask_tokens`` selects
    on the device)."""
    out = torch.zeros_like(candidates)
    cand = candidates.cpu()
    for row in range(cand.shape[0]):
        positions = cand[row].nonzero().squeeze(1).tolist()
        if not positions:
            continue
        want = min(max_masks, max(1, int(round(float(lengths[row]) * mask_prob))))
        allowed, taken = set(positions), []
        order = torch.randperm(len(positions), generator=generator).tolist()
        draws = torch.rand(len(positions), generator=generator).tolist()
        sizes = torch.randint(2, max_span + 1, (len(positions),), generator=generator).tolist()
        for i, d, size in zip(order, draws, sizes):
            if len(taken) >= want:
                break
            start = positions[i]
            if start in taken:
                continue
            for p in range(start, start + (size if d < span_prob else 1)):
                if p not in allowed:
                    break
                if p not in taken:
                    taken.append(p)
        if len(taken) > want:
            keep = torch.randperm(len(taken), generator=generator)[:want].tolist()
            taken = [taken[j] for j in keep]
        out[row, taken] = True
    return out.to(candidates.device)


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, mask_token_id: int,
                vocab_size: int, special_ids: Sequence[int], mask_prob: float = 0.4,
                max_masks: int = 10, rule: str = "bernoulli", span_prob: float = 0.0, max_span: int = 3,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking of B×L token ids for MLM; returns ``(masked_ids, labels)``.

    Candidates are attended (``attention_mask == 1``) positions whose id is not in
    ``special_ids``. Which of them become targets:

    - ``rule="bernoulli"``: with one uniform score u per position, a candidate is selected when
      u < ``mask_prob``; per row only the ``max_masks`` selected candidates with the lowest u are
      kept (a uniformly random subset), and a row with ≥ 1 candidate but none selected gets its
      lowest-u candidate, so every caption with a candidate has exactly 1..max_masks targets.
    - ``rule="count"`` (the CCLM / X-VLM / CCRK reference): exactly
      n = min(``max_masks``, max(1, round(``mask_prob`` · attended length))) targets per row (fewer
      only when the row has fewer candidates). Candidates are visited in random order; with
      probability ``span_prob`` a visited position starts a span of 2..``max_span`` consecutive
      candidates (cut at the first non-candidate), else it is taken alone, until n are taken; an
      overshoot is cut back to a random n of them.

    A selected position becomes ``mask_token_id`` with probability 0.8, a token id drawn
    uniformly from the non-special ids in [0, ``vocab_size``) with probability 0.1, and keeps its
    id with probability 0.1. ``labels`` = original id at selected positions, −100 elsewhere.
    Specials and padding are never touched; the inputs are not modified.
    """
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(f"need B×L input_ids and attention_mask of the same shape, got "
                         f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
    if not 0.0 < mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
    if isinstance(max_masks, bool) or not isinstance(max_masks, int) or max_masks < 1:
        raise ValueError(f"max_masks must be an int >= 1, got {max_masks!r}")
    if rule not in MASK_RULES:
        raise ValueError(f"mask rule must be one of {', '.join(MASK_RULES)}, got {rule!r}")
    if not 0.0 <= span_prob <= 1.0 or max_span < 2:
        raise ValueError(f"need 0 <= span_prob <= 1 and max_span >= 2, got {span_prob}, {max_span}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id {mask_token_id} is outside the vocabulary [0, {vocab_size})")
    device = input_ids.device
    special = torch.as_tensor(list(special_ids), dtype=torch.long, device=device)
    in_vocab = special[(special >= 0) & (special < vocab_size)]
    allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
    allowed[in_vocab] = False
    replacement_ids = allowed.nonzero().squeeze(1)
    if replacement_ids.numel() == 0:
        raise ValueError(f"every id in [0, {vocab_size}) is special; no random replacement token "
                         f"exists (special_ids={list(special_ids)})")

    candidates = (attention_mask == 1) & ~torch.isin(input_ids, special)
    scores = torch.rand(input_ids.shape, generator=generator, device=device)
    # Rank of each candidate within its row by score (non-candidates sort last).
    order = torch.where(candidates, scores, torch.full_like(scores, float("inf"))).argsort(dim=1)
    positions = torch.arange(input_ids.shape[1], device=device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    # Selected candidates hold the lowest scores of their row, so "rank < max_masks" keeps a
    # random subset of them; rank 0 is the fallback target of a row with nothing selected.
    if rule == "count" and span_prob > 0:
        selected = count_rule_targets(candidates, attention_mask.sum(dim=1), mask_prob, max_masks, span_prob,
                                      max_span, generator)
    elif rule == "count":       # no spans: the n lowest-score candidates of a row, on the device
        want = (attention_mask.sum(dim=1) * mask_prob).round().clamp(min=1, max=max_masks)
        selected = candidates & (rank < want.unsqueeze(1))
    else:
        selected = candidates & (rank < max_masks) & ((scores < mask_prob) | (rank == 0))

    action = torch.rand(input_ids.shape, generator=generator, device=device)
    pick = torch.randint(0, replacement_ids.numel(), input_ids.shape, generator=generator,
                         device=device)
    random_ids = replacement_ids[pick].to(input_ids.dtype)
    masked_ids = torch.where(selected & (action < 0.8),
                             torch.full_like(input_ids, mask_token_id), input_ids)
    masked_ids = torch.where(selected & (action >= 0.8) & (action < 0.9), random_ids, masked_ids)
    labels = torch.where(selected, input_ids.long(), torch.full_like(input_ids, IGNORE_INDEX,
                                                                     dtype=torch.long))
    return masked_ids, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Masked-LM cross-entropy: logits B×L×V, labels B×L with −100 ignored.

    Result = (Σ over labelled positions of −log softmax(logits)[label]) / max(#labelled, 1):
    the mean over labelled positions, and 0 (still connected to ``logits``) when none is labelled.
    """
    if logits.dim() != labels.dim() + 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(f"need logits of shape labels.shape + (V,), got {tuple(logits.shape)} "
                         f"and labels {tuple(labels.shape)}")
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1).long()
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (flat_labels != IGNORE_INDEX).sum().clamp(min=1).to(total.dtype)
    return total / count


# ---------------------------------------------------------------------------------------------
# VICReg-style regularisers
# ---------------------------------------------------------------------------------------------

def _check_feat(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"{name} needs an n×d matrix with n >= 2 rows, got {tuple(x.shape)}")


def vicreg_invariance(image_feat: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
    """Invariance: mean over images i, languages l and dims of (image_feat[i] − text_feat[i·K+l])².

    ``image_feat`` N×d, ``text_feat`` (N·K)×d image-major (the MSE between each image and each of
    its K captions).
    """
    if image_feat.dim() != 2 or text_feat.dim() != 2 or image_feat.shape[1] != text_feat.shape[1]:
        raise ValueError(f"need N×d image and (N·K)×d text features, got {tuple(image_feat.shape)} "
                         f"and {tuple(text_feat.shape)}")
    k = captions_per_image(image_feat.shape[0], text_feat.shape[0])
    return F.mse_loss(image_feat.repeat_interleave(k, dim=0), text_feat)


def vicreg_variance(x: torch.Tensor, eps: float = 1e-4, target: float = 1.0) -> torch.Tensor:
    """Variance hinge: mean over dims of relu(target − sqrt(var(x, dim=0, unbiased) + eps))."""
    _check_feat(x, "vicreg_variance")
    std = torch.sqrt(x.var(dim=0, unbiased=True) + eps)
    return F.relu(target - std).mean()


def vicreg_covariance(x: torch.Tensor) -> torch.Tensor:
    """Covariance: with xc = x − mean(x), C = xcᵀ xc / (n − 1), Σ_{a≠b} C_ab² / d."""
    _check_feat(x, "vicreg_covariance")
    n, d = x.shape
    xc = x - x.mean(dim=0)
    cov = xc.t() @ xc / (n - 1)
    off_diag = cov - torch.diag_embed(torch.diagonal(cov))
    return off_diag.pow(2).sum() / d


def vicreg_terms(image_feat: torch.Tensor, text_feat: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three VICReg terms of CCRK: ``invariance`` = :func:`vicreg_invariance`;
    ``variance`` / ``covariance`` = (term(image_feat) + term(text_feat)) / 2."""
    return {
        "invariance": vicreg_invariance(image_feat, text_feat),
        "variance": (vicreg_variance(image_feat) + vicreg_variance(text_feat)) / 2,
        "covariance": (vicreg_covariance(image_feat) + vicreg_covariance(text_feat)) / 2,
    }


# ---------------------------------------------------------------------------------------------
# Triplet ranking loss (VSE++ / NRCCR baseline)
# ---------------------------------------------------------------------------------------------

def triplet_ranking_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, margin: float = 0.2,
                         hardest: bool = True, reduction: str = "mean") -> torch.Tensor:
    """Bidirectional hinge triplet loss on paired N×d features (image i ↔ text i).

    S = image_feat @ text_featᵀ (cosine when the caller L2-normalises). For i ≠ j:
    c_i2t[i, j] = relu(margin + S[i, j] − S[i, i]) and c_t2i[i, j] = relu(margin + S[i, j] − S[j, j]).
    With ``hardest`` (VSE++ max-violation) row i costs max_j c_i2t[i, j] and column j costs
    max_i c_t2i[i, j]; otherwise the sums. Result = (Σ row costs + Σ column costs) / N, or
    ``reduction="sum"`` the sum itself (NRCCR's ``cost_style='sum'``).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if image_feat.dim() != 2 or image_feat.shape != text_feat.shape:
        raise ValueError(f"need paired N×d image and text features, got {tuple(image_feat.shape)} "
                         f"and {tuple(text_feat.shape)}")
    n = image_feat.shape[0]
    if n < 1:
        raise ValueError(f"need at least one pair, got N={n}")
    scores = image_feat @ text_feat.t()
    diagonal = scores.diagonal()
    eye = torch.eye(n, dtype=torch.bool, device=scores.device)
    cost_i2t = (margin + scores - diagonal.unsqueeze(1)).clamp(min=0).masked_fill(eye, 0.0)
    cost_t2i = (margin + scores - diagonal.unsqueeze(0)).clamp(min=0).masked_fill(eye, 0.0)
    if hardest:
        row_cost, col_cost = cost_i2t.max(dim=1).values, cost_t2i.max(dim=0).values
    else:
        row_cost, col_cost = cost_i2t.sum(dim=1), cost_t2i.sum(dim=0)
    total = row_cost.sum() + col_cost.sum()
    return total if reduction == "sum" else total / n


# ---------------------------------------------------------------------------------------------
# NRCCR (ACM MM 2022, LiJiaBei-7/nrccr loss.py / adv.py / model.py forward_loss)
# ---------------------------------------------------------------------------------------------
# The full objective, with the reference scripts' weights:
#   triplet(source, item) + 0.6 triplet(translation, item)
#   + 0.4 similarity_distillation(cross.detach(), translation, item)
#   + 0.1 feature_distillation(cross, translation)
#   + 0.5 triplet(source, back-translation) + 0.001 generator term,
# every triplet max-violation, margin 0.2, summed over the batch. At these weights the feature
# term is numerically inert (a SmoothL1 with β 4 of unit-norm features is ~1e-4 against a summed
# triplet of order 10); it is kept as the reference has it.

NRCCR_WEIGHTS = {"triplet": 1.0, "triplet_translation": 0.6, "similarity_distillation": 0.4,
                 "feature_distillation": 0.1, "back_translation": 0.5, "adversarial": 0.001}


def nrccr_triplet(text_feat: torch.Tensor, item_feat: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """NRCCR's ranking loss: the max-violation triplet of paired features, summed over the batch."""
    return triplet_ranking_loss(item_feat, text_feat, margin=margin, hardest=True, reduction="sum")


def similarity_distillation(target_text: torch.Tensor, text_feat: torch.Tensor, item_feat: torch.Tensor,
                            temperature: float = 0.07) -> torch.Tensor:
    """L_sim: the translation's item↔text similarity distributions follow the cross view's.

    Targets p = softmax(item · targetᵀ / τ) (item→text rows) and softmax(target · itemᵀ / τ)
    (text→item rows), computed from ``target_text`` with stop-gradient; the loss is the cross
    entropy of the same softmaxes of ``text_feat``, averaged over rows, both directions averaged."""
    target = target_text.detach()
    p_i2t = F.softmax(item_feat @ target.t() / temperature, dim=1)
    p_t2i = F.softmax(target @ item_feat.t() / temperature, dim=1)
    loss_i2t = -(p_i2t * F.log_softmax(item_feat @ text_feat.t() / temperature, dim=1)).sum(dim=1).mean()
    loss_t2i = -(p_t2i * F.log_softmax(text_feat @ item_feat.t() / temperature, dim=1)).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def feature_distillation(target_feat: torch.Tensor, feat: torch.Tensor, beta: float = 4.0) -> torch.Tensor:
    """SmoothL1 (β 4) between the translation's features and the cross view's, mean over elements;
    as the reference, both sides get gradients."""
    return F.smooth_l1_loss(feat.float(), target_feat.float(), beta=beta)


def discriminator_logits(discriminator: torch.nn.Module, states: torch.Tensor,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """The language discriminator on sentence level: token states B×L×h (``mask`` B×L, 1 = real
    token) → B×c logits; pooling the tokens is the discriminator's own (the reference's strong
    discriminator convolves over them before its mean)."""
    if states.dim() != 3:
        raise ValueError(f"token states must be B×L×h, got {tuple(states.shape)}")
    return discriminator(states) if mask is None else discriminator(states, mask)


def discriminator_loss(discriminator: torch.nn.Module, source_states: torch.Tensor,
                       translation_states: torch.Tensor, source_mask: torch.Tensor | None = None,
                       translation_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The discriminator's step (on detached states): source sentences are "real" (label 1),
    translations "fake" (0), binary cross-entropy with logits on every output, 0.5·(real + fake)."""
    real = discriminator_logits(discriminator, source_states.detach(), source_mask)
    fake = discriminator_logits(discriminator, translation_states.detach(), translation_mask)
    return 0.5 * (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                  + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))


def generator_loss(discriminator: torch.nn.Module, translation_states: torch.Tensor,
                   translation_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The text encoder's adversarial term: translations scored as "real" (label 1); the caller
    weights it (0.001) and steps only the encoder with it."""
    fake = discriminator_logits(discriminator, translation_states, translation_mask)
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


def contrastive_with_ids(image_feat: torch.Tensor, text_feat: torch.Tensor, image_ids: torch.Tensor,
                         text_image_ids: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """Fine-tuning ITC where every caption with the same image id is a positive (X-VLM's ``idx``).

    ``image_feat`` N×d with ids ``image_ids`` (N,), ``text_feat`` M×d with the ids of their images
    ``text_image_ids`` (M,). Y_ij = [image_ids_i == text_image_ids_j]; image→text targets are Y's
    rows normalised to sum 1, text→image targets Yᵀ's rows likewise (an image may appear twice in
    a batch). Result = (loss_i2t + loss_t2i) / 2. With unique images and one caption each this is
    CLIP's InfoNCE.
    """
    if image_feat.dim() != 2 or text_feat.dim() != 2 or image_feat.shape[1] != text_feat.shape[1]:
        raise ValueError(f"need N×d image and M×d text features, got {tuple(image_feat.shape)} and "
                         f"{tuple(text_feat.shape)}")
    if image_ids.shape != (image_feat.shape[0],) or text_image_ids.shape != (text_feat.shape[0],):
        raise ValueError("image_ids / text_image_ids must give one id per image / caption row")
    y = (image_ids.view(-1, 1) == text_image_ids.view(1, -1)).to(image_feat.dtype)
    if (y.sum(1) == 0).any() or (y.sum(0) == 0).any():
        raise ValueError("every image needs a caption in the batch and every caption its image")
    logits = image_feat @ text_feat.t() / temperature
    loss_i2t = -((y / y.sum(1, keepdim=True)) * F.log_softmax(logits, dim=1)).sum(1).mean()
    yt = y.t()
    loss_t2i = -((yt / yt.sum(1, keepdim=True)) * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def one_to_k_contrastive_local(local_image: torch.Tensor, local_text: torch.Tensor, all_image: torch.Tensor,
                               all_text: torch.Tensor, rank: int, temperature: torch.Tensor | float) -> torch.Tensor:
    """The 1-to-K loss of this worker's rows only, against the gathered global columns.

    ``local_image`` n×d and ``local_text`` (n·K)×d are this rank's rows; ``all_image`` N×d and
    ``all_text`` (N·K)×d are every rank's, in rank order (N = n·world). Image→text is local n ×
    global N·K, text→image local n·K × global N, with targets offset by ``rank·n``. Memory is linear
    in the global batch, and the mean of this loss over the ranks equals ``one_to_k_contrastive``
    on the global batch (so do the gradients, once DDP averages them).
    """
    n = local_image.shape[0]
    k = captions_per_image(n, local_text.shape[0])
    big_n = all_image.shape[0]
    if all_text.shape[0] != big_n * k or big_n % n:
        raise ValueError(f"global features ({big_n} images, {all_text.shape[0]} texts) do not fit local "
                         f"batches of {n} images with K={k}")
    if not 0 <= rank < big_n // n:
        raise ValueError(f"rank {rank} outside 0..{big_n // n - 1}")
    device = local_image.device
    own_image = rank * n + torch.arange(n, device=device)                       # global index of local images
    logits_i2t = local_image @ all_text.t() / temperature                       # n × N·K
    owner_of_text = torch.arange(big_n, device=device).repeat_interleave(k)     # N·K
    targets = (owner_of_text.unsqueeze(0) == own_image.unsqueeze(1)).to(logits_i2t.dtype)
    loss_i2t = -(targets * F.log_softmax(logits_i2t, dim=1)).sum(dim=1).mean()
    logits_t2i = local_text @ all_image.t() / temperature                       # n·K × N
    loss_t2i = F.cross_entropy(logits_t2i, own_image.repeat_interleave(k))
    return (loss_i2t + loss_t2i) / 2 / k
