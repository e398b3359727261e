"""``ccrk validate URI``: parquet data checked row by row (``ccrk_ray.data.validate``)."""

from __future__ import annotations

import argparse

from ccrk_ray.commands._args import comma_list
from ccrk_ray.core.config import ConfigError
from ccrk_ray.data.validate import report, validate



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri")
    p.add_argument("--languages", type=comma_list, default=None,
                   help="caption languages to check (default: every captions_* column)")
    p.add_argument("--min-languages", type=int, default=1, help="captions needed per row")
    p.add_argument("--max-problems", type=int, default=20, help="problems to list (all are counted)")


def main(args: argparse.Namespace) -> int:
    try:
        result = validate(args.uri, args.languages, args.min_languages, args.max_problems)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    print(report(result))
    return 0 if result.ok else 1
