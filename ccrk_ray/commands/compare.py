"""``ccrk compare``: the three training styles on the same data, budget and seed."""

from __future__ import annotations

import argparse

from ccrk_ray.commands._args import add_run_args, comma_list, run_options
from ccrk_ray.experiments.compare import STYLES, CompareConfig, run_compare



def add_arguments(p: argparse.ArgumentParser) -> None:
    c = CompareConfig(out="")
    add_run_args(p, c)
    p.add_argument("--objectives", type=comma_list, default=STYLES, help="comma-separated subset of %(default)s")
    p.add_argument("--fusion-layers", type=int, default=c.fusion_layers)
    p.add_argument("--itm-weight", type=float, default=c.itm_weight)
    p.add_argument("--mlm-weight", type=float, default=c.mlm_weight)
    p.add_argument("--k-test", type=int, default=c.k_test, help="ITM re-ranking depth (two-stage)")
    p.add_argument("--itc-only", action="store_true", help="rank by ITC similarity alone")


def main(args: argparse.Namespace) -> int:
    opts = run_options(args, drop=("itc_only",))
    if args.itc_only:
        opts["k_test"] = None
    summary = run_compare(CompareConfig(**opts).validate())
    print(summary["table"], flush=True)
    return 0
