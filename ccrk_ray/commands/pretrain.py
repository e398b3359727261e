"""``ccrk pretrain --config FILE [--resume]``: 1-to-K pre-training on Ray Train from a YAML config
(sections documented in ``ccrk_ray.train.config``; examples in ``ccrk_ray/configs/``)."""

from __future__ import annotations

import argparse

from ccrk_ray.commands._args import add_set_flag
from ccrk_ray.tasks.pretrain import run_pretrain
from ccrk_ray.train.config import PretrainConfig



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (sections: data, model, objective, train, scaling)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the config's storage path from its latest checkpoint")
    add_set_flag(p)


def main(args: argparse.Namespace) -> int:
    run_pretrain(PretrainConfig.from_yaml(args.config, args.sets), resume=args.resume)
    return 0
