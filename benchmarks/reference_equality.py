"""Equality with the CCRK reference code's own model, on checkpoints it writes.

    .venv/bin/python benchmarks/reference_equality.py --reference CCRK_CLONE --reference-path PKGS [--out DIR]

The reference (BUAADreamer/CCRK, a local clone: nothing of it is in this project) builds its
pre-training model ``UniAlignLM`` from tiny local stand-ins of its inputs: an "xlm-roberta-large"
folder (24 layers, of which it keeps 1, 3, ..., 23 as 6 text + 6 fusion layers, and its lm_head)
and a Microsoft-layout Swin checkpoint. It writes pre-training's file in both wrappings (the full
one with optimizer/RNG state, and ``{'model': ...}``), and a fine-tuned ``checkpoint_best.pth`` from
its ``RetrievalModel`` loaded with ``load_pretrained`` as ``Retrieval.py`` does. On fixed images (uint8,
normalised by the reference with CLIP's statistics) and captions (one padded) it records its ITC
features, ITM logits and MLM logits.

Then ``ccrk import-checkpoint`` (as a user runs it) converts each file, ``ccrk_ray.load_model``
loads it, and the same outputs are compared in float32. Printed: the maximum absolute
difference per output and file; the targets are 1e-4 (ITC, ITM) and 1e-3 (MLM).

The reference needs transformers 4.x (its ``xbert.py`` uses APIs 5.x removed) and scipy; install
them apart and pass the folder as ``--reference-path``; only the reference side (a child process)
sees it:

    .venv/bin/python -m pip install --target /tmp/refpkgs "transformers==4.40.2" scipy
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWIN = {"vision_width": 128, "image_res": 64, "window_size": 2, "embed_dim": 16, "depths": [2, 2, 2, 2],
        "num_heads": [2, 2, 4, 8]}
TEXT = dict(vocab_size=100, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=24,
            max_position_embeddings=40, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
            eos_token_id=2)
TARGETS = {"itc_image": 1e-4, "itc_text": 1e-4, "itm": 1e-4, "mlm": 1e-3}


def inputs():
    import torch

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (4, 3, SWIN["image_res"], SWIN["image_res"]), dtype=torch.uint8, generator=g)
    ids = torch.randint(3, TEXT["vocab_size"], (4, 12), generator=g)
    ids[:, 0] = 0
    mask = torch.ones_like(ids)
    for row, length in ((1, 7), (3, 9)):               # shorter captions: padding must not count
        ids[row, length - 1], ids[row, length:], mask[row, length:] = 2, 1, 0
    ids[[0, 2], -1] = 2
    return pixels, ids, mask


def reference_side(work: Path) -> None:
    """Runs with the reference repository and transformers 4.x on sys.path."""
    import random

    import numpy as np
    import torch
    from models.model_pretrain_mm import UniAlignLM
    from models.model_retrieval import RetrievalModel
    from models.swin_transformer import SwinTransformer
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

    torch.manual_seed(0)
    text_dir = work / "xlm-roberta-large"               # the reference picks layers by this name
    text_dir.mkdir(parents=True, exist_ok=True)
    mlm = XLMRobertaForMaskedLM(XLMRobertaConfig(**TEXT))
    mlm.config.to_json_file(str(text_dir / "config.json"))
    torch.save(mlm.state_dict(), text_dir / "pytorch_model.bin")
    swin = SwinTransformer(img_size=SWIN["image_res"], patch_size=4, in_chans=3, embed_dim=SWIN["embed_dim"],
                           depths=SWIN["depths"], num_heads=SWIN["num_heads"], window_size=SWIN["window_size"])
    with torch.no_grad():
        for name, p in swin.named_parameters():      # trained-looking weights, not the zero/one init
            p.add_(torch.randn_like(p) * (0.1 if "norm" in name else 0.05))
    torch.save({"model": swin.state_dict()}, work / "swin.pth")
    (work / "swin.json").write_text(json.dumps({**SWIN, "ckpt": str(work / "swin.pth")}))
    config = {"use_clip_vit": False, "use_swin": True, "vision_config": str(work / "swin.json"),
              "image_res": SWIN["image_res"], "patch_size": 32, "text_encoder": str(text_dir),
              "text_num_hidden_layers": 12, "embed_dim": 16, "temp": 0.07, "use_one_cl_proj_only": False,
              "cclm_easy": 0, "max_tokens": 12, "max_words": 40}

    pixels, ids, mask = inputs()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    images = (pixels.float() / 255 - mean) / std

    @torch.no_grad()
    def outputs(model, with_mlm):
        model.eval()
        image_embeds, image_atts = model.get_vision_embeds(images)
        text_embeds = model.get_text_embeds(ids, mask)
        image_feat, text_feat = model.get_features(image_embeds, text_embeds)
        cross = model.get_cross_embeds(image_embeds, image_atts, text_embeds=text_embeds, text_atts=mask)
        out = {"itc_image": image_feat, "itc_text": text_feat, "itm": model.itm_head(cross[:, 0])}
        if with_mlm:
            out["mlm"] = model.text_encoder(ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                            encoder_attention_mask=image_atts, return_dict=True, return_logits=True)
        return out

    torch.manual_seed(1)
    model = UniAlignLM(config)
    with torch.no_grad():                              # trained-looking fusion and heads
        for name, p in model.named_parameters():
            if not name.startswith("vision_encoder.") and "LayerNorm" not in name and name != "temp":
                p.add_(torch.randn_like(p) * 0.02)
    state = model.state_dict()
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {}, "config": config,
                "epoch": 29, "random_state": random.getstate(), "np_random_state": np.random.get_state(),
                "torch_rng_state": torch.get_rng_state(), "global_step": 1000}, work / "model_state_epoch_29.th")
    torch.save({"model": state}, work / "pretrain_model_only.th")
    results = {"pretrain": outputs(model, True)}

    retrieval = RetrievalModel(config)
    retrieval.load_pretrained(str(work / "pretrain_model_only.th"), config, is_eval=False)
    torch.save({"model": retrieval.state_dict(), "config": config}, work / "checkpoint_best.pth")
    results["finetuned"] = outputs(retrieval, False)
    torch.save(results, work / "reference_outputs.pt")


def our_side(work: Path) -> dict:
    import torch

    import ccrk_ray
    from ccrk_ray.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["a dog runs on the grass", "ein hund läuft"] * 20, work / "tok", vocab_size=100)
    reference = torch.load(work / "reference_outputs.pt", weights_only=True)
    pixels, ids, mask = inputs()
    report = {}
    for name, src, ref, extra in (("pretrain, full wrapping", "model_state_epoch_29.th", "pretrain", ["--trust-pickle"]),
                                  ("pretrain, {'model'}", "pretrain_model_only.th", "pretrain", []),
                                  ("fine-tuned checkpoint_best.pth", "checkpoint_best.pth", "finetuned", [])):
        out = work / ("ours_" + src.replace(".", "_"))
        subprocess.run([sys.executable, "-m", "ccrk_ray", "import-checkpoint", str(work / src), "--out", str(out),
                        "--vision-config", str(work / "swin.json"), "--text-config", str(work / "xlm-roberta-large"),
                        "--tokenizer", str(tokenizer), "--quiet", *extra], check=True, cwd=REPO)
        model = ccrk_ray.load_model(out)
        with torch.no_grad():
            ours = {"itc_image": model.encode_image(pixels), "itc_text": model.encode_text(ids, mask),
                    "itm": model.match_logits(pixels, ids, mask), "mlm": model.mlm_logits(pixels, ids, mask)}
        report[name] = {k: float((ours[k] - v).abs().max()) for k, v in reference[ref].items()}
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="a clone of BUAADreamer/CCRK")
    ap.add_argument("--reference-path", required=True, help="folder with transformers 4.x and scipy (pip --target)")
    ap.add_argument("--out", default="/tmp/ccrk_reference_equality", help="working folder")
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.out)
    if args.side == "reference":
        reference_side(work)
        return 0
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([args.reference_path, args.reference])}
    subprocess.run([sys.executable, __file__, "--side", "reference", "--reference", args.reference,
                    "--reference-path", args.reference_path, "--out", str(work)], check=True, env=env,
                   cwd=args.reference)
    report = our_side(work)
    ok = True
    for name, diffs in report.items():
        cells = []
        for k, d in diffs.items():
            ok &= d <= TARGETS[k]
            cells.append(f"{k} {d:.2e}")
        print(f"{name:32s} max |ours - reference|: " + ", ".join(cells))
    print("within targets (ITC/ITM 1e-4, MLM 1e-3)" if ok else "OUTSIDE the targets")
    (work / "report.json").write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
