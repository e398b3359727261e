"""NRCCR's training config: the shipped task configs validate, bad values name their key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ccrk_ray.core.config import ConfigError
from ccrk_ray.train.nrccr import NRCCRTrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "ccrk_ray" / "configs" / "nrccr").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_the_shipped_configs_hold_the_reference_hyperparameters(path, monkeypatch):
    monkeypatch.setenv("CCRK_DATA_URI", "s3://bucket/data")
    cfg = NRCCRTrainConfig.from_yaml(path)
    t = cfg.train
    assert (t.lr, t.global_batch_size, t.grad_clip, t.epochs, t.discriminator_lr) == (1e-4, 128, 2.0, 50, 1e-3)
    assert cfg.loss["weights"] == {"triplet": 1.0, "triplet_translation": 0.6, "similarity_distillation": 0.4,
                                   "feature_distillation": 0.1, "back_translation": 0.5, "adversarial": 0.001}
    video = path.stem.startswith(("vatex", "msrvtt"))
    assert cfg.model["visual"] == ("frames" if video else "clip")
    assert cfg.model["train_layers"] == list(range(5 if video else 3, 12))
    assert cfg.model["discriminator"] == ("strong" if path.stem.startswith("vatex") else "not-so-weak")
    assert cfg.data.train.startswith("s3://bucket/data/nrccr/")
    # caption-level epochs as the reference's data sets: each English caption one example
    passes = {"multi30k_task1": 1, "multi30k_task2": 5, "mscoco": 5, "vatex": 10, "msrvttcn": 20}
    assert cfg.data.caption_passes == passes[path.stem.rsplit("_", 1)[0]]
    assert list(cfg.data.test) == [path.stem.rsplit("_", 1)[1]]


def test_every_task_of_the_paper_ships_a_config():
    assert [p.stem for p in CONFIGS] == sorted(
        [f"multi30k_task{t}_{lang}" for t in (1, 2) for lang in ("de", "fr", "cs")]
        + ["mscoco_ja", "mscoco_zh", "vatex_zh", "msrvttcn_zh"])


def base(tmp_path, **sections) -> dict:
    d = {"output_dir": str(tmp_path), "data": {"train": "x", "tokenizer": "t"},
         "model": {"text_name_or_path": None, "text_config": {"model_type": "bert"}}}
    for key, value in sections.items():
        d[key] = {**d.get(key, {}), **value}
    return d


@pytest.mark.parametrize("sections, needle", [
    ({"train": {"global_batch_size": 10}, "scaling": {"workers": [1, 3]}},
     "global_batch_size 10 must split into equal batches of at least 2 on every worker count 1..3 (not [3])"),
    ({"train": {"precision": "bf16"}}, "NRCCR trains in fp32"),
    ({"train": {"val_fusion_weight": 1.5}}, "train.val_fusion_weight"),
    ({"model": {"visual": "audio"}}, "visual must be one of"),
    ({"loss": {"weights": {"tripplet": 1}}}, "unknown NRCCR loss term"),
    ({"train": {"lr_decay": "fast"}}, "train.lr_decay"),
    ({"data": {"tokenizer": None}}, "data.tokenizer is needed"),
])
def test_bad_values_name_the_key(tmp_path, sections, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        NRCCRTrainConfig.from_dict(base(tmp_path, **sections))
