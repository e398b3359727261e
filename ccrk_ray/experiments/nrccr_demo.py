"""``ccrk nrccr demo``: NRCCR's claim on a laptop. Synthetic scenes (``ccrk_ray.data.synthetic_nrccr``)
whose machine translations are wrong at rate p (an attribute swapped, a detail dropped; the
back-translation carries the same errors; the test captions are clean native ones), written in
NRCCR's own layout and converted with ``convert_nrccr``. Four objectives are trained on Ray Train
with the same budget at each p, and tested with fused native + translated queries:

    triplet        source and translation triplets (learning the translations as they are)
    +back          ... and the source ↔ back-translation triplet
    +distill       ... and the similarity / feature distillation from the cross view
    full           ... and the adversarial language term (NRCCR)

Output: DIR/data/p*/ (the splits), DIR/runs/p*/<variant>/ (each run), DIR/demo_table.{json,md}.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ccrk_ray.core.config import check_range
from ccrk_ray.core.files import prepare_out_dir
from ccrk_ray.core.log import get_logger
from ccrk_ray.core.runtime import local_cpus, ray_session
from ccrk_ray.data.nrccr import convert_nrccr, read_captions
from ccrk_ray.data.synthetic_nrccr import ERRORS, write_split
from ccrk_ray.data.tokenizer import train_tokenizer
from ccrk_ray.objectives.losses import NRCCR_WEIGHTS
from ccrk_ray.tasks.nrccr import evaluate_nrccr
from ccrk_ray.train.nrccr import NRCCRTrainConfig, check_nrccr_data, run_nrccr_training

log = get_logger(__name__)
MARKER = "ccrk-nrccr-demo.json"
OUTPUTS = ("data", "runs", "demo_table.json", "demo_table.md", MARKER)

_OFF = {k: 0.0 for k in NRCCR_WEIGHTS}
VARIANTS = {
    "triplet": {**_OFF, "triplet": 1.0, "triplet_translation": NRCCR_WEIGHTS["triplet_translation"]},
    "+back": {**_OFF, "triplet": 1.0, "triplet_translation": NRCCR_WEIGHTS["triplet_translation"],
              "back_translation": NRCCR_WEIGHTS["back_translation"]},
    "+distill": {**NRCCR_WEIGHTS, "adversarial": 0.0},
    "full": dict(NRCCR_WEIGHTS),
}


@dataclass
class NRCCRDemoConfig:
    out: str
    noise: tuple[float, ...] = (0.0, 0.5)
    variants: tuple[str, ...] = tuple(VARIANTS)
    errors: str = "systematic"
    train_items: int = 400
    val_items: int = 60
    test_items: int = 300
    captions_per_item: int = 2
    language: str = "de"
    epochs: int = 6
    global_batch_size: int = 32
    lr: float = 1e-3
    workers: tuple[int, int] = (1, 1)
    seed: int = 0
    text_width: int = 64
    model: dict[str, Any] = field(default_factory=dict)     # NRCCRConfig overrides

    def __post_init__(self):
        check_range("--train-items", self.train_items, 32)
        check_range("--val-items", self.val_items, 8)
        check_range("--test-items", self.test_items, 8)
        check_range("--epochs", self.epochs, 1)
        for p in self.noise:
            check_range("--noise", p, 0.0, 1.0)
        if self.errors not in ERRORS:
            raise ValueError(f"--errors must be one of {', '.join(ERRORS)}, got {self.errors!r}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")


def make_data(cfg: NRCCRDemoConfig, root: Path, noise: float) -> dict[str, str]:
    """The three splits at noise ``noise`` in NRCCR's layout, converted; returns their URIs."""
    out = {}
    for split, n in (("train", cfg.train_items), ("val", cfg.val_items), ("test", cfg.test_items)):
        files = write_split(root / "raw", split, n, language=cfg.language, noise=noise if split == "train" else 0.0,
                            errors=cfg.errors, captions_per_item=cfg.captions_per_item, seed=cfg.seed)
        views = {k: v for k, v in files.items() if k != "features"}
        convert_nrccr(views, root / split, language=cfg.language, split=split, features=files["features"],
                      rows_per_shard=max(n // 4, 8))
        out[split] = str(root / split)
    return out


def run_config(cfg: NRCCRDemoConfig, data: dict[str, str], tokenizer: Path, out: Path, weights: dict) -> NRCCRTrainConfig:
    w = cfg.text_width
    model = {"text_name_or_path": None, "train_layers": None, "text_hidden": w, "text_heads": 4, "key_query_size": w,
             "common_dim": 2 * w, "dropout": 0.1, "discriminator": "not-so-weak",
             "text_config": {"model_type": "bert", "hidden_size": w, "num_hidden_layers": 2, "num_attention_heads": 4,
                             "intermediate_size": 2 * w, "max_position_embeddings": 64}, **cfg.model}
    return NRCCRTrainConfig.from_dict({
        "output_dir": str(out), "name": "nrccr",
        "data": {"train": data["train"], "val": data["val"], "tokenizer": str(tokenizer), "max_length": 32,
                 "chunk_rows": 32, "caption_passes": cfg.captions_per_item},
        "model": model, "loss": {"weights": weights},
        "train": {"epochs": cfg.epochs, "global_batch_size": cfg.global_batch_size, "lr": cfg.lr, "seed": cfg.seed,
                  "log_every": 50, "patience": cfg.epochs},
        "scaling": {"workers": list(cfg.workers)}}, where="demo")


def format_table(rows: list[dict[str, Any]], noise: Sequence[float]) -> str:
    head = "| objective | " + " | ".join(f"SumR p={p:g} (t2i R@1/5/10)" for p in noise) + " |"
    lines = [head, "|---|" + "---|" * len(noise)]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        cells = []
        for p in noise:
            r = next(x for x in rows if x["variant"] == variant and x["noise"] == p)
            t = r["t2i"]
            cells.append(f"{r['SumR']:.1f} ({t['R@1']:.1f}/{t['R@5']:.1f}/{t['R@10']:.1f})")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_nrccr_demo(cfg: NRCCRDemoConfig) -> dict[str, Any]:
    out = Path(cfg.out).resolve()
    prepare_out_dir(out, MARKER, OUTPUTS, "nrccr demo")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"command": "ccrk nrccr demo"}))
    t0 = time.perf_counter()
    datasets = {p: make_data(cfg, out / "data" / f"p{p:g}", p) for p in cfg.noise}
    texts = [t for p in cfg.noise for f in sorted((out / "data" / f"p{p:g}" / "raw" / "TextData").glob("*.txt"))
             for t in read_captions(f)[1].values()]
    tokenizer = train_tokenizer(texts, out / "data" / "tokenizer", vocab_size=400)
    rows = []
    configs = {(p, v): run_config(cfg, datasets[p], tokenizer, out / "runs" / f"p{p:g}" / v, VARIANTS[v])
               for p in cfg.noise for v in cfg.variants}
    first = next(iter(configs.values()))
    with ray_session(local_cpus(first.cpus_held())):
        for (p, variant), run in configs.items():
            start = time.perf_counter()
            summary = run_nrccr_training(run, check=check_nrccr_data(run))
            chosen = summary["best_model"] or summary["model"]
            report = evaluate_nrccr(chosen, {cfg.language: datasets[p]["test"]}, Path(run.output_dir) / "test")
            lang = report["languages"][cfg.language]
            rows.append({"variant": variant, "noise": p, "SumR": lang["SumR"], "t2i": lang["t2i"], "i2t": lang["i2t"],
                         "native_SumR": lang["native"]["SumR"], "translated_SumR": lang["translated"]["SumR"],
                         "seconds": round(time.perf_counter() - start, 1)})
            log.info("p=%g %s: fused SumR %.1f (%.0f s)", p, variant, lang["SumR"], rows[-1]["seconds"])
    table = format_table(rows, cfg.noise)
    result = {"rows": rows, "seconds": round(time.perf_counter() - t0, 1), "table": table,
              "config": {k: v for k, v in cfg.__dict__.items()}}
    (out / "demo_table.json").write_text(json.dumps(result, indent=2, default=list))
    (out / "demo_table.md").write_text(table)
    return result
