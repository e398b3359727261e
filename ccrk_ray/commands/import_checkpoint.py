"""``ccrk import-checkpoint SRC --out DIR``: a checkpoint of the CCRK reference code as a saved model."""

from __future__ import annotations

import argparse

from ccrk_ray.core.log import get_logger
from ccrk_ray.model.reference import DEFAULT_TOKENIZER, import_checkpoint

log = get_logger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC",
                   help="the reference's pre-training file (model_state_epoch_*.th: full wrapping, {'model': ...} "
                        "or a bare state dict) or fine-tuned checkpoint_best.pth")
    p.add_argument("--out", required=True, help="directory of the saved model to write")
    p.add_argument("--vision-config", default=None, metavar="FILE",
                   help="the reference's Swin JSON (e.g. configs/config_swinB_384.json); default Swin-B at 224 px "
                        "(config_swinB_224.json, CCR-10-2M/3M)")
    p.add_argument("--text-config", default=None, metavar="NAME_OR_PATH",
                   help="Hugging Face config of the text encoder (name or folder); default xlm-roberta-large's")
    p.add_argument("--tokenizer", default=None, metavar="NAME_OR_PATH",
                   help=f"tokenizer saved with the model (default {DEFAULT_TOKENIZER}: from the Hugging Face cache "
                        "or hub)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a file holding more than tensors (pre-training's full wrapping has numpy RNG "
                        "state): loading it runs pickled code")


def main(args: argparse.Namespace) -> int:
    out = import_checkpoint(args.src, args.out, vision_config=args.vision_config, text_config=args.text_config,
                            tokenizer=args.tokenizer, trust_pickle=args.trust_pickle)
    log.info("imported %s -> %s (evaluate: ccrk evaluate --model %s --data SPLIT)", args.src, out, out)
    return 0
