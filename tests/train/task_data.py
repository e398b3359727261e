"""Tiny stand-in data for the fine-tuning tasks, written in each task's real input format (Multi30K
text files, COCO Karpathy JSON, IGLUE JSON lines, WIT JSON lines with base64 pixels) from synthetic
scenes, then converted with the project's converters — the path users take with the real data."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pyarrow.parquet as pq

from ccrk_ray.data.converters import convert_coco, convert_iglue, convert_multi30k, convert_wit
from ccrk_ray.data.synthetic import generate_split


def save_tiny_model(out: Path, tokenizer_dir, fusion_layers: int = 0, max_length: int = 24) -> Path:
    """A small saved model (``fusion_layers`` > 0: with ITM head), its tokenizer and preprocessing,
    as fine-tuning and evaluation read it."""
    import torch

    from ccrk_ray.model import CCRKModel, ModelConfig
    from ccrk_ray.data.tokenizer import CaptionTokenizer
    from tests.conftest import tiny_text_config

    tok = CaptionTokenizer(tokenizer_dir, max_length)
    torch.manual_seed(0)
    text = dict(tiny_text_config(tok.vocab_size, max_length), num_hidden_layers=1 + fusion_layers)
    model = CCRKModel(ModelConfig(vision_name="resnet10t", text_pretrained=False, fusion_layers=fusion_layers,
                                  embed_dim=16, text_config=text))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "preprocess.json").write_text(json.dumps({"image_size": 32, "max_length": max_length, "languages": ["en"]}))
    return out


def save_encoders(out: Path, tokenizer_dir, max_length: int = 24) -> Path:
    """Stand-ins for pre-trained encoders as users have them on disk -- a timm vision model's weights
    (safetensors) and an HF text model directory with its tokenizer (what ``xlm-roberta-large``
    downloads to) -- and a model spec file naming them (``--checkpoint`` for fine-tuning without
    CCRK pre-training). Returns the spec's path."""
    import torch
    import yaml
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModel

    from ccrk_ray.model.encoders import build_vision_encoder
    from ccrk_ray.data.tokenizer import CaptionTokenizer
    from tests.conftest import tiny_text_config

    tok = CaptionTokenizer(tokenizer_dir, max_length)
    torch.manual_seed(3)
    cfg = dict(tiny_text_config(tok.vocab_size, max_length), num_hidden_layers=2)
    AutoModel.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(out / "text")
    tok.save_pretrained(out / "text")
    save_file(build_vision_encoder("resnet10t").state_dict(), str(out / "vision.safetensors"))
    spec = {"model": {"vision_name": "resnet10t", "vision_checkpoint": "vision.safetensors",   # relative to the spec
                      "text_name_or_path": "text", "text_layers": 1, "fusion_layers": 1, "embed_dim": 16},
            "data": {"max_length": max_length}}
    (out / "encoders.yaml").write_text(yaml.safe_dump(spec))
    return out / "encoders.yaml"


def scenes(root: Path, name: str, n: int, seed: int) -> list[dict]:
    """n synthetic rows (image bytes + a caption per language), images also saved as files."""
    generate_split(root / "parquet" / name, name, n, seed=seed, image_size=32)
    rows = []
    for f in sorted((root / "parquet" / name).glob("*.parquet")):
        rows += pq.read_table(f).to_pylist()
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r["file"] = f"{r['image_id']}.jpg"
        (images / r["file"]).write_bytes(r["image"])
    return rows


def multi30k(root: Path, splits: dict[str, list[dict]], languages=("en", "de", "fr", "cs")) -> dict[str, Path]:
    task1 = root / "multi30k" / "task1"
    (task1 / "raw").mkdir(parents=True)
    (task1 / "image_splits").mkdir()
    out = {}
    for split, rows in splits.items():
        (task1 / "image_splits" / f"{split}.txt").write_text("".join(r["file"] + "\n" for r in rows))
        captions = {}
        for lang in languages:
            path = task1 / "raw" / f"{split}.{lang}"
            path.write_text("".join(r[f"captions_{lang}"][0] + "\n" for r in rows), encoding="utf-8")
            captions[lang] = path
        out[split] = root / "converted" / "multi30k" / split
        convert_multi30k(captions, task1 / "image_splits" / f"{split}.txt", root / "images", out[split])
    return out


def coco(root: Path, train: list[dict], val: list[dict], tests: dict[str, list[dict]]) -> dict[str, Path]:
    """Karpathy JSON: train one entry per caption (2 captions per image), val/test one per image."""
    d = root / "coco"
    d.mkdir()
    entries = [{"caption": c, "image": f"train2014/{r['file']}", "image_id": r["image_id"]}
               for r in train for c in (r["captions_en"][0], r["captions_en"][0].replace(" a ", " one "))]
    (d / "coco_karpathy_train.json").write_text(json.dumps(entries))
    (root / "images" / "train2014").mkdir(exist_ok=True)
    for r in train:
        (root / "images" / "train2014" / r["file"]).write_bytes(r["image"])
    out = {"train": root / "converted" / "coco" / "train"}
    convert_coco(d / "coco_karpathy_train.json", root / "images", out["train"], lang="en")
    for name, rows, lang in [("val", val, "en")] + [(f"test_{lang}", rows, lang) for lang, rows in tests.items()]:
        per_image = [{"image": r["file"], "caption": r[f"captions_{lang}"], "image_id": r["image_id"]} for r in rows]
        (d / f"{name}.json").write_text(json.dumps(per_image, ensure_ascii=False), encoding="utf-8")
        out[name] = root / "converted" / "coco" / name
        convert_coco(d / f"{name}.json", root / "images", out[name], lang=lang)
    return out


def iglue(root: Path, splits: dict[str, tuple[list[dict], tuple[str, ...]]], folder: str = "xflickrco") -> dict[str, Path]:
    """IGLUE annotation JSON lines per language and split ({"sentences", "id", "img_path"})."""
    d = root / folder / "annotations"
    out = {}
    for split, (rows, langs) in splits.items():
        ann = {}
        for lang in langs:
            (d / lang).mkdir(parents=True, exist_ok=True)
            path = d / lang / f"{split}.jsonl"
            path.write_text("".join(json.dumps({"sentences": r[f"captions_{lang}"], "id": r["image_id"],
                                                "img_path": r["file"]}, ensure_ascii=False) + "\n" for r in rows),
                            encoding="utf-8")
            ann[lang] = path
        out[split] = root / "converted" / folder / split
        convert_iglue(ann, root / "images", out[split])
    return out


def wit(root: Path, splits: dict[str, tuple[list[dict], tuple[str, ...]]]) -> dict[str, Path]:
    """IGLUE WIT JSON lines: one line per caption, grouped by image_url, pixels in image_content."""
    d = root / "wit"
    d.mkdir()
    out = {}
    for split, (rows, langs) in splits.items():
        ann = {}
        for lang in langs:
            path = d / f"{split}_{lang}.jsonl"
            path.write_text("".join(json.dumps({
                "caption_reference_description": r[f"captions_{lang}"][0], "image_url": f"http://x/{r['file']}",
                "wit_ix": r["image_id"], "image_content": base64.b64encode(r["image"]).decode()},
                ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            ann[lang] = path
        out[split] = root / "converted" / "wit" / split
        convert_wit(ann, out[split])
    return out
