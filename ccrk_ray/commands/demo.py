"""``ccrk demo``: synthetic data → tokenizer → 1-to-K pre-training on Ray → per-language report."""

from __future__ import annotations

import argparse

from ccrk_ray.commands._args import add_run_args, run_options
from ccrk_ray.eval.report import format_table
from ccrk_ray.experiments.demo import DemoConfig, run_demo



def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_args(p, DemoConfig(out=""))


def main(args: argparse.Namespace) -> int:
    report = run_demo(DemoConfig(**run_options(args)).validate())
    print(format_table(report), flush=True)
    return 0
