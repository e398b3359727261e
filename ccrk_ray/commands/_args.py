"""Argument types and flag groups shared by the subcommands."""

from __future__ import annotations

import argparse
import json

from ccrk_ray.core.config import ConfigError, parse_sets


class Parser(argparse.ArgumentParser):
    """Usage errors are one line (a ConfigError the CLI reports), not a usage dump."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message}")


START_HELP = ("a saved model directory, a training checkpoint, or a model spec YAML (its model: section; "
              "pre-trained encoders, CCRK's own layers fresh)")


def add_task_flags(p: argparse.ArgumentParser, tasks, config_help: str) -> None:
    """--task, --config and --start-from (old name --checkpoint): what finetune and tune share."""
    p.add_argument("--task", required=True, choices=tasks)
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--start-from", "--checkpoint", dest="start_from", required=True, metavar="MODEL",
                   help=START_HELP + " (--checkpoint: the older name)")


def set_item(text: str) -> str:
    """A --set item whose form is checked at once (its key and value are checked with the config)."""
    try:
        parse_sets([text])
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--set {text!r}: ")) from None
    return text


def add_set_flag(p: argparse.ArgumentParser) -> None:
    """--set section.key=value (repeatable): a config value from the command line, on top of the file."""
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE", type=set_item,
                   help="override a config value (repeatable; YAML values: train.lr=1e-4, "
                        "data.languages=[en,de], scaling.workers=[2,4]); checked like the file's")


def int_pair(text: str) -> tuple[int, int]:
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


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def keyed_numbers(text: str, what: str = "KEY=X") -> dict[str, float]:
    """``a=1,b=2e-3`` as {"a": 1.0, "b": 0.002}; an item without a key is stored under ``*``."""
    out: dict[str, float] = {}
    for item in comma_list(text):
        key, _, value = item.rpartition("=")
        try:
            out[key.strip() or "*"] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} items, got {item!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"expected {what} items, got nothing")
    return out


def omit_probs(text: str) -> float | dict[str, float]:
    """``0.2`` or ``0.1,zh=0.5,ja=0.4`` (the bare number for the unnamed languages, key ``*``)."""
    out = keyed_numbers(text, "P or LANG=P")
    return out["*"] if list(out) == ["*"] else out


def objective_numbers(text: str) -> dict[str, float]:
    """``one_to_k=1e-3,cross_lingual=3e-3``: every item names its key."""
    out = keyed_numbers(text, "NAME=X")
    if "*" in out:
        raise argparse.ArgumentTypeError(f"expected NAME=X items, each with its name, got {text!r}")
    return out


def comma_numbers(cast=float, what: str = "numbers"):
    """An argparse type: comma-separated values read by ``cast`` (``float``, ``int``)."""
    def parse(text: str) -> tuple:
        try:
            return tuple(cast(x) for x in comma_list(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
    return parse


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def add_run_args(p: argparse.ArgumentParser, d) -> None:
    """Flags of the commands that generate synthetic data and pre-train on it (demo, compare)."""
    p.add_argument("--out", required=True, help="output directory (new, empty, or an earlier run's)")
    p.add_argument("--train-images", type=int, default=d.train_images)
    p.add_argument("--val-images", type=int, default=d.val_images)
    p.add_argument("--test-images", type=int, default=d.test_images)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--languages", type=comma_list, default=d.languages,
                   help="comma-separated language codes (default: %(default)s)")
    p.add_argument("--captions-per-image", type=int, default=None, help="K (default: all languages)")
    p.add_argument("--omit-prob", type=omit_probs, default=d.omit_prob,
                   help="chance that a language's caption leaves out an optional attribute: P for every "
                        "language, or LANG=P,... per language with a bare P for the others "
                        "(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per worker per step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--vision-model", default=d.vision_model, help="any timm.create_model name")
    p.add_argument("--vision-kwargs", type=json_object, default={},
                   help='JSON keyword arguments for timm.create_model, e.g. \'{"drop_path_rate": 0.1}\'')
    p.add_argument("--text-model", default=None, help="HF name or path (default: tiny XLM-R config)")
    p.add_argument("--tokenizer", default=None,
                   help="HF name or path (default: --text-model's tokenizer, else train one on the captions)")
    p.add_argument("--text-layers", type=int, default=d.text_layers,
                   help="layers of the default tiny text encoder (ignored with --text-model)")
    p.add_argument("--text-width", type=int, default=d.text_width,
                   help="hidden size of the default tiny text encoder (ignored with --text-model)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--embed-dim", type=int, default=d.embed_dim)
    p.add_argument("--workers", type=int_pair, default=d.workers, help="MIN,MAX Ray Train workers")
    p.add_argument("--cpus-per-worker", type=int, default=d.cpus_per_worker)
    p.add_argument("--chunk-rows", type=int, default=d.chunk_rows,
                   help="shuffle granularity: each epoch reads row-group slices of this many rows in a seeded order")
    p.add_argument("--gpu", action="store_true", help="one GPU per Ray Train worker")
    p.add_argument("--precision", default=d.precision,
                   help="fp32, amp_bf16 (alias bf16) or amp / amp_fp16 (alias fp16: float16 autocast with a "
                        "gradient scaler), as open_clip names them")
    p.add_argument("--seed", type=int, default=d.seed)


def run_options(args: argparse.Namespace, drop: tuple[str, ...] = ()) -> dict:
    """The parsed flags as config fields (the CLI's own flags left out)."""
    skip = {"command", "verbose", "quiet", "s3_retries", "s3_connect_timeout", "s3_request_timeout", *drop}
    return {k: v for k, v in vars(args).items() if k not in skip}
