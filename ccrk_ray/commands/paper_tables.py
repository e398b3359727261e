"""``ccrk paper-tables --config FILE --start-from CKPT`` (``ccrk_ray.tasks.paper``)."""

from __future__ import annotations

import argparse

from ccrk_ray.tasks.paper import format_tables, run_paper_tables


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True,
                   help="YAML: output_dir, zero_shot (a ccrk finetune config of task xflickrco), few_shot "
                        "(languages, shots, data: {LANG: {train, val}}, config overrides), mrv_languages")
    p.add_argument("--start-from", "--checkpoint", dest="start_from", required=True,
                   help="the pre-trained model (a saved model or training checkpoint)")


def main(args: argparse.Namespace) -> int:
    print(format_tables(run_paper_tables(args.config, args.start_from)), end="", flush=True)
    return 0
