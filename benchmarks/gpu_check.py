"""GPU check of the pure core (no Ray): the CCRK model and objectives on CUDA in bf16 autocast.

    python benchmarks/gpu_check.py

Builds a fusion model (resnet10t + tiny XLM-R, 2 text + 1 fusion layers), runs the three
objectives forward/backward under torch.autocast(bfloat16), checks the losses are finite and every
parameter gets a finite gradient, times training steps, and evaluates two-stage on the GPU.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ccrk_ray.data.transforms import split_from_batch
from ccrk_ray.eval.report import report_from_ranks
from ccrk_ray.eval.retrieval import evaluate_in_process
from ccrk_ray.model import CCRKModel, ModelConfig
from ccrk_ray.objectives.styles import ObjectiveModule, build_objective

LANGS = ["zh", "en", "de", "fr", "ja", "cs", "id", "es", "ru", "tr"]


def main():
    assert torch.cuda.is_available(), "no CUDA device"
    dev = torch.device("cuda")
    print(torch.__version__, torch.cuda.get_device_name(0))
    vocab, n, k, length = 2000, 128, 10, 32
    text = dict(model_type="xlm-roberta", vocab_size=vocab, hidden_size=256, num_hidden_layers=3,
                num_attention_heads=4, intermediate_size=1024, max_position_embeddings=length + 2,
                pad_token_id=1, bos_token_id=0, eos_token_id=2)
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=g),
             "input_ids": torch.randint(4, vocab - 1, (n, k, length), generator=g),
             "attention_mask": torch.ones(n, k, length, dtype=torch.long)}
    batch["input_ids"][..., 0] = 0
    batch["input_ids"][..., -1] = 2
    batch = {key: v.to(dev) for key, v in batch.items()}
    args = dict(mask_token_id=vocab - 1, vocab_size=vocab, special_ids=[0, 1, 2, 3, vocab - 1], languages=LANGS)
    for name in ("one_to_k", "one_to_one", "cross_lingual"):
        torch.manual_seed(0)
        model = CCRKModel(ModelConfig(vision_name="resnet10t", vision_kwargs={"zero_init_last": False},
                                      text_pretrained=False, text_config=text, text_layers=2, fusion_layers=1,
                                      embed_dim=256)).to(dev)
        module = ObjectiveModule(model, build_objective(name, **args))
        opt = torch.optim.AdamW(model.param_groups(1e-4, 0.01))
        times = []
        for step in range(8):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = module(batch)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            if step == 0:
                bad = [p_name for p_name, p in model.named_parameters()
                       if p.grad is None or not torch.isfinite(p.grad).all()]
                assert not bad, f"{name}: parameters without a finite gradient: {bad[:5]}"
            opt.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        assert all(torch.isfinite(v).all() for v in out.values()), out
        terms = {key: round(float(v.detach()), 4) for key, v in out.items()}
        print(f"{name:14s} bf16 step {1000 * np.median(times[2:]):7.1f} ms (N={n}, K={k}, L={length}) {terms}")
    eval_batch = split_from_batch({key: v[:64].cpu().numpy() for key, v in batch.items()}, LANGS)
    for k_test in (None, 16):
        t = time.perf_counter()
        report = report_from_ranks(evaluate_in_process(model, eval_batch, k_test=k_test))
        print(f"evaluate_in_process on cuda, k_test={k_test}: {time.perf_counter() - t:.2f} s, "
              f"mean t2i R@10 {report['mean']['t2i']['R@10']:.1f} (untrained, chance 15.6)")
    print("GPU check passed")


if __name__ == "__main__":
    main()
