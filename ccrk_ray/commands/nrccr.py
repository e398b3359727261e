"""``ccrk nrccr train|evaluate``: NRCCR, the noise-robust CCR system (``ccrk_ray.train.nrccr``,
``ccrk_ray.tasks.nrccr``)."""

from __future__ import annotations

import argparse

from ccrk_ray.commands._args import add_set_flag, comma_numbers
from ccrk_ray.commands.convert import _lang_file_arg
from ccrk_ray.core.config import ConfigError
from ccrk_ray.experiments.nrccr_demo import VARIANTS, NRCCRDemoConfig, run_nrccr_demo
from ccrk_ray.tasks.nrccr import evaluate_nrccr, format_report, run_nrccr
from ccrk_ray.train.nrccr import NRCCRTrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=type(p))
    t = sub.add_parser("train", help="train NRCCR on Ray Train from a YAML config, then test the selected model",
                       description="Sections: data, model, loss, train, scaling (ccrk_ray.train.nrccr); examples "
                                   "in ccrk_ray/configs/nrccr_*.yaml.")
    t.add_argument("--config", required=True, help="YAML config")
    t.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    add_set_flag(t)
    e = sub.add_parser("evaluate", help="fused native + translated retrieval of a saved NRCCR model, per language",
                       description="Every caption of each split a query, natively and through its English "
                                   "translation, the two score matrices min-max normalised and mixed.")
    e.add_argument("--checkpoint", "--model", dest="model", required=True,
                   help="a saved NRCCR model directory or a training checkpoint")
    e.add_argument("--data", action="append", required=True, metavar="[LANG=]URI",
                   help="an NRCCR split with native and native_en views (ccrk convert nrccr); repeatable, "
                        "LANG=URI per language (MRV over several)")
    e.add_argument("--out", required=True, help="where report.json and report.md go")
    e.add_argument("--fusion-weight", type=float, default=0.5, help="the native query's share (default: %(default)s)")
    e.add_argument("--tokenizer", default=None, help="default: the tokenizer saved with the model")
    e.add_argument("--max-length", type=int, default=None, help="default: the model's preprocess.json")
    e.add_argument("--actors", type=int, default=0,
                   help="rank on N Ray eval actors (RAY_ADDRESS's cluster or a local one), in two passes that "
                        "never hold a score matrix; 0 (default): in this process, the same two passes")
    d = sub.add_parser("demo", help="NRCCR's claim on synthetic noisy translations: four objectives x noise levels",
                       description="Synthetic scenes whose machine translations are wrong at rate p; triplet-only, "
                                   "+back-translation, +distillation and full NRCCR trained on Ray with one budget; "
                                   "a fused-SumR table on clean native test captions.")
    d.add_argument("--out", required=True, help="output directory (new, or an earlier demo's)")
    d.add_argument("--noise", type=comma_numbers(float, "numbers in [0, 1]"), default=(0.0, 0.5),
                   help="translation error rates, comma-separated (default: 0,0.5)")
    d.add_argument("--variants", type=lambda t: tuple(x for x in t.split(",") if x), default=tuple(VARIANTS),
                   help=f"comma-separated among {','.join(VARIANTS)} (default: all)")
    d.add_argument("--errors", default="systematic", choices=["systematic", "random"],
                   help="how a wrong translation errs: the same word always mistranslated the same way "
                        "(default), or at random")
    d.add_argument("--train-items", type=int, default=400)
    d.add_argument("--val-items", type=int, default=60)
    d.add_argument("--test-items", type=int, default=300)
    d.add_argument("--epochs", type=int, default=6)
    d.add_argument("--seed", type=int, default=0)



def _data(values: list[str]) -> str | dict[str, str]:
    if len(values) == 1 and "=" not in values[0].split("://")[0]:
        return values[0]
    out = {}
    for text in values:
        try:
            lang, uri = _lang_file_arg(text)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"--data: {exc} (several splits need LANG=URI each)") from None
        if lang in out:
            raise ConfigError(f"--data: language {lang} given twice")
        out[lang] = uri
    return out


def main(args: argparse.Namespace) -> int:
    if args.action == "train":
        run_nrccr(NRCCRTrainConfig.from_yaml(args.config, args.sets), resume=args.resume)
        return 0
    if args.action == "demo":
        try:
            cfg = NRCCRDemoConfig(out=args.out, noise=args.noise, variants=args.variants, errors=args.errors,
                                  train_items=args.train_items,
                                  val_items=args.val_items, test_items=args.test_items, epochs=args.epochs,
                                  seed=args.seed)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        result = run_nrccr_demo(cfg)
        print(result["table"], flush=True)
        return 0
    report = evaluate_nrccr(args.model, _data(args.data), args.out, weight=args.fusion_weight,
                            tokenizer=args.tokenizer, max_length=args.max_length, actors=args.actors)
    print(format_report(report), flush=True)
    return 0
