"""ITC + MITM-sampling step: ccrk_ray's vectorised implementation vs a per-row loop version.

    .venv/bin/python benchmarks/bench_itc_mitm.py [--n 128] [--k 10] [--d 256] [--repeats 5]

Prints the median time of each and the ratio. The loop version is the same math written the way
the reference CCRK/X-VLM code does it: a Python loop over images for the 1-to-K targets and the
loss rows, and one torch.multinomial(...).item() per image for positives and negatives.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ccrk_ray.objectives.losses import one_to_k_contrastive, sample_mitm


def loop_itc(img, txt, temp):
    n, k = img.shape[0], txt.shape[0] // img.shape[0]
    logits = img @ txt.t() / temp
    labels = torch.zeros(n, n * k)
    for i in range(n):
        labels[i][k * i:k * i + k] = 1
    loss_i2t = -torch.sum(F.log_softmax(logits, dim=1) * labels, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(logits.t(), dim=1) * labels.t(), dim=1).mean()
    return (loss_i2t + loss_t2i) / 2 / k


def loop_mitm(sim_i2t, k):
    n = sim_i2t.shape[0]
    w_i2t = F.softmax(sim_i2t, dim=1) + 1e-5
    w_t2i = F.softmax(sim_i2t.t(), dim=1) + 1e-5
    max_weight = torch.max(w_i2t) + 1e-5
    pos = []
    for b in range(n):
        pos.append(b * k + torch.multinomial(max_weight - w_i2t[b, b * k:b * k + k], 1).item())
    for i in range(n):
        w_i2t[i, k * i:k * i + k] = 0
        w_t2i[k * i:k * i + k, i] = 0
    neg_img = [torch.multinomial(w_t2i[pos[b]], 1).item() for b in range(n)]
    neg_txt = [torch.multinomial(w_i2t[b], 1).item() for b in range(n)]
    return pos, neg_txt, neg_img


def step(itc_fn, mitm_fn, img, txt, temp, k):
    img = img.clone().requires_grad_()
    txt = txt.clone().requires_grad_()
    loss = itc_fn(img, txt, temp)
    loss.backward()
    with torch.no_grad():
        mitm_fn(img.detach() @ txt.detach().t() / temp, k)


def timeit(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(a.n, a.d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(a.n * a.k, a.d, generator=g), dim=-1)
    temp = 0.07
    same = torch.allclose(one_to_k_contrastive(img, txt, temp), loop_itc(img, txt, temp), rtol=1e-5)
    sim = img @ txt.t() / temp
    fast = timeit(lambda: step(one_to_k_contrastive, sample_mitm, img, txt, temp, a.k), a.repeats)
    slow = timeit(lambda: step(loop_itc, loop_mitm, img, txt, temp, a.k), a.repeats)
    fast_s = timeit(lambda: sample_mitm(sim, a.k), a.repeats)
    slow_s = timeit(lambda: loop_mitm(sim, a.k), a.repeats)
    print(f"N={a.n} K={a.k} d={a.d} threads={torch.get_num_threads()}  (ITC values equal: {same})")
    print(f"{'':24}{'vectorised':>12}{'per-row loop':>14}{'ratio':>8}")
    print(f"{'ITC fwd+bwd + sampling':24}{1000 * fast:10.2f}ms{1000 * slow:12.2f}ms{slow / fast:7.1f}x")
    print(f"{'MITM sampling alone':24}{1000 * fast_s:10.2f}ms{1000 * slow_s:12.2f}ms{slow_s / fast_s:7.1f}x")


if __name__ == "__main__":
    main()
