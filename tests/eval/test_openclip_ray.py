"""``ccrk evaluate --model openclip:ARCH --pretrained FILE``: a tiny open_clip model (its config
and weights written here, nothing downloaded) evaluated as a user runs it, on a real local Ray
cluster; the recall equals a direct computation with open_clip itself (its own preprocessing and
tokenizer, ``ccrk_ray.metrics.retrieval_metrics``)."""

from __future__ import annotations

import io
import json

import numpy as np
import open_clip            # the optional extra [openclip]: requirements-test.txt installs it
import pyarrow.parquet as pq
import pytest
import torch

from tests.commands import ccrk, noise
from tests.conftest import RAY

pytestmark = RAY

LANGS = ["en", "de", "zh"]
TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                             "head_width": 16},
             "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("openclip")
    config = root / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip")
    weights = root / "tiny-clip.pt"
    torch.save(model.state_dict(), weights)
    return config, weights


def direct_metrics(config, weights, test_dir):
    """What open_clip itself computes: its preprocess and tokenizer, first caption per language."""
    from PIL import Image

    from ccrk_ray.metrics import retrieval_metrics

    open_clip.add_model_config(config)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(weights))
    tokenizer = open_clip.get_tokenizer("tiny-clip")
    table = pq.read_table(test_dir).to_pydict()
    order = np.argsort(table["image_id"], kind="stable")
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(io.BytesIO(table["image"][i])).convert("RGB")) for i in order])
        image_feat = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        out = {}
        for lang in LANGS:
            captions = [table[f"captions_{lang}"][i][0] for i in order]
            text_feat = torch.nn.functional.normalize(model.encode_text(tokenizer(captions)), dim=-1)
            out[lang] = retrieval_metrics((text_feat @ image_feat.T).numpy(), np.arange(len(order)))
    return out, images


def test_an_open_clip_model_is_evaluated_with_its_own_preprocessing_and_tokenizer(tiny_clip, tiny_data, tmp_path):
    config, weights = tiny_clip
    out = tmp_path / "eval"
    res = ccrk("evaluate", "--model", f"openclip:{config}", "--pretrained", weights, "--data", tiny_data["test"],
               "--out", out, "--languages", ",".join(LANGS), "--dataset-name", "tiny", "--batch-size", "16",
               timeout=600)
    assert noise(res) == [], "\n".join(noise(res))
    assert "embedded 40 images on 1 CPU actor(s)" in res.stdout and "images/s, fp32)" in res.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == f"openclip:{config}" and report["pretrained"] == str(weights)
    assert report["k_test"] is None and report["num_images"] == 40
    direct, _ = direct_metrics(config, weights, tiny_data["test"])
    for lang in LANGS:
        for d in ("t2i", "i2t"):
            for k in ("R@1", "R@5", "R@10", "MedR"):
                assert report["languages"][lang][d][k] == pytest.approx(direct[lang][d][k]), (lang, d, k)
    assert report["mrv"]["t2i"] is not None
    names = sorted(p.name for p in (out / "clip_benchmark").iterdir())
    assert names[0].startswith("tiny_") and "_tiny-clip_" in names[0] and len(names) == 3
    # an ITM re-ranking needs an ITM head: one clear line, before any cluster starts
    res = ccrk("evaluate", "--model", f"openclip:{config}", "--pretrained", weights, "--data", tiny_data["test"],
               "--out", out, "--k-test", "8", check=False, timeout=300)
    assert res.returncode == 2 and "needs a model with fusion layers (ITM head)" in res.stderr


def test_the_data_path_gives_open_clips_own_pixels(tiny_clip, tiny_data):
    """Resize of the shorter side + centre crop (bicubic), uint8, then the model's mean/std: the
    same tensors open_clip's preprocess makes."""
    from PIL import Image

    from ccrk_ray.data.transforms import ImageTransform
    from ccrk_ray.model.openclip import OpenClipModel, OpenClipSpec

    config, weights = tiny_clip
    ours = OpenClipModel(OpenClipSpec(str(config), str(weights)))
    assert (ours.image_size, ours.resize_mode, ours.context_length) == (32, "shortest", 24)
    table = pq.read_table(tiny_data["test"]).to_pydict()
    transform = ImageTransform(32, train=False, resize="shortest")
    _, preprocess = open_clip.create_model_and_transforms("tiny-clip")[1:]
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    for img in [Image.open(io.BytesIO(raw)).convert("RGB") for raw in table["image"][:2]] + [wide]:
        pixels = torch.as_tensor(transform(img)).unsqueeze(0)
        assert torch.allclose(ours.normalize_pixels(pixels)[0], preprocess(img), atol=1e-6)
