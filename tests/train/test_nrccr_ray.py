"""NRCCR end to end as a user runs it: data written in NRCCR's own layout, ``ccrk convert nrccr``'s
converter, ``ccrk nrccr train`` (a subprocess starting its own 2-CPU cluster: Ray Data stream, Ray
Train, fused validation, best model, test), ``ccrk nrccr evaluate`` (fused ranking on eval actors) against a direct computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from ccrk_ray.data.nrccr import convert_nrccr, load_nrccr_split, read_captions
from ccrk_ray.data.synthetic_nrccr import write_split
from ccrk_ray.data.tokenizer import CaptionTokenizer, train_tokenizer
from ccrk_ray.metrics import fuse_scores, retrieval_metrics
from ccrk_ray.model.nrccr import NRCCRModel
from ccrk_ray.model.saved import load_model
from tests.commands import ccrk, noise
from tests.conftest import RAY

pytestmark = RAY


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("nrccr")
    files = {s: write_split(root / "raw", s, n, noise=0.3 if s == "train" else 0.0, seed=0, feature_noise=0.1)
             for s, n in (("train", 192), ("val", 24), ("test", 24))}
    for split, f in files.items():
        convert_nrccr({k: v for k, v in f.items() if k != "features"}, root / split, language="de", split=split,
                      features=f["features"], rows_per_shard=24)
    texts = [t for f in files.values() for k, v in f.items() if k != "features" for t in read_captions(v)[1].values()]
    tok = train_tokenizer(texts, root / "tokenizer", vocab_size=300)
    cfg = {"output_dir": str(root / "run"),
           "data": {"train": str(root / "train"), "val": str(root / "val"), "test": {"de": str(root / "test")},
                    "tokenizer": str(tok), "max_length": 24, "chunk_rows": 16, "caption_passes": 2},
           "model": {"text_name_or_path": None, "train_layers": [1], "text_hidden": 32, "text_heads": 2,
                     "key_query_size": 16, "common_dim": 64,
                     "text_config": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
                                     "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 32}},
           "train": {"epochs": 4, "global_batch_size": 16, "lr": 1e-3, "log_every": 4, "max_steps": 36},
           "scaling": {"workers": [2, 2]}}
    (root / "first.yaml").write_text(yaml.safe_dump(cfg))
    first = ccrk("nrccr", "train", "--config", root / "first.yaml", timeout=900)
    # stopped in the middle of epoch 2 (24 steps an epoch); resumed on one worker, to the end
    cfg["train"]["max_steps"], cfg["scaling"]["workers"] = None, [1, 1]
    (root / "second.yaml").write_text(yaml.safe_dump(cfg))
    res = ccrk("nrccr", "train", "--config", root / "second.yaml", "--resume", timeout=900)
    return root, first, res


def test_train_streams_trains_resumes_mid_epoch_on_another_worker_count_selects_and_tests(run):
    root, first, res = run
    for r in (first, res):
        assert noise(r) == [], "\n".join(noise(r))
    out = root / "run"
    assert "resumed at step 36, epoch 2, 192 rows left in it" in res.stdout + res.stderr
    summary = json.loads((out / "train_result.json").read_text())
    m = summary["metrics"]
    assert m["epoch"] == 4 and m["world_size"] == 1 and summary["item"] == "features"
    # 192 items x 2 caption passes per epoch / global batch 16 = 24 steps an epoch, one worker now
    # taking the whole global batch (no accumulation)
    assert m["step"] == 96 and m["grad_accumulation"] == 1
    assert m["rows_read"] == 384 and not any(k.startswith("skipped/") and v for k, v in m.items())
    for term in ("triplet", "triplet_translation", "similarity_distillation", "feature_distillation",
                 "back_translation", "adversarial", "discriminator"):
        assert np.isfinite(m[f"loss/{term}"]), term
    # ×0.99 per complete epoch (the cut epoch 2 decided once, at its end after the resume), halved
    # (at most once in 4 epochs) after an epoch without gain at an LR held 3 epochs
    assert m["lr_next"] == pytest.approx(1e-3 * 0.99 ** 4) or m["lr_next"] == pytest.approx(0.5e-3 * 0.99 ** 4)
    assert summary["best"]["metric"] == "val/t2i_sumr" and (out / "best_model" / "tokenizer.json").exists()
    model = load_model(out / "best_model", family="nrccr")
    assert isinstance(model, NRCCRModel) and model.config.visual == "vector" and model.config.visual_dim == 32
    test = json.loads((out / "test" / "report.json").read_text())["languages"]["de"]
    assert test["t2i"]["num_queries"] == 48 and test["t2i"]["num_candidates"] == 24
    assert test["t2i"]["R@10"] > 100 * 10 / 24 + 10       # learned: well above chance (41.7 %)
    progress = sorted((out / "ray_results" / "nrccr").glob("checkpoint_0*"))[-1] / "progress.json"
    state = json.loads(progress.read_text())
    assert set(state["schedule"]) == {"best", "since_change", "without_gain"}
    assert state["lr_scale"] * 1e-3 == pytest.approx(m["lr_next"]) and state["step"] == 96
    assert (progress.parent / "discriminator_optimizer.pt").exists()
    assert "validation fused t2i SumR" in res.stdout + res.stderr


def test_evaluate_equals_a_direct_fused_computation(run, tmp_path):
    root = run[0]
    model_dir = root / "run" / "best_model"
    res = ccrk("nrccr", "evaluate", "--checkpoint", model_dir, "--data", f"de={root / 'test'}", "--out", tmp_path,
               "--fusion-weight", "0.3", "--actors", "2", timeout=300)
    report = json.loads((tmp_path / "report.json").read_text())
    assert res.stdout.strip().startswith("| lang |") and report["fusion_weight"] == 0.3
    assert report["ranked_on"] == "2 eval actor(s)"
    model = load_model(model_dir, family="nrccr").eval()
    split = load_nrccr_split(str(root / "test"), CaptionTokenizer(model_dir, 24))
    with torch.no_grad():
        items = model.encode_item(torch.as_tensor(split["visual"])[:, 0]).numpy()
        native = model.encode_text(torch.as_tensor(split["native_ids"]), torch.as_tensor(split["native_mask"])).numpy()
        english = model.encode_text(torch.as_tensor(split["native_en_ids"]),
                                    torch.as_tensor(split["native_en_mask"])).numpy()
    s1, s2 = native @ items.T, english @ items.T
    fused = 0.3 * (s1 - s1.min()) / (s1.max() - s1.min()) + 0.7 * (s2 - s2.min()) / (s2.max() - s2.min())
    want = retrieval_metrics(fused, split["owner"])
    got = report["languages"]["de"]
    for d in ("t2i", "i2t"):
        for key in ("R@1", "R@5", "R@10", "MedR", "mAP"):
            assert got[d][key] == pytest.approx(want[d][key], abs=1e-6), (d, key)
    assert got["native"]["SumR"] == pytest.approx(retrieval_metrics(s1, split["owner"])["SumR"], abs=1e-6)
    assert np.allclose(fuse_scores(s1, s2, 0.3), fused)
    # a CCRK command refuses the NRCCR model by name
    bad = ccrk("evaluate", "--model", model_dir, "--data", root / "test", "--out", tmp_path / "x", check=False,
               timeout=300)
    assert bad.returncode == 2 and "holds a saved NRCCR model, this command takes a CCRK one" in bad.stderr
