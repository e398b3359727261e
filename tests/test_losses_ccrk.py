"""CCRK's hard-negative sampler, ITM / MLM losses, VICReg terms and the triplet ranking loss."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ccrk_ray.objectives.losses import (
    MitmSample,
    mask_tokens,
    matching_loss,
    mlm_loss,
    sample_mitm,
    triplet_ranking_loss,
    vicreg_covariance,
    vicreg_invariance,
    vicreg_terms,
    vicreg_variance,
)

# ------------------------------------------------------------------------------------ sample_mitm


def expected_mitm_probabilities(sim, k):
    """The sampling distributions written out with loops (P(pos), P(neg text), P(neg image))."""
    n = sim.shape[0]
    w = torch.softmax(sim.double(), dim=1) + 1e-5
    max_w = w.max() + 1e-5
    p_pos = torch.zeros(n, k, dtype=torch.float64)
    p_neg_text = torch.zeros(n, n * k, dtype=torch.float64)
    for i in range(n):
        for l in range(k):
            p_pos[i, l] = max_w - w[i, i * k + l]
        p_pos[i] /= p_pos[i].sum()
        for j in range(n * k):
            p_neg_text[i, j] = 0.0 if j // k == i else w[i, j]
        p_neg_text[i] /= p_neg_text[i].sum()
    v = torch.softmax(sim.double().t(), dim=1) + 1e-5
    p_neg_image = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for l in range(k):
            q = v[i * k + l].clone()
            q[i] = 0.0
            p_neg_image[i] += p_pos[i, l] * q / q.sum()
    return p_pos, p_neg_text, p_neg_image


def _random_sim(n, k, scale, ties, seed):
    g = torch.Generator().manual_seed(seed)
    sim = torch.randn(n, n * k, generator=g) * scale
    if ties == "rounded":
        sim = sim.round()                 # many exact ties
    elif ties == "constant":
        sim = torch.full_like(sim, scale)  # every weight equal
    elif ties == "own_equal":
        sim.view(n, n, k)[torch.arange(n), torch.arange(n)] = sim.max()
    return sim


@settings(max_examples=150, deadline=None)
@given(n=st.integers(2, 12), k=st.integers(1, 6),
       scale=st.sampled_from([1e-3, 1.0, 14.3, 1e3, 1e6]),
       ties=st.sampled_from(["none", "rounded", "constant", "own_equal"]),
       seed=st.integers(0, 2**31 - 1))
def test_sample_mitm_never_returns_a_positive_as_negative(n, k, scale, ties, seed):
    sim = _random_sim(n, k, scale, ties, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(3):
        out = sample_mitm(sim, k, generator=gen)
        assert isinstance(out, MitmSample)
        rows = torch.arange(n)
        for t in out:
            assert t.dtype == torch.long and t.shape == (n,)
        assert torch.equal(out.pos_text // k, rows)          # own caption, in range
        assert ((out.neg_text >= 0) & (out.neg_text < n * k)).all()
        assert (out.neg_text // k != rows).all()
        assert ((out.neg_image >= 0) & (out.neg_image < n)).all()
        assert (out.neg_image != rows).all()


def test_sample_mitm_empirical_distribution_matches_definition():
    n, k, draws = 3, 2, 6000
    sim = torch.tensor([[2.0, 0.5, 1.0, -1.0, 0.0, 1.5],
                        [0.0, 1.0, -0.5, 2.5, 0.3, 0.2],
                        [1.2, -0.7, 0.4, 0.9, 0.1, -0.2]])
    p_pos, p_neg_text, p_neg_image = expected_mitm_probabilities(sim, k)
    gen = torch.Generator().manual_seed(0)
    c_pos = torch.zeros(n, k)
    c_neg_text = torch.zeros(n, n * k)
    c_neg_image = torch.zeros(n, n)
    rows = torch.arange(n)
    for _ in range(draws):
        out = sample_mitm(sim, k, generator=gen)
        c_pos[rows, out.pos_text - rows * k] += 1
        c_neg_text[rows, out.neg_text] += 1
        c_neg_image[rows, out.neg_image] += 1
    # binomial std of a frequency over 6000 draws is <= 0.0065; 0.03 is > 4.5 sigma
    torch.testing.assert_close(c_pos / draws, p_pos.float(), atol=0.03, rtol=0)
    torch.testing.assert_close(c_neg_text / draws, p_neg_text.float(), atol=0.03, rtol=0)
    torch.testing.assert_close(c_neg_image / draws, p_neg_image.float(), atol=0.03, rtol=0)


def test_sample_mitm_prefers_the_least_similar_language_as_positive():
    n, k, draws = 4, 3, 3000
    sim = torch.full((n, n * k), -10.0)
    for i in range(n):
        sim[i, i * k:(i + 1) * k] = torch.tensor([0.0, 0.0, 0.0])
    sim[0, 0:3] = torch.tensor([3.0, 1.5, 0.0])   # language 0 most, language 2 least similar
    gen = torch.Generator().manual_seed(7)
    counts = torch.zeros(k)
    for _ in range(draws):
        counts[sample_mitm(sim, k, generator=gen).pos_text[0]] += 1
    most, middle, least = counts.tolist()
    assert least > middle > most
    assert least >= 2 * most
    # w ≈ [0.788, 0.176, 0.039] and max(w) is w[0, 0], so the most similar one is ~never drawn
    assert most < 0.01 * draws
    assert least / draws == pytest.approx(0.55, abs=0.04)


def test_sample_mitm_prefers_the_hardest_negatives():
    n, k, draws = 4, 2, 500
    sim = torch.zeros(n, n * k)
    sim[0, 4] = 8.0            # image 0 is very similar to caption 4 (owned by image 2)
    sim[3, 0:2] = 8.0          # both captions of image 0 are very similar to image 3
    gen = torch.Generator().manual_seed(3)
    neg_text_hits = neg_image_hits = 0
    for _ in range(draws):
        out = sample_mitm(sim, k, generator=gen)
        neg_text_hits += int(out.neg_text[0] == 4)
        neg_image_hits += int(out.neg_image[0] == 3)
    # P(neg_text[0] = 4) = e^8 / (e^8 + 5) ≈ 0.998; P(neg_image[0] = 3) = e^8 / (e^8 + 2) ≈ 0.999
    assert neg_text_hits >= 0.97 * draws
    assert neg_image_hits >= 0.97 * draws


def test_sample_mitm_is_deterministic_with_a_seeded_generator():
    sim = torch.randn(6, 18, generator=torch.Generator().manual_seed(0)) * 5
    a = sample_mitm(sim, 3, generator=torch.Generator().manual_seed(42))
    b = sample_mitm(sim, 3, generator=torch.Generator().manual_seed(42))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    gen = torch.Generator().manual_seed(42)
    runs = [torch.cat(sample_mitm(sim, 3, generator=gen)) for _ in range(10)]
    assert any(not torch.equal(runs[0], r) for r in runs[1:])


def test_sample_mitm_has_no_grad_and_ignores_input_grad():
    sim = torch.randn(3, 6, requires_grad=True)
    out = sample_mitm(sim, 2, generator=torch.Generator().manual_seed(0))
    assert not any(t.requires_grad for t in out)
    assert sim.grad is None


def test_sample_mitm_errors():
    with pytest.raises(ValueError, match="N=1"):
        sample_mitm(torch.zeros(1, 3), 3)
    with pytest.raises(ValueError, match="5 columns.*12"):
        sample_mitm(torch.zeros(4, 5), 3)
    with pytest.raises(ValueError, match="got 0"):
        sample_mitm(torch.zeros(4, 4), 0)
    with pytest.raises(ValueError, match=r"\(8,\)"):
        sample_mitm(torch.zeros(8), 2)


# ---------------------------------------------------------------------------------- matching_loss


def test_matching_loss_hand_computed():
    logits = torch.tensor([[0.0, 2.0],     # positive, label 1
                           [1.0, 0.0],     # neg image, label 0
                           [0.0, 0.0]])    # neg text, label 0
    e = math.e
    expected = (math.log(1 + e ** -2) + math.log(1 + e ** -1) + math.log(2)) / 3
    assert matching_loss(logits).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.37778, abs=1e-4)


def test_matching_loss_label_layout_and_errors():
    logits = torch.randn(12, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1] * 4 + [0] * 8)
    torch.testing.assert_close(matching_loss(logits), F.cross_entropy(logits, labels))
    with pytest.raises(ValueError, match="7 rows"):
        matching_loss(torch.zeros(7, 2))
    with pytest.raises(ValueError, match=r"\(6, 3\)"):
        matching_loss(torch.zeros(6, 3))


# ------------------------------------------------------------------------------------ mask_tokens

PAD, CLS, SEP, MASK = 1, 0, 2, 3
SPECIALS = [CLS, PAD, SEP, MASK]


@settings(max_examples=150, deadline=None)
@given(b=st.integers(1, 6), length=st.integers(1, 24), vocab=st.integers(5, 60),
       mask_prob=st.sampled_from([0.01, 0.15, 0.4, 0.9, 1.0]), max_masks=st.integers(1, 6),
       prefix_mask=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_mask_tokens_properties(b, length, vocab, mask_prob, max_masks, prefix_mask, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, length), generator=g)
    if prefix_mask:
        lens = torch.randint(0, length + 1, (b,), generator=g)
        att = (torch.arange(length) < lens.unsqueeze(1)).long()
    else:
        att = torch.randint(0, 2, (b, length), generator=g)
    ids = torch.where(att == 1, ids, torch.full_like(ids, PAD))
    ids_before, att_before = ids.clone(), att.clone()

    masked, labels = mask_tokens(ids, att, mask_token_id=MASK, vocab_size=vocab,
                                 special_ids=SPECIALS, mask_prob=mask_prob, max_masks=max_masks,
                                 generator=torch.Generator().manual_seed(seed))
    assert torch.equal(ids, ids_before) and torch.equal(att, att_before)
    assert masked.shape == ids.shape and labels.shape == ids.shape and labels.dtype == torch.long

    is_special = torch.isin(ids, torch.tensor(SPECIALS))
    candidates = (att == 1) & ~is_special
    selected = labels != -100
    assert not (selected & ~candidates).any()                        # no specials / padding
    per_row = selected.sum(dim=1)
    assert (per_row <= max_masks).all()
    assert (per_row[candidates.any(dim=1)] >= 1).all()                # every caption has a target
    assert torch.equal(labels[selected], ids[selected])               # labels = original ids
    assert torch.equal(masked[~selected], ids[~selected])             # nothing else changes
    changed_to = masked[selected]
    assert ((changed_to == MASK) | ~torch.isin(changed_to, torch.tensor(SPECIALS))).all()
    assert ((changed_to >= 0) & (changed_to < vocab)).all()


def _all_candidate_batch(b=64, length=128, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIALS), vocab, (b, length), generator=g)
    return ids, torch.ones_like(ids)


def test_mask_tokens_80_10_10_split():
    ids, att = _all_candidate_batch()
    masked, labels = mask_tokens(ids, att, mask_token_id=MASK, vocab_size=1000,
                                 special_ids=SPECIALS, mask_prob=1.0, max_masks=10_000,
                                 generator=torch.Generator().manual_seed(1))
    total = ids.numel()
    assert (labels != -100).all()                                     # mask_prob=1 selects all
    frac_mask = (masked == MASK).float().mean().item()
    frac_same = (masked == ids).float().mean().item()
    frac_random = ((masked != MASK) & (masked != ids)).float().mean().item()
    # binomial std over 8192 tokens is about 0.0045 (0.8) and 0.0033 (0.1)
    assert frac_mask == pytest.approx(0.8, abs=0.02)
    assert frac_same == pytest.approx(0.1, abs=0.015)
    assert frac_random == pytest.approx(0.1, abs=0.015)
    random_ids = masked[(masked != MASK) & (masked != ids)]
    assert random_ids.numel() > 0.05 * total
    assert not torch.isin(random_ids, torch.tensor(SPECIALS)).any()
    # uniform over the 996 non-special ids: both halves of the range are hit about equally
    low = (random_ids < 502).float().mean().item()
    assert low == pytest.approx(0.5, abs=0.06)


def test_mask_tokens_selection_rate_and_random_subset():
    ids, att = _all_candidate_batch(b=200, length=50)
    _, labels = mask_tokens(ids, att, mask_token_id=MASK, vocab_size=1000, special_ids=SPECIALS,
                            mask_prob=0.4, max_masks=1000,
                            generator=torch.Generator().manual_seed(2))
    assert (labels != -100).float().mean().item() == pytest.approx(0.4, abs=0.02)

    # capped at 2 of 50 all-selected tokens: the kept pair is a random subset, not a prefix
    _, labels = mask_tokens(ids, att, mask_token_id=MASK, vocab_size=1000, special_ids=SPECIALS,
                            mask_prob=1.0, max_masks=2, generator=torch.Generator().manual_seed(3))
    sel = labels != -100
    assert (sel.sum(dim=1) == 2).all()
    per_position = sel.float().mean(dim=0)                           # expected 2/50 = 0.04 each
    assert per_position[:5].mean().item() == pytest.approx(0.04, abs=0.02)
    assert per_position[-25:].mean().item() == pytest.approx(0.04, abs=0.01)


def test_mask_tokens_fallback_when_nothing_selected():
    ids, att = _all_candidate_batch(b=300, length=10)
    att[:, 7:] = 0                                                   # 3 padding positions a row
    ids[:, 0] = CLS
    _, labels = mask_tokens(ids, att, mask_token_id=MASK, vocab_size=1000, special_ids=SPECIALS,
                            mask_prob=0.001, max_masks=5, generator=torch.Generator().manual_seed(4))
    sel = labels != -100
    assert (sel.sum(dim=1) == 1).all()                               # P(any real selection) ~ 0.006/row
    assert not sel[:, 0].any() and not sel[:, 7:].any()
    # the fallback position is uniform over the 6 candidates (positions 1..6)
    freq = sel[:, 1:7].float().mean(dim=0)
    assert (freq > 0.08).all() and (freq < 0.28).all()


def test_mask_tokens_row_without_candidates_and_errors():
    ids = torch.tensor([[CLS, SEP, PAD], [CLS, 10, SEP]])
    att = torch.tensor([[1, 1, 0], [1, 1, 1]])
    masked, labels = mask_tokens(ids, att, mask_token_id=MASK, vocab_size=20, special_ids=SPECIALS,
                                 mask_prob=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(labels, torch.tensor([[-100, -100, -100], [-100, 10, -100]]))
    assert torch.equal(masked[0], ids[0])
    kw = dict(mask_token_id=MASK, vocab_size=20, special_ids=SPECIALS)
    with pytest.raises(ValueError, match="got 0.0"):
        mask_tokens(ids, att, mask_prob=0.0, **kw)
    with pytest.raises(ValueError, match="got 1.5"):
        mask_tokens(ids, att, mask_prob=1.5, **kw)
    with pytest.raises(ValueError, match="got 0"):
        mask_tokens(ids, att, max_masks=0, **kw)
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        mask_tokens(ids, att[:, :2], **kw)


# --------------------------------------------------------------------------------------- mlm_loss


def test_mlm_loss_matches_cross_entropy_over_labelled_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g, requires_grad=True)
    labels = torch.full((3, 7), -100)
    labels[0, 2], labels[1, 0], labels[1, 5], labels[2, 6] = 4, 0, 10, 7
    got = mlm_loss(logits, labels)
    sel = labels != -100
    want = F.cross_entropy(logits[sel], labels[sel])
    torch.testing.assert_close(got, want)
    manual = -sum(torch.log_softmax(logits[b, t], 0)[labels[b, t]]
                  for b, t in sel.nonzero().tolist()) / 4
    assert got.item() == pytest.approx(manual.item(), rel=1e-6)
    g_got, = torch.autograd.grad(got, logits)
    g_want, = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g_got, g_want)


def test_mlm_loss_zero_and_differentiable_without_labels():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    loss = mlm_loss(logits, torch.full((2, 4), -100))
    assert loss.item() == 0.0 and math.isfinite(loss.item())
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))
    with pytest.raises(ValueError, match=r"\(2, 4, 5\)"):
        mlm_loss(logits, torch.zeros(2, 5, dtype=torch.long))


# ----------------------------------------------------------------------------------------- VICReg


def loop_invariance(img, txt):
    n, k = img.shape[0], txt.shape[0] // img.shape[0]
    total = 0.0
    for i in range(n):
        for l in range(k):
            total += ((img[i] - txt[i * k + l]) ** 2).sum().item()
    return total / (n * k * img.shape[1])


def loop_variance(x, eps=1e-4, target=1.0):
    n, d = x.shape
    out = 0.0
    for c in range(d):
        col = x[:, c].tolist()
        mean = sum(col) / n
        var = sum((v - mean) ** 2 for v in col) / (n - 1)
        out += max(0.0, target - math.sqrt(var + eps))
    return out / d


def loop_covariance(x):
    n, d = x.shape
    cols = [x[:, c].tolist() for c in range(d)]
    means = [sum(c) / n for c in cols]
    out = 0.0
    for a in range(d):
        for b in range(d):
            if a != b:
                cov = sum((cols[a][r] - means[a]) * (cols[b][r] - means[b]) for r in range(n)) / (n - 1)
                out += cov ** 2
    return out / d


@pytest.mark.parametrize("n,k,d", [(2, 1, 3), (4, 3, 5), (6, 2, 8)])
def test_vicreg_terms_match_loops(n, k, d):
    g = torch.Generator().manual_seed(n * 10 + k)
    img = torch.randn(n, d, generator=g) * 0.7
    txt = torch.randn(n * k, d, generator=g) * 0.7
    assert vicreg_invariance(img, txt).item() == pytest.approx(loop_invariance(img, txt), rel=1e-5)
    assert vicreg_variance(img).item() == pytest.approx(loop_variance(img), rel=1e-5, abs=1e-7)
    assert vicreg_covariance(txt).item() == pytest.approx(loop_covariance(txt), rel=1e-5)
    terms = vicreg_terms(img, txt)
    assert set(terms) == {"invariance", "variance", "covariance"}
    assert terms["invariance"].item() == pytest.approx(loop_invariance(img, txt), rel=1e-5)
    assert terms["variance"].item() == pytest.approx(
        (loop_variance(img) + loop_variance(txt)) / 2, rel=1e-5, abs=1e-7)
    assert terms["covariance"].item() == pytest.approx(
        (loop_covariance(img) + loop_covariance(txt)) / 2, rel=1e-5)


def test_vicreg_special_cases():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(4, 6, generator=g)
    assert vicreg_invariance(img, img.repeat_interleave(3, dim=0)).item() == 0.0
    # columns of ±2: unbiased variance 4·4/3 > 1, so no variance penalty
    spread = torch.tensor([[2.0, -2.0], [-2.0, 2.0], [2.0, 2.0], [-2.0, -2.0]])
    assert vicreg_variance(spread).item() == 0.0
    collapsed = torch.ones(5, 4)
    assert vicreg_variance(collapsed).item() == pytest.approx(1 - math.sqrt(1e-4), abs=1e-6)
    # Hadamard columns 2..4 are zero-mean and mutually orthogonal: no covariance
    hadamard = torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
    assert vicreg_covariance(hadamard[:, 1:]).item() == pytest.approx(0.0, abs=1e-12)
    # two identical columns [1, -1]: C = [[2, 2], [2, 2]], off-diagonal 2·2² / d=2 = 4
    assert vicreg_covariance(torch.tensor([[1.0, 1.0], [-1.0, -1.0]])).item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match=r"\(1, 3\)"):
        vicreg_variance(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="not a whole multiple"):
        vicreg_invariance(torch.zeros(2, 3), torch.zeros(3, 3))


# ---------------------------------------------------------------------------------------- triplet


def test_triplet_ranking_loss_hand_computed_2x2():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    # S = [[0.6, 1.0], [0.8, 0.0]]; i2t hinges 0.6, 1.0; t2i hinges 0.4, 1.2 -> 3.2 / 2
    for hardest in (True, False):
        got = triplet_ranking_loss(img, txt, margin=0.2, hardest=hardest)
        assert got.item() == pytest.approx(1.6, abs=1e-6)
    # a large positive margin over every negative gives zero loss
    assert triplet_ranking_loss(img, img, margin=0.2).item() == 0.0


def test_triplet_ranking_loss_hardest_vs_sum_3x3():
    s = torch.tensor([[0.5, 0.4, 0.45], [0.2, 0.9, 0.8], [0.3, 0.0, 0.6]])
    img, txt = torch.eye(3), s.t().contiguous()                       # img @ txtᵀ = s
    # rows: [0.1, 0.15] / [0.1] / [] ; columns: [] / [] / [0.05, 0.4]
    assert triplet_ranking_loss(img, txt, hardest=True).item() == pytest.approx(0.65 / 3, abs=1e-6)
    assert triplet_ranking_loss(img, txt, hardest=False).item() == pytest.approx(0.8 / 3, abs=1e-6)


def test_triplet_ranking_loss_matches_loop_and_has_gradients():
    g = torch.Generator().manual_seed(5)
    img = F.normalize(torch.randn(5, 4, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(5, 4, generator=g), dim=-1).requires_grad_()
    s = (img @ txt.t()).detach()
    for hardest in (True, False):
        total = 0.0
        for i in range(5):
            row = [max(0.0, 0.2 + s[i, j].item() - s[i, i].item()) for j in range(5) if j != i]
            col = [max(0.0, 0.2 + s[j, i].item() - s[i, i].item()) for j in range(5) if j != i]
            total += (max(row) + max(col)) if hardest else (sum(row) + sum(col))
        got = triplet_ranking_loss(img, txt, hardest=hardest)
        assert got.item() == pytest.approx(total / 5, rel=1e-5)
    triplet_ranking_loss(img, txt).backward()
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(5, 4\).*\(4, 4\)"):
        triplet_ranking_loss(img, txt[:4])


def _count_rule_batch():
    """Rows of 10, 5, 3 and 24 attended tokens (<s> ... </s>, then padding) out of 24."""
    ids = torch.full((4, 24), 1)
    mask = torch.zeros(4, 24, dtype=torch.long)
    for row, length in enumerate((10, 5, 3, 24)):
        ids[row, :length] = torch.arange(10, 10 + length)
        ids[row, 0], ids[row, length - 1] = 0, 2
        mask[row, :length] = 1
    return ids, mask


def test_the_count_rule_masks_round_p_times_length_tokens_capped_by_max_masks():
    ids, mask = _count_rule_batch()
    for seed in range(20):
        masked, labels = mask_tokens(ids, mask, mask_token_id=MASK, vocab_size=60, special_ids=SPECIALS,
                                     mask_prob=0.4, max_masks=6, rule="count",
                                     generator=torch.Generator().manual_seed(seed))
        counts = (labels != -100).sum(dim=1).tolist()
        # round(0.4·10) = 4, round(0.4·5) = 2, round(0.4·3) = 1, min(6, round(0.4·24) = 10) = 6
        assert counts == [4, 2, 1, 6]
        targets = labels != -100
        assert not (targets & ((mask == 0) | (ids == 0) | (ids == 2))).any()     # never specials or padding
        assert torch.equal(labels[targets], ids[targets])


def test_count_rule_spans_make_runs_of_neighbouring_targets():
    ids, mask = _count_rule_batch()

    def mean_run(span_prob):
        runs = targets = 0
        for seed in range(50):
            _, labels = mask_tokens(ids[3:], mask[3:], mask_token_id=MASK, vocab_size=60, special_ids=SPECIALS,
                                    mask_prob=0.4, max_masks=6, rule="count", span_prob=span_prob, max_span=3,
                                    generator=torch.Generator().manual_seed(seed))
            t = (labels[0] != -100).int()
            targets += int(t.sum())
            runs += int((t[1:] - t[:-1] == 1).sum() + t[0])
        return targets / runs

    alone, spans = mean_run(0.0), mean_run(1.0)
    assert spans > 1.8 and alone < 1.5, (alone, spans)


def test_unknown_mask_rule_is_refused():
    ids, mask = _count_rule_batch()
    with pytest.raises(ValueError, match="mask rule must be one of bernoulli, count"):
        mask_tokens(ids, mask, mask_token_id=MASK, vocab_size=60, special_ids=SPECIALS, rule="whole_word")
