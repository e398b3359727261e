"""``ccrk mrv RANKS...``: MRV over the rank files of several runs (``ccrk_ray.eval.ranks``)."""

from __future__ import annotations

import argparse
import json

from ccrk_ray.core.config import ConfigError
from ccrk_ray.eval.ranks import mrv_over_runs



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ranks", nargs="+", metavar="RANKS",
                   help="ranks.parquet, or FILE:LANG[,LANG] to take only those languages of that run")
    p.add_argument("--out", default=None, help="also write the result as JSON here")


def main(args: argparse.Namespace) -> int:
    try:
        result = mrv_over_runs(args.ranks)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0
