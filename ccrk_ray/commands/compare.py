"""``ccrk compare``: the three training styles on the same data and budget, ITC-only and full,
each arm's learning rate chosen on validation, several seeds (``ccrk_ray.experiments.compare``)."""

from __future__ import annotations

import argparse

from ccrk_ray.commands._args import add_run_args, comma_list, comma_numbers, objective_numbers, run_options
from ccrk_ray.experiments.compare import BUDGETS, STYLES, VARIANTS, CompareConfig, run_compare



def add_arguments(p: argparse.ArgumentParser) -> None:
    c = CompareConfig(out="")
    add_run_args(p, c)
    p.add_argument("--objectives", type=comma_list, default=STYLES, help="comma-separated subset of %(default)s")
    p.add_argument("--variants", type=comma_list, default=VARIANTS,
                   help="itc (ITC alone, ranked by ITC) and/or full (ITC + MITM + CMLM, ranked by ITC and "
                        "two-stage) (default: %(default)s)")
    p.add_argument("--seeds", type=comma_numbers(int, "integers"), default=c.seeds,
                   help="training seeds per arm: initialisation, data order, augmentation (default: %(default)s)")
    p.add_argument("--lrs", type=comma_numbers(), default=c.lrs,
                   help="learning rates to choose from per arm, on validation with the first seed "
                        "(default: --lr for every arm)")
    p.add_argument("--objective-lrs", type=objective_numbers, default=c.objective_lrs, metavar="OBJ=LR,...",
                   help="a learning rate fixed per objective (e.g. one an earlier sweep chose), over --lrs and "
                        "--lr for the objectives it names: one_to_k=1e-3,cross_lingual=3e-3")
    p.add_argument("--budget", choices=BUDGETS, default=c.budget,
                   help="images: every arm trains --epochs (the same images and steps; 1-to-1 then meets K x "
                        "fewer captions); captions: 1-to-1 trains K x --epochs, to the same captions seen "
                        "(default: %(default)s)")
    p.add_argument("--fusion-layers", type=int, default=c.fusion_layers)
    p.add_argument("--itm-weight", type=float, default=c.itm_weight, help="the full variant's MITM weight")
    p.add_argument("--mlm-weight", type=float, default=c.mlm_weight, help="the full variant's CMLM weight")
    p.add_argument("--k-test", type=int, default=c.k_test, help="ITM re-ranking depth (two-stage) of the full variant")
    p.add_argument("--itc-only", action="store_true", help="rank the full variant by ITC similarity alone")


def main(args: argparse.Namespace) -> int:
    opts = run_options(args, drop=("itc_only",))
    if args.itc_only:
        opts["k_test"] = None
    summary = run_compare(CompareConfig(**opts).validate())
    print(summary["table"], flush=True)
    return 0
