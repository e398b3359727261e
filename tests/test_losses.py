import math

import pytest
import torch
import torch.nn.functional as F

from ccrk_ray.objectives.losses import one_to_k_contrastive


def naive_one_to_k(img, txt, temperature):
    """The definition written as loops, one row and one column at a time."""
    n, k = img.shape[0], txt.shape[0] // img.shape[0]
    logits = img @ txt.t() / temperature
    i2t = 0.0
    for i in range(n):
        logp = torch.log_softmax(logits[i], dim=0)
        i2t = i2t - sum(logp[i * k + j] for j in range(k))
    t2i = 0.0
    for c in range(n * k):
        t2i = t2i - torch.log_softmax(logits[:, c], dim=0)[c // k]
    return (i2t / n + t2i / (n * k)) / 2 / k


def test_hand_computed_value():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    e = math.e
    # i2t row: logits [1,1,0,0] -> -2*(1 - log(2e+2)); t2i column: -(1 - log(e+1))
    expected = ((2 * math.log(2 * e + 2) - 2) + (math.log(e + 1) - 1)) / 2 / 2
    got = one_to_k_contrastive(img, txt, 1.0)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.58152, abs=1e-4)


@pytest.mark.parametrize("n,k", [(3, 1), (4, 3), (5, 10)])
def test_matches_loop_definition_value_and_gradients(n, k):
    g = torch.Generator().manual_seed(n * 100 + k)
    img = F.normalize(torch.randn(n, 8, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(n * k, 8, generator=g), dim=-1).requires_grad_()
    tau = torch.tensor(0.07, requires_grad=True)
    fast = one_to_k_contrastive(img, txt, tau)
    g_fast = torch.autograd.grad(fast, (img, txt, tau))
    slow = naive_one_to_k(img, txt, tau)
    g_slow = torch.autograd.grad(slow, (img, txt, tau))
    assert fast.item() == pytest.approx(slow.item(), rel=1e-5)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_matches_closed_form():
    # dL/dlogits: i2t rows give (K·softmax - Y)/(N·2K); t2i columns give (softmax - onehot)/(N·K·2K)
    n, k, tau = 3, 2, 0.5
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(n, 4, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(n * k, 4, generator=g), dim=-1)
    one_to_k_contrastive(img, txt, tau).backward()
    logits = (img @ txt.t() / tau).detach()
    y = torch.zeros(n, n * k)
    for i in range(n):
        y[i, i * k:(i + 1) * k] = 1
    d_i2t = (k * logits.softmax(1) - y) / (n * 2 * k)
    d_t2i = (logits.softmax(0) - y) / (n * k * 2 * k)
    expected = (d_i2t + d_t2i) @ txt / tau
    torch.testing.assert_close(img.grad, expected, rtol=1e-5, atol=1e-6)


def test_k1_is_symmetric_clip_infonce():
    g = torch.Generator().manual_seed(7)
    img = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    logits = img @ txt.t() / 0.1
    labels = torch.arange(6)
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    assert one_to_k_contrastive(img, txt, 0.1).item() == pytest.approx(clip.item(), rel=1e-6)


def test_aligned_features_give_lower_loss_than_shuffled():
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    txt = img.repeat_interleave(4, dim=0)
    aligned = one_to_k_contrastive(img, txt, 0.07)
    shuffled = one_to_k_contrastive(img, txt[torch.randperm(32, generator=g)], 0.07)
    assert aligned.item() < 0.1 * shuffled.item()


def test_rejects_text_rows_not_multiple_of_images():
    with pytest.raises(ValueError, match=r"text rows \(7\).*image rows \(3\)"):
        one_to_k_contrastive(torch.randn(3, 4), torch.randn(7, 4), 0.07)
    with pytest.raises(ValueError, match="N×d"):
        one_to_k_contrastive(torch.randn(3, 4), torch.randn(6, 5), 0.07)


def test_contrastive_with_ids_is_clip_for_unique_pairs_and_shares_positives():
    from ccrk_ray.objectives.losses import contrastive_with_ids

    g = torch.Generator().manual_seed(11)
    img = F.normalize(torch.randn(4, 6, generator=g), dim=-1)
    txt = F.normalize(torch.randn(4, 6, generator=g), dim=-1)
    ids = torch.tensor([10, 11, 12, 13])
    logits = img @ txt.t() / 0.1
    clip = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.t(), torch.arange(4))) / 2
    assert contrastive_with_ids(img, txt, ids, ids, 0.1).item() == pytest.approx(clip.item(), rel=1e-6)
    # two images in the batch share id 7: each of their captions has both as positives
    img_ids, txt_ids = torch.tensor([7, 7, 8]), torch.tensor([7, 8, 7, 8])
    img3, txt4 = img[:3], txt
    lg = img3 @ txt4.t()
    i2t = -(0.5 * (lg[0].log_softmax(0)[0] + lg[0].log_softmax(0)[2]) + 0.5 * (lg[1].log_softmax(0)[0]
            + lg[1].log_softmax(0)[2]) + 0.5 * (lg[2].log_softmax(0)[1] + lg[2].log_softmax(0)[3])) / 3
    cols = lg.t().log_softmax(1)
    t2i = -(0.5 * (cols[0, 0] + cols[0, 1]) + cols[1, 2] + 0.5 * (cols[2, 0] + cols[2, 1]) + cols[3, 2]) / 4
    got = contrastive_with_ids(img3, txt4, img_ids, txt_ids, 1.0)
    assert got.item() == pytest.approx(((i2t + t2i) / 2).item(), rel=1e-6)
    with pytest.raises(ValueError, match="every image needs a caption"):
        contrastive_with_ids(img3, txt4, torch.tensor([7, 8, 9]), txt_ids, 1.0)


@pytest.mark.parametrize("world,n,k", [(1, 4, 3), (2, 3, 2), (4, 2, 5)])
def test_local_loss_mean_over_ranks_equals_global_loss_and_gradients(world, n, k):
    from ccrk_ray.objectives.losses import one_to_k_contrastive_local

    g = torch.Generator().manual_seed(world * 10 + n)
    img = F.normalize(torch.randn(world * n, 8, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(world * n * k, 8, generator=g), dim=-1).requires_grad_()
    full = one_to_k_contrastive(img, txt, 0.1)
    g_full = torch.autograd.grad(full, (img, txt))
    local = torch.stack([one_to_k_contrastive_local(img[r * n:(r + 1) * n], txt[r * n * k:(r + 1) * n * k],
                                                    img, txt, r, 0.1) for r in range(world)]).mean()
    g_local = torch.autograd.grad(local, (img, txt))
    assert local.item() == pytest.approx(full.item(), rel=1e-6)
    for a, b in zip(g_local, g_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rank 9 outside"):
        one_to_k_contrastive_local(img[:n], txt[:n * k], img, txt, 9, 0.1)
