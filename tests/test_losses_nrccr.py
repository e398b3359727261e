"""NRCCR's losses (``ccrk_ray.objectives.losses``) against hand computations."""

import math

import pytest
import torch

from ccrk_ray.model.nrccr import LanguageDiscriminator
from ccrk_ray.objectives.losses import (NRCCR_WEIGHTS, discriminator_logits, discriminator_loss, feature_distillation, generator_loss,
                                        nrccr_triplet, similarity_distillation, triplet_ranking_loss)


def test_nrccr_triplet_is_the_summed_max_violation_hinge():
    item = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    text = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    # S[i, j] = item_i · text_j
    s = [[0.8, 0.0, 1.0], [0.6, 1.0, 0.0], [0.96, 0.8, 0.6]]
    m = 0.2
    row = [max(max(0.0, m + s[i][j] - s[i][i]) for j in range(3) if j != i) for i in range(3)]
    col = [max(max(0.0, m + s[i][j] - s[j][j]) for i in range(3) if i != j) for j in range(3)]
    want = sum(row) + sum(col)          # rows 0.4 + 0 + 0.56, columns 0.36 + 0 + 0.6
    assert want == pytest.approx(1.92)
    assert nrccr_triplet(text, item).item() == pytest.approx(want)
    assert triplet_ranking_loss(item, text).item() == pytest.approx(want / 3)     # the mean form
    with pytest.raises(ValueError, match="reduction"):
        triplet_ranking_loss(item, text, reduction="max")


def test_similarity_distillation_by_hand_and_its_target_gets_no_gradient():
    item = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([[1.0, 0.0], [0.6, 0.8]], requires_grad=True)
    text = torch.tensor([[0.8, 0.6], [0.0, 1.0]], requires_grad=True)
    tau = 0.5

    def softmax(row):
        e = [math.exp(v / tau) for v in row]
        return [v / sum(e) for v in e]

    def ce(p_rows, q_rows):
        return sum(-sum(p * math.log(q) for p, q in zip(pr, qr)) for pr, qr in zip(p_rows, q_rows)) / len(p_rows)

    def sims(a, b):
        return [[sum(x * y for x, y in zip(r, c)) for c in b] for r in a]

    it, tg, tx = item.tolist(), target.tolist(), text.tolist()
    i2t = ce([softmax(r) for r in sims(it, tg)], [softmax(r) for r in sims(it, tx)])
    t2i = ce([softmax(r) for r in sims(tg, it)], [softmax(r) for r in sims(tx, it)])
    loss = similarity_distillation(target, text, item, temperature=tau)
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    loss.backward()
    assert target.grad is None and text.grad.abs().sum() > 0            # stop-gradient on the targets


def test_feature_distillation_is_smooth_l1_with_beta_4_both_sides_trained():
    target = torch.tensor([[0.0, 1.0, 10.0]], requires_grad=True)
    feat = torch.tensor([[1.0, 1.0, 0.0]], requires_grad=True)
    # |d| < 4: 0.5 d² / 4; else |d| − 2
    want = (0.5 * 1 / 4 + 0.0 + (10 - 2)) / 3
    loss = feature_distillation(target, feat)
    assert loss.item() == pytest.approx(want)
    loss.backward()
    assert target.grad.abs().sum() > 0 and feat.grad.abs().sum() > 0
    # inert at the reference's weight: unit-norm features give ~1e-4
    a, b = torch.nn.functional.normalize(torch.randn(128, 1536), dim=1), torch.nn.functional.normalize(
        torch.randn(128, 1536), dim=1)
    assert NRCCR_WEIGHTS["feature_distillation"] * feature_distillation(a, b).item() < 1e-4


