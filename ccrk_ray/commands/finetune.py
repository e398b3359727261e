"""``ccrk finetune --task TASK --config FILE --checkpoint CKPT [--resume]`` (``ccrk_ray.tasks.finetune``)."""

from __future__ import annotations

import argparse

from ccrk_ray.commands._args import add_set_flag, add_task_flags
from ccrk_ray.tasks.finetune import TASKS, run_finetune



def add_arguments(p: argparse.ArgumentParser) -> None:
    add_task_flags(p, TASKS, "YAML overriding ccrk_ray/configs/tasks/TASK.yaml (data URIs, output_dir, scaling, ...)")
    p.add_argument("--resume", action="store_true")
    add_set_flag(p)


def main(args: argparse.Namespace) -> int:
    run_finetune(args.task, args.config, args.start_from, resume=args.resume, sets=args.sets)
    return 0
