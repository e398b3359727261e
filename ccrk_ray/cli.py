"""The ``ccrk`` command table and its one error handler.

Each subcommand lives in ``ccrk_ray.commands.<name>`` (``HELP``, ``add_arguments``, ``main``) and is
imported only when it runs, so ``ccrk --help`` answers without loading torch or Ray. Expected
errors are one line on stderr: ``ConfigError`` (a bad flag, config value, path, model or tokenizer)
exits 2, ``DataError`` (data that cannot be used) exits 1; ``--verbose`` adds the traceback.
Anything else is a bug and keeps its traceback. Every command takes ``--verbose`` and ``--quiet``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from typing import Sequence

from ccrk_ray.commands._args import Parser
from ccrk_ray.core.config import ConfigError, DataError
from ccrk_ray.core.log import setup_logging
from ccrk_ray.core.runtime import quiet_ray
from ccrk_ray.core.storage import S3_SETTINGS, configure_s3

# name: one-line help (kept here so that `ccrk --help` imports no subcommand)
COMMANDS = {
    "demo": "synthetic data -> tokenizer -> 1-to-K pretraining on Ray -> report",
    "compare": "one_to_k vs one_to_one vs cross_lingual on the same data and budget, ITC-only and full, "
               "learning rate per arm, several seeds; recall and MRV with their spread",
    "pretrain": "1-to-K pre-training on Ray Train from a YAML config",
    "finetune": "fine-tune a checkpoint on a retrieval task; best on validation, tested per language with MRV",
    "paper-tables": "the paper's xFlickr&CO tables from a pre-trained checkpoint: zero-shot, few-shot per language, MRV",
    "tune": "Ray Tune sweep of a task's fine-tuning hyperparameters; results table, best config and model",
    "evaluate": "per-language recall and MRV of a saved model on a parquet split",
    "convert": "convert a real data set into ccrk-ray parquet shards",
    "import-checkpoint": "a checkpoint of the CCRK reference code (pre-trained or fine-tuned) as a saved model",
    "nrccr": "NRCCR (noise-robust CCR from machine translations): train / evaluate",
    "validate": "check parquet data (file or prefix, local or s3://) row by row",
    "mrv": "MRV over the rank files (ccrk evaluate --save-ranks) of several runs",
}


def _command_module(name: str):
    return importlib.import_module(f"ccrk_ray.commands.{name.replace('-', '_')}")


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in ``argv`` (if any) is imported to add its flags."""
    parser = Parser(prog="ccrk", description="Cross-lingual cross-modal retrieval (CCRK) on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        out = p.add_mutually_exclusive_group()
        out.add_argument("-v", "--verbose", action="store_true",
                         help="debug lines, Ray's own log lines, tracebacks of errors")
        out.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
        s3 = p.add_argument_group("object storage (s3://)")
        s3.add_argument("--s3-retries", type=int, default=None, metavar="N",
                        help=f"retries of a failed S3 request (default {S3_SETTINGS['retries'][1]}, or $CCRK_S3_RETRIES)")
        s3.add_argument("--s3-connect-timeout", type=float, default=None, metavar="S",
                        help=f"seconds (default {S3_SETTINGS['connect_timeout'][1]:g}, or $CCRK_S3_CONNECT_TIMEOUT)")
        s3.add_argument("--s3-request-timeout", type=float, default=None, metavar="S",
                        help=f"seconds (default {S3_SETTINGS['request_timeout'][1]:g}, or $CCRK_S3_REQUEST_TIMEOUT)")
        if name == chosen:
            _command_module(name).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = False
    try:
        args = build_parser(argv).parse_args(argv)
        verbose = args.verbose
        setup_logging(1 if args.verbose else -1 if args.quiet else 0)
        configure_s3(args.s3_retries, args.s3_connect_timeout, args.s3_request_timeout)
        quiet_ray()
        return _command_module(args.command).main(args)
    except (ConfigError, DataError) as exc:
        if verbose:
            traceback.print_exc()
        print(f"ccrk: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