def test_the_discriminator_step_changes_only_the_discriminator_and_the_generator_term_only_the_encoder():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 4)
    disc = LanguageDiscriminator("weak", 4)          # the reference's 'weak': linear, nclass 2
    tokens = torch.randn(3, 5, 4)
    source, translation = encoder(tokens), encoder(tokens + 0.5)
    loss = discriminator_loss(disc, source, translation)
    # by hand: mean-pooled states, BCE with logits against 1 (source) and 0 (translation) on every output
    real, fake = disc.head(source.mean(1)), disc.head(translation.mean(1))
    bce = torch.nn.functional.softplus
    want = 0.5 * (bce(-real).mean() + bce(fake).mean())
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    loss.backward()
    assert encoder.weight.grad is None and disc.head.weight.grad.abs().sum() > 0
    disc.zero_grad()
    gen = generator_loss(disc, encoder(tokens + 0.5))
    assert gen.item() == pytest.approx(bce(-disc.head(encoder(tokens + 0.5).mean(1))).mean().item(), rel=1e-6)
    gen.backward()
    assert encoder.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="B×L×h"):
        discriminator_loss(disc, source.mean(1), translation)
    assert NRCCR_WEIGHTS == {"triplet": 1.0, "triplet_translation": 0.6, "similarity_distillation": 0.4,
                             "feature_distillation": 0.1, "back_translation": 0.5, "adversarial": 0.001}


@pytest.mark.parametrize("kind", ["weak", "not-so-weak", "strong"])
def test_every_discriminator_pools_only_real_tokens(kind):
    """A padded batch scores each sentence as its unpadded self would (the mask), for the pooled
    discriminators and the convolutional one alike (its receptive field aside: checked without
    padding for 'strong')."""
    torch.manual_seed(0)
    disc = LanguageDiscriminator(kind, 8).eval()
    states = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    logits = discriminator_logits(disc, states, mask)
    assert logits.shape == (2, 2)
    if kind != "strong":
        assert torch.allclose(logits[0], disc(states[:1, :4])[0], atol=1e-6)
    assert torch.allclose(logits[1], disc(states[1:])[0], atol=1e-6)


def _embeddings(b: int = 5, d: int = 8, seed: int = 0):
    from ccrk_ray.model.nrccr import Embeddings

    g = torch.Generator().manual_seed(seed)
    unit = lambda: torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1).requires_grad_()  # noqa: E731
    states = lambda n: torch.randn(b, n, 4, generator=g).requires_grad_()  # noqa: E731
    mask = torch.ones(b, 3, dtype=torch.long)
    mask[0, 2] = 0
    return Embeddings(unit(), unit(), unit(), unit(), unit(), states(3), states(3), mask, mask)


def test_the_nrccr_objective_is_the_weighted_sum_of_its_terms():
    from ccrk_ray.objectives.nrccr import NRCCRLoss, NRCCRLossConfig

    emb, disc = _embeddings(), LanguageDiscriminator("not-so-weak", 4)
    out = NRCCRLoss()(emb, disc)
    w = NRCCR_WEIGHTS
    want = {"triplet": nrccr_triplet(emb.source, emb.item),
            "triplet_translation": w["triplet_translation"] * nrccr_triplet(emb.translation, emb.item),
            "similarity_distillation": w["similarity_distillation"] * similarity_distillation(emb.cross, emb.translation,
                                                                                              emb.item),
            "feature_distillation": w["feature_distillation"] * feature_distillation(emb.cross, emb.translation),
            "back_translation": w["back_translation"] * nrccr_triplet(emb.source, emb.back),
            "adversarial": w["adversarial"] * generator_loss(disc, emb.translation_states, emb.translation_mask)}
    assert set(out) == set(want) | {"loss"}
    for name, value in want.items():
        assert out[name].item() == pytest.approx(value.item(), rel=1e-6), name
    assert out["loss"].item() == pytest.approx(sum(v.item() for v in want.values()), rel=1e-6)
    out["loss"].backward()
    assert emb.source_states.grad is None and emb.translation_states.grad.abs().sum() > 0   # generator: translations
    # the discriminator's loss reaches no encoder state
    emb2 = _embeddings(seed=1)
    NRCCRLoss.discriminator_loss(emb2, disc).backward()
    assert emb2.source_states.grad is None and emb2.translation_states.grad is None
    # a term of weight 0 is not computed; the triplet alone is NRCCR's baseline
    only = NRCCRLoss(NRCCRLossConfig(weights={k: 0.0 for k in w} | {"triplet": 1.0}))(_embeddings(), disc)
    assert set(only) == {"triplet", "loss"}
    for bad, needle in [({"tripplet": 1.0}, "unknown NRCCR loss term"), ({"triplet": -1.0}, "must be >= 0"),
                        ({k: 0.0 for k in w}, "every weight is 0")]:
        with pytest.raises(ValueError, match=needle):
            NRCCRLossConfig(weights=bad)
