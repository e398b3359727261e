"""Ray Train overhead and scaling of the training step (a benchmark, not a test).

Same model, objective, batch and optimiser; the data are tensors already in memory, so only the
training step and what Ray Train adds around it are timed:

1. a plain single-process PyTorch loop;
2. the same step inside a Ray Train ``TorchTrainer`` with 1 worker (overhead ratio, target <= 1.10);
3. 2 workers (gloo, DDP, features all-gathered): throughput against 1 worker.

Every loop uses ``--threads`` torch threads per process (default 1, so that 2 workers on a 2-core
machine do not oversubscribe it). Prints the measured ratios.

    PYTHONPATH=. python benchmarks/bench_train.py [--steps 30] [--batch 32] [--k 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def setup(cfg: dict):
    from ccrk_ray.model import CCRKModel, ModelConfig
    from ccrk_ray.objectives.styles import ObjectiveModule, build_objective

    torch.manual_seed(0)
    text = dict(model_type="xlm-roberta", vocab_size=2000, hidden_size=128, num_hidden_layers=3,
                num_attention_heads=4, intermediate_size=256, max_position_embeddings=34, pad_token_id=1)
    model = CCRKModel(ModelConfig(vision_name="resnet10t", text_config=text, text_pretrained=False, text_layers=2,
                                  fusion_layers=1, embed_dim=128))
    objective = build_objective("one_to_k", itm_weight=1.0, mlm_weight=1.0, mask_token_id=1999, vocab_size=2000,
                                special_ids=[0, 1, 2, 3, 1999], languages=[str(i) for i in range(cfg["k"])])
    g = torch.Generator().manual_seed(1)
    b, k = cfg["batch"], cfg["k"]
    batch = {"pixel_values": torch.randint(0, 255, (b, 3, 64, 64), dtype=torch.uint8, generator=g),
             "input_ids": torch.randint(4, 1999, (b, k, 24), generator=g),
             "attention_mask": torch.ones(b, k, 24, dtype=torch.long)}
    return model, ObjectiveModule(model, objective), batch


def run_steps(module, model, batch, steps: int, warmup: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.param_groups(1e-4, 0.01))
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        module(batch)["loss"].backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def plain(cfg: dict) -> float:
    torch.set_num_threads(cfg["threads"])
    model, module, batch = setup(cfg)
    return statistics.median(run_steps(module.train(), model, batch, cfg["steps"], cfg["warmup"]))


def train_fn(cfg: dict):
    import ray.train.torch

    torch.set_num_threads(cfg["threads"])
    model, module, batch = setup(cfg)
    module = ray.train.torch.prepare_model(module)
    return statistics.median(run_steps(module.train(), model, batch, cfg["steps"], cfg["warmup"]))


def with_ray(cfg: dict, workers: int) -> float:
    import tempfile

    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(train_fn, train_loop_config=cfg,
                           scaling_config=ray.train.ScalingConfig(num_workers=workers,
                                                                  resources_per_worker={"CPU": 1}),
                           run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(), name="bench"))
    return float(trainer.fit().return_value)         # rank 0's median step time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=32, help="images per worker per step")
    p.add_argument("--k", type=int, default=10, help="captions per image")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    cfg = vars(args)
    import ray

    t_plain = plain(cfg)
    ray.init(num_cpus=4, log_to_driver=False)
    try:
        t1 = with_ray(cfg, 1)
        t2 = with_ray(cfg, 2)
    finally:
        ray.shutdown()
    b = args.batch
    print(f"model: resnet10t + 3-layer XLM-R (1 fusion), one_to_k ITC+MITM+CMLM, batch {b} x K={args.k}, "
          f"{args.threads} thread(s) per process, median of {args.steps} steps")
    print(f"plain PyTorch loop        : {1000 * t_plain:7.1f} ms/step  {b / t_plain:6.1f} samples/s")
    print(f"Ray Train, 1 worker       : {1000 * t1:7.1f} ms/step  {b / t1:6.1f} samples/s   "
          f"overhead ratio {t1 / t_plain:.3f} (target <= 1.10)")
    print(f"Ray Train, 2 workers (DDP): {1000 * t2:7.1f} ms/step  {2 * b / t2:6.1f} samples/s   "
          f"throughput 2 vs 1 worker {(2 * b / t2) / (b / t1):.2f}x")


if __name__ == "__main__":
    main()
