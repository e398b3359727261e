"""Two-stage evaluation's driver memory: ITM features left in the object store vs held by the driver.

    .venv/bin/python benchmarks/bench_two_stage.py [--sizes 5000,25000] [--k-test 16] [--actors 2]

For each size N: a synthetic split of N images (64 px, en and de captions), a small model with a
fusion layer (resnet10t, a 2-layer 128-wide XLM-R), then in fresh child processes:

- ``ccrk evaluate --k-test K`` as it runs now (``run_evaluate``): the embedding actors keep the ITM
  features (image tokens, caption hidden states) in the object store and the eval actors read
  the pairs they re-score; the driver holds the embeddings;
- the former way, for comparison: the driver loads the split (``load_split``) and encodes it
  (``encode_split``), holding pixels, tokens and hidden states, before ranking.

Prints each child's peak RSS (``ru_maxrss``; the driver alone, Ray's processes not counted), the
wall time of ``ccrk evaluate`` and the ratio of the two peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
LANGS = ["en", "de"]


def make_model(root: Path) -> Path:
    import torch

    from ccrk_ray.data.synthetic import generate_split
    from ccrk_ray.data.tokenizer import CaptionTokenizer, iter_captions, train_tokenizer
    from ccrk_ray.model import CCRKModel, ModelConfig

    generate_split(root / "tok_data", "train", 500, languages=LANGS, image_size=32)
    tok_dir = train_tokenizer(iter_captions(root / "tok_data", LANGS), root / "tokenizer", vocab_size=600)
    tok = CaptionTokenizer(tok_dir, 24)
    text = dict(model_type="xlm-roberta", vocab_size=tok.vocab_size, hidden_size=128, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=256, max_position_embeddings=26, pad_token_id=1,
                bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    model = CCRKModel(ModelConfig(vision_name="resnet10t", text_pretrained=False, fusion_layers=1, embed_dim=64,
                                  text_config=text))
    out = root / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "preprocess.json").write_text(json.dumps({"image_size": 64, "max_length": 24, "languages": LANGS}))
    return out


def child(mode: str, model: str, data: str, out: str, k_test: int, actors: int) -> None:
    t0 = time.perf_counter()
    if mode == "actors":
        from ccrk_ray.eval.evaluate import run_evaluate

        report = run_evaluate(model, data, out, k_test=k_test, actors=actors)
        result = {"r_mean": report["mean"]["r_mean"], "k_test": report["k_test"]}
    else:
        from ccrk_ray.data.tokenizer import CaptionTokenizer
        from ccrk_ray.data.transforms import load_split
        from ccrk_ray.eval.retrieval import encode_split
        from ccrk_ray.model import CCRKModel

        split = load_split(data, LANGS, CaptionTokenizer(model, 24), 64)
        feats = encode_split(CCRKModel.from_pretrained(model), split)
        result = {"features_gib": sum(feats[k].nbytes for k in ("image_tokens", "text_hidden")) / 2 ** 30}
    result.update(seconds=round(time.perf_counter() - t0, 1),
                  peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    print(json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="5000,25000")
    ap.add_argument("--k-test", type=int, default=16)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, args.k_test, args.actors)
        return
    from ccrk_ray.data.synthetic import generate_split

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_model(root)
        for n in (int(s) for s in args.sizes.split(",")):
            data = root / f"test_{n}"
            generate_split(data, "test", n, languages=LANGS, image_size=64, seed=n)
            row = {"images": n, "captions": n * len(LANGS)}
            for mode in ("actors", "driver"):
                cmd = [sys.executable, __file__, "--k-test", str(args.k_test), "--actors", str(args.actors),
                       "--child", mode, str(model), str(data), str(root / f"out_{n}")]
                res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
                if res.returncode:
                    sys.exit(f"{mode} child failed:\n{res.stderr[-3000:]}")
                row[mode] = json.loads(res.stdout.strip().splitlines()[-1])
            row["driver_peak_ratio_former_over_now"] = round(row["driver"]["peak_rss_gib"] / row["actors"]["peak_rss_gib"], 2)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
