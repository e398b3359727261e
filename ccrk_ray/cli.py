"""``ccrk`` command line. Bad input is reported as one line on stderr with exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from ccrk_ray.config import ConfigError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise ConfigError(f"{self.prog}: {message}")


START_HELP = ("a saved model directory, a training checkpoint, or a model spec YAML (its model: section; "
              "pre-trained encoders, CCRK's own layers fresh)")

def _int_pair(text: str) -> tuple[int, int]:
    parts = text.split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX or N (integers), got {text!r}") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX or N, got {text!r}")
    return values[0], values[1]


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _languages(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _add_run_args(p: argparse.ArgumentParser, d) -> None:
    """Flags shared by the commands that generate the synthetic data and pretrain on Ray."""
    p.add_argument("--out", required=True, help="output directory (new, empty, or an earlier run's)")
    p.add_argument("--train-images", type=int, default=d.train_images)
    p.add_argument("--val-images", type=int, default=d.val_images)
    p.add_argument("--test-images", type=int, default=d.test_images)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--languages", type=_languages, default=d.languages,
                   help="comma-separated language codes (default: %(default)s)")
    p.add_argument("--captions-per-image", type=int, default=None, help="K (default: all languages)")
    p.add_argument("--omit-prob", type=float, default=d.omit_prob,
                   help="chance that a language's caption leaves out an optional attribute")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per worker per step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--vision-model", default=d.vision_model, help="any timm.create_model name")
    p.add_argument("--vision-kwargs", type=_json_object, default={},
                   help='JSON keyword arguments for timm.create_model, e.g. \'{"drop_path_rate": 0.1}\'')
    p.add_argument("--text-model", default=None, help="HF name or path (default: tiny XLM-R config)")
    p.add_argument("--tokenizer", default=None,
                   help="HF name or path (default: --text-model's tokenizer, else train one on the captions)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--embed-dim", type=int, default=d.embed_dim)
    p.add_argument("--workers", type=_int_pair, default=d.workers, help="MIN,MAX Ray Train workers")
    p.add_argument("--cpus-per-worker", type=int, default=d.cpus_per_worker)
    p.add_argument("--chunk-rows", type=int, default=d.chunk_rows,
                   help="shuffle granularity: each epoch reads row-group slices of this many rows in a seeded order")
    p.add_argument("--gpu", action="store_true", help="one GPU per Ray Train worker")
    p.add_argument("--precision", default=d.precision, help="fp32 or bf16 (autocast)")
    p.add_argument("--seed", type=int, default=d.seed)


def build_parser() -> argparse.ArgumentParser:
    from ccrk_ray.compare import STYLES, CompareConfig

    parser = _Parser(prog="ccrk", description="Cross-lingual cross-modal retrieval (CCRK) on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="synthetic data -> tokenizer -> 1-to-K pretraining on Ray -> report")
    _add_run_args(demo, CompareConfig(out=""))
    compare = sub.add_parser("compare", help="train one_to_k, one_to_one and cross_lingual on the same data and "
                                             "budget; per-language recall and MRV side by side")
    c = CompareConfig(out="")
    _add_run_args(compare, c)
    compare.add_argument("--objectives", type=_languages, default=STYLES,
                         help="comma-separated subset of %(default)s")
    compare.add_argument("--fusion-layers", type=int, default=c.fusion_layers)
    compare.add_argument("--itm-weight", type=float, default=c.itm_weight)
    compare.add_argument("--mlm-weight", type=float, default=c.mlm_weight)
    compare.add_argument("--k-test", type=int, default=c.k_test, help="ITM re-ranking depth (two-stage)")
    compare.add_argument("--itc-only", action="store_true", help="rank by ITC similarity alone")
    pretrain = sub.add_parser("pretrain", help="1-to-K pre-training on Ray Train from a YAML config "
                                               "(examples: ccrk_ray/configs/pretrain_*.yaml)")
    pretrain.add_argument("--config", required=True, help="YAML config (sections: data, model, objective, train, scaling)")
    pretrain.add_argument("--resume", action="store_true",
                          help="continue the run in the config's storage path from its latest checkpoint")
    from ccrk_ray.finetune import TASKS

    finetune = sub.add_parser("finetune", help="fine-tune a checkpoint on a retrieval task; best on validation "
                                               "r_mean, tested per language with MRV")
    finetune.add_argument("--task", required=True, choices=TASKS)
    finetune.add_argument("--config", required=True, help="YAML overriding ccrk_ray/configs/tasks/TASK.yaml "
                                                          "(data URIs, output_dir, scaling, ...)")
    finetune.add_argument("--checkpoint", required=True, help=START_HELP)
    finetune.add_argument("--resume", action="store_true")
    tune = sub.add_parser("tune", help="Ray Tune sweep of a task's fine-tuning hyperparameters (ASHA early stopping); "
                                       "results table, best config and best model")
    tune.add_argument("--task", required=True, choices=TASKS)
    tune.add_argument("--config", required=True, help="a `ccrk finetune` config with a `tune:` section (search "
                                                      "space, objective, ASHA)")
    tune.add_argument("--checkpoint", required=True, help=START_HELP)
    tune.add_argument("--num-samples", type=int, required=True, help="trials drawn from the search space")
    tune.add_argument("--max-concurrent", type=int, default=None,
                      help="trials at a time (default: as many as the cluster's CPUs/GPUs hold)")
    tune.add_argument("--resume", action="store_true", help="finish an interrupted sweep (finished trials are kept)")
    from ccrk_ray.data.converters import add_convert_parser

    add_convert_parser(sub)
    evaluate = sub.add_parser("evaluate", help="per-language recall and MRV of a saved model on a parquet split")
    evaluate.add_argument("--checkpoint", required=True, help="a saved model directory or a training checkpoint")
    evaluate.add_argument("--data", required=True, help="parquet file or prefix (local or s3://)")
    evaluate.add_argument("--out", required=True, help="where report.json and report.md go")
    evaluate.add_argument("--languages", type=_languages, default=None)
    evaluate.add_argument("--k-test", type=int, default=None,
                          help="two-stage: re-rank the top K with the ITM head (default for a model with an ITM "
                               "head and a local split: 128, at most the gallery; --itc-only turns it off)")
    evaluate.add_argument("--image-size", type=int, default=None, help="default: the model's preprocess.json")
    evaluate.add_argument("--max-length", type=int, default=None, help="default: the model's preprocess.json")
    evaluate.add_argument("--tokenizer", default=None, help="default: the tokenizer saved with the model")
    evaluate.add_argument("--actors", type=int, default=1, help="Ray actors for embedding and for ranking")
    evaluate.add_argument("--itc-only", action="store_true", help="rank by ITC similarity alone (ignore --k-test)")
    evaluate.add_argument("--tensorboard", default=None, metavar="DIR", help="also log metrics and plots here")
    evaluate.add_argument("--save-ranks", action="store_true", help="write ranks per image and language "
                                                                    "(ranks.parquet, for ccrk mrv)")
    evaluate.add_argument("--dataset-name", default=None, help="dataset name in the CLIP_benchmark JSON files "
                                                               "(default: the last part of --data)")
    mrv = sub.add_parser("mrv", help="MRV over the rank files (ccrk evaluate --save-ranks) of several runs")
    mrv.add_argument("ranks", nargs="+", metavar="RANKS",
                     help="ranks.parquet, or FILE:LANG[,LANG] to take only those languages of that run")
    mrv.add_argument("--out", default=None, help="also write the result as JSON here")
    validate = sub.add_parser("validate", help="check parquet data (file or prefix, local or s3://) row by row")
    validate.add_argument("uri")
    validate.add_argument("--languages", type=_languages, default=None,
                          help="caption languages to check (default: every captions_* column)")
    validate.add_argument("--min-languages", type=int, default=1, help="captions needed per row")
    validate.add_argument("--max-problems", type=int, default=20, help="problems to list (all are counted)")
    return parser


def _quiet_ray_env() -> None:
    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                       "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}.items():
        os.environ.setdefault(key, value)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "evaluate":
            from ccrk_ray.evaluate import run_evaluate

            if args.k_test is not None and args.k_test < 1:
                raise ConfigError(f"--k-test must be >= 1, got {args.k_test}")
            _quiet_ray_env()
            run_evaluate(args.checkpoint, args.data, args.out, languages=args.languages, k_test=args.k_test,
                         image_size=args.image_size, max_length=args.max_length, tokenizer=args.tokenizer,
                         actors=args.actors, itc_only=args.itc_only, tensorboard=args.tensorboard,
                         save_ranks=args.save_ranks, dataset_name=args.dataset_name)
            return 0
        if args.command == "mrv":
            from ccrk_ray.eval.ranks import mrv_over_runs

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
        if args.command == "pretrain":
            from ccrk_ray.pretrain import PretrainConfig, run_pretrain

            cfg = PretrainConfig.from_yaml(args.config)
            _quiet_ray_env()
            run_pretrain(cfg, resume=args.resume)
            return 0
        if args.command == "finetune":
            from ccrk_ray.finetune import run_finetune

            _quiet_ray_env()
            run_finetune(args.task, args.config, args.checkpoint, resume=args.resume)
            return 0
        if args.command == "tune":
            from ccrk_ray.tune import run_tune

            _quiet_ray_env()
            report = run_tune(args.task, args.config, args.checkpoint, args.num_samples,
                              max_concurrent=args.max_concurrent, resume=args.resume)
            return 0 if report["best"] else 1      # 1: no trial reported a validation result
        if args.command == "validate":
            from ccrk_ray.data.validate import report, validate

            try:
                result = validate(args.uri, args.languages, args.min_languages, args.max_problems)
            except FileNotFoundError as exc:
                raise ConfigError(str(exc)) from None
            print(report(result))
            return 0 if result.ok else 1
        if args.command == "convert":
            from ccrk_ray.data.converters import run_convert

            return run_convert(args)
        opts = {k: v for k, v in vars(args).items() if k not in ("command", "itc_only")}
        if args.command == "demo":
            from ccrk_ray.demo import DemoConfig, run_demo

            cfg = DemoConfig(**opts).validate()
            _quiet_ray_env()
            run_demo(cfg)
        elif args.command == "compare":
            from ccrk_ray.compare import CompareConfig, run_compare

            if args.itc_only:
                opts["k_test"] = None
            cfg = CompareConfig(**opts).validate()
            _quiet_ray_env()
            run_compare(cfg)
        return 0
    except ConfigError as exc:
        print(f"ccrk: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
