"""``ccrk evaluate``: per-language recall and MRV of a saved model on a parquet split
(``ccrk_ray.eval.evaluate``)."""

from __future__ import annotations

import argparse

from ccrk_ray.commands._args import comma_list
from ccrk_ray.core.config import ConfigError
from ccrk_ray.eval.evaluate import run_evaluate
from ccrk_ray.eval.report import format_table
from ccrk_ray.core.precision import PRECISIONS



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--checkpoint", dest="model", required=True,
                   help="a saved model directory or a training checkpoint (--checkpoint: the older name), or "
                        "openclip:ARCH for an open_clip model (ARCH: a name open_clip knows, or a model config JSON)")
    p.add_argument("--pretrained", default=None, metavar="TAG_OR_FILE",
                   help="with --model openclip:ARCH: open_clip's pretrained tag or a weights file")
    p.add_argument("--data", required=True, help="parquet file or prefix (local or s3://)")
    p.add_argument("--out", required=True, help="where report.json and report.md go")
    p.add_argument("--languages", type=comma_list, default=None)
    p.add_argument("--k-test", type=int, default=None,
                   help="two-stage: re-rank the top K with the ITM head (default for a model with an ITM head and "
                        "a local split: 128, at most the gallery; --itc-only turns it off)")
    p.add_argument("--image-size", type=int, default=None, help="default: the model's preprocess.json")
    p.add_argument("--max-length", type=int, default=None, help="default: the model's preprocess.json")
    p.add_argument("--tokenizer", default=None, help="default: the tokenizer saved with the model")
    p.add_argument("--actors", type=int, default=1,
                   help="Ray actors for embedding (on a cluster with GPUs: one GPU each) and for ranking")
    p.add_argument("--batch-size", type=int, default=128, help="images per embedding batch")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="embedding under autocast: amp_bf16 (= bf16), amp / amp_fp16 (= fp16), or fp32")
    p.add_argument("--folds", type=int, default=None, metavar="N",
                   help="also report the average over N consecutive folds of the split's images, each ranked as "
                        "its own gallery (COCO's 1K protocol: --folds 5 on the 5K test set)")
    p.add_argument("--itc-only", action="store_true", help="rank by ITC similarity alone (ignore --k-test)")
    p.add_argument("--tensorboard", default=None, metavar="DIR", help="also log metrics and plots here")
    p.add_argument("--save-ranks", action="store_true",
                   help="write ranks per image and language (ranks.parquet, for ccrk mrv)")
    p.add_argument("--dataset-name", default=None,
                   help="dataset name in the CLIP_benchmark JSON files (default: the last part of --data)")


def main(args: argparse.Namespace) -> int:
    if args.k_test is not None and args.k_test < 1:
        raise ConfigError(f"--k-test must be >= 1, got {args.k_test}")
    report = run_evaluate(args.model, args.data, args.out, languages=args.languages, k_test=args.k_test,
                          pretrained=args.pretrained, batch_size=args.batch_size, precision=args.precision,
                          image_size=args.image_size, max_length=args.max_length, tokenizer=args.tokenizer,
                          actors=args.actors, itc_only=args.itc_only, tensorboard=args.tensorboard,
                          save_ranks=args.save_ranks, dataset_name=args.dataset_name, folds=args.folds)
    print(format_table(report), flush=True)
    return 0
