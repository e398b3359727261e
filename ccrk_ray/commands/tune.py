"""``ccrk tune``: a Ray Tune sweep of a task's fine-tuning hyperparameters (``ccrk_ray.tune.sweep``)."""

from __future__ import annotations

import argparse

from ccrk_ray.commands._args import add_set_flag, add_task_flags
from ccrk_ray.tasks.finetune import TASKS
from ccrk_ray.tune.sweep import run_tune



def add_arguments(p: argparse.ArgumentParser) -> None:
    add_task_flags(p, TASKS, "a `ccrk finetune` config with a `tune:` section (search space, objective, ASHA)")
    p.add_argument("--num-samples", type=int, required=True, help="trials drawn from the search space")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at a time (default: as many as the cluster's CPUs/GPUs hold)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted sweep (finished trials are kept)")
    add_set_flag(p)


def main(args: argparse.Namespace) -> int:
    report = run_tune(args.task, args.config, args.start_from, args.num_samples,
                      max_concurrent=args.max_concurrent, resume=args.resume, sets=args.sets)
    return 0 if report["best"] else 1      # 1: no trial reported a validation result
