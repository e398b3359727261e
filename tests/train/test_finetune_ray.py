"""``ccrk finetune`` for every task, end to end on real Ray: stand-in data in the task's real input
format → ``ccrk convert``'s converters → fine-tuning with positives by image id → best model on
validation r_mean → per-language test report with MRV."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from ccrk_ray.core.config import ConfigError
from ccrk_ray.tasks.finetune import load_config, run_finetune
from ccrk_ray.model import CCRKModel
from tests.commands import ccrk, noise
from tests.train import task_data
from tests.conftest import RAY

pytestmark = RAY


@pytest.fixture(scope="module")
def base_model(tiny_data, tmp_path_factory):
    """A small saved model with a fusion layer (ITM head), its tokenizer and preprocessing."""
    return task_data.save_tiny_model(tmp_path_factory.mktemp("base_model"), tiny_data["tokenizer"], fusion_layers=1)


@pytest.fixture(scope="module")
def encoders(tiny_data, tmp_path_factory):
    """A model spec naming pre-trained encoders on disk (fine-tuning without CCRK pre-training)."""
    return task_data.save_encoders(tmp_path_factory.mktemp("encoders"), tiny_data["tokenizer"])


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return root, {"train": task_data.scenes(root, "train", 48, 11), "val": task_data.scenes(root, "val", 16, 12),
                  "test": task_data.scenes(root, "test", 20, 13), "test2": task_data.scenes(root, "test2", 12, 14)}


def user_config(tmp_path: Path, out: Path, data: dict, task: dict | None = None, **train) -> Path:
    # the tiny models' length and resolution (the tasks' own 384 px would make every step and
    # embedding ~100x dearer, testing nothing more: the task defaults are checked on their own)
    cfg = {"output_dir": str(out), "data": {"max_length": 24, "image_size": 32, **data, "cpus_per_actor": 0.5},
           "train": {"epochs": 2, "batch_size": 8, "global_batch_size": 8, "lr": 1e-3, "warmup": 1, **train},
           "scaling": {"workers": [1, 1], "max_failures": 0}}
    if task:
        cfg["task"] = task
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def check_report(out: Path, test_sets: dict[str, list[str]], k_test: int | None) -> dict:
    report = json.loads((out / "report.json").read_text())
    assert report["train"]["step"] > 0 and np.isfinite(report["train"]["loss"])
    best = report["best"]
    assert best is not None and best["step"] in {report["train"]["step"] // 2, report["train"]["step"]}
    assert report["train"]["best/r_mean"] == pytest.approx(best["r_mean"])
    assert sorted(report["test"]) == sorted(test_sets)
    for name, langs in test_sets.items():
        rep = report["test"][name]
        assert list(rep["languages"]) == langs and rep["k_test"] == k_test
        for lang in langs:
            m = rep["languages"][lang]
            assert 0 <= m["t2i"]["R@1"] <= m["t2i"]["R@10"] <= 100 and "MedR" in m["t2i"]
        assert set(rep["mrv"]) == {"t2i", "i2t"}
        assert (out / "test" / name / "report.json").is_file()
    # the final model is the best one on validation, and it loads
    CCRKModel.from_pretrained(out / "model")
    return report


def test_a_model_spec_loads_pretrained_encoders_and_fresh_layers_get_lr_mult(encoders, rows, tmp_path):
    """``--start-from MODEL_SPEC.yaml``: the encoders load pre-trained, CCRK's own layers start
    fresh with lr_mult x the learning rate (what each training worker builds from the config)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel

    from ccrk_ray.model import ModelConfig

    cfg = user_config(tmp_path, tmp_path / "out", {"train": "x"}, task={"k_test": 4})
    d = yaml.safe_load(cfg.read_text())
    d["model"] = {"lr_mult": 3.0}
    cfg.write_text(yaml.safe_dump(d))
    loaded, start = load_config("multi30k", cfg, encoders)
    text_dir = encoders.parent / "text"
    assert start.fresh_layers and start.init_from is None and start.model_dir is None
    assert loaded.data.tokenizer == str(text_dir) and loaded.data.max_length == 24 and loaded.data.image_size == 32
    # the spec names its files relative to itself; workers get absolute paths
    assert loaded.model["text_name_or_path"] == str(text_dir)
    assert loaded.model["vision_checkpoint"] == str(encoders.parent / "vision.safetensors")
    torch.manual_seed(0)
    model = CCRKModel(ModelConfig.from_dict(loaded.model))
    text_src = AutoModel.from_pretrained(text_dir)
    torch.testing.assert_close(model.text.embeddings.word_embeddings.weight, text_src.embeddings.word_embeddings.weight)
    torch.testing.assert_close(model.vision.state_dict()["conv1.0.weight"],
                               load_file(str(encoders.parent / "vision.safetensors"))["conv1.0.weight"])
    lr = loaded.train.lr
    by_name = {id(p): g["lr"] for g in model.param_groups(lr, 0.01) for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_name[id(named["text.embeddings.word_embeddings.weight"])] == pytest.approx(lr)
    assert by_name[id(named["vision.conv1.0.weight"])] == pytest.approx(lr)
    assert by_name[id(named["fusion.0.self_attn.in_proj_weight"])] == pytest.approx(lr)    # from text layer 2
    for fresh in ("vision_proj.weight", "text_proj.weight", "fusion.0.cross_attn.in_proj_weight",
                  "itm_head.net.0.weight", "temp"):
        assert by_name[id(named[fresh])] == pytest.approx(3 * lr), fresh


def test_multi30k_from_pretrained_encoders_as_a_user_runs_it(encoders, rows, tmp_path):
    """``ccrk finetune --start-from MODEL_SPEC.yaml`` as a user runs it (a subprocess starting its
    own local cluster): train English, test four languages; the result is an ordinary
    self-contained saved model that fine-tunes further like any other."""
    root, r = rows
    data = task_data.multi30k(root, {"train": r["train"], "val": r["val"], "test_2016_flickr": r["test"]})
    cfg = user_config(tmp_path, tmp_path / "out", {"train": str(data["train"]), "val": str(data["val"]),
                                                   "test": str(data["test_2016_flickr"])},
                      task={"k_test": 4})
    d = yaml.safe_load(cfg.read_text())
    d["model"] = {"lr_mult": 3.0}
    cfg.write_text(yaml.safe_dump(d))
    res = ccrk("finetune", "--task", "multi30k", "--config", cfg, "--start-from", encoders, timeout=600)
    assert noise(res) == [], "\n".join(noise(res))
    report = check_report(tmp_path / "out", {"test": ["en", "de", "fr", "cs"]}, 4)
    assert report["task"]["train_languages"] == ["en"] and report["train"]["step"] == 2 * 48 // 8
    saved = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert saved["text_name_or_path"] is None and saved["vision_checkpoint"] is None    # self-contained
    # nothing fresh is left: lr_mult has nothing to act on
    _, again = load_config("multi30k", cfg, tmp_path / "out" / "model")
    assert not again.fresh_layers and again.init_from == str((tmp_path / "out" / "model").resolve())


def test_mscoco_several_captions_per_image_and_test_sets_per_language(ray_local, base_model, rows, tmp_path):
    root, r = rows
    data = task_data.coco(root, r["train"], r["val"], {"en": r["test"], "ja": r["test2"]})
    cfg = user_config(tmp_path, tmp_path / "out", {"train": str(data["train"]), "val": str(data["val"]),
                                                   "test": {"en": str(data["test_en"]), "ja": str(data["test_ja"])},
                                                   "caption_passes": 2},       # the task's 5, fewer steps here
                      task={"test_languages": ["en", "ja"], "k_test": None}, epochs=1)
    from ccrk_ray.tasks.finetune import TASK_DIR

    assert yaml.safe_load((TASK_DIR / "mscoco.yaml").read_text())["data"]["caption_passes"] == 5
    report = run_finetune("mscoco", cfg, base_model)
    check_report(tmp_path / "out", {"test_en": ["en"], "test_ja": ["ja"]}, None)
    assert report["test"]["test_ja"]["num_images"] == 12
    # caption-level epochs (data.caption_passes): every train row twice, each showing its next caption
    assert report["train"]["step"] == 2 * 48 // 8
    # en and ja also as the mean of five folds (the paper's 1K protocol), the reference's fold sizes
    for name, sizes in (("test_en", [4, 4, 4, 4, 4]), ("test_ja", [2, 2, 2, 2, 4])):
        folds = report["test"][name]["folds"]
        assert folds["count"] == 5 and folds["sizes"] == sizes and folds["num_images"] == sum(sizes)
        whole, mean = report["test"][name]["languages"][name[-2:]], folds["languages"][name[-2:]]
        assert mean["t2i"]["num_queries"] == whole["t2i"]["num_queries"]         # every caption, in its fold
        assert mean["t2i"]["chance@1"] == pytest.approx(np.mean([100 / n for n in sizes]))   # galleries of a fold


def test_paper_tables_xflickrco_zero_shot_few_shot_and_mrv_from_one_checkpoint(base_model, rows, tmp_path):
    """``ccrk paper-tables`` as a user runs it (a subprocess starting its own local cluster): English
    fine-tune (zero-shot in 8 languages, translate-test), then de and ja few-shot from its model,
    then MRV with en from the English model and de/ja from theirs."""
    from ccrk_ray.eval.ranks import load_ranks
    from ccrk_ray.metrics import mean_rank_variance

    root, r = rows
    langs = ("de", "en", "es", "id", "ja", "ru", "tr", "zh")
    data = task_data.iglue(root, {"train": (r["train"], ("en",)), "valid": (r["val"], ("en",)),
                                  "test": (r["test"], langs)})
    # translate-test: the test images with each language's captions "machine-translated" (here: de and
    # ja only, like the real files lacking en); reported beside the test set in those languages
    gmt = task_data.iglue(root, {"test_gmt": (r["test"], ("de", "ja"))}, folder="gmt")
    few = task_data.iglue(root, {"train_10": (r["val"], ("de", "ja")), "dev": (r["test2"], ("de", "ja"))},
                          folder="fewshot")
    zero = yaml.safe_load(user_config(tmp_path, tmp_path / "unused", {
        "train": str(data["train"]), "val": str(data["valid"]), "test": str(data["test"]),
        "translate_test": str(gmt["test_gmt"]), "caption_passes": 1},       # passes: tested with mscoco
        task={"k_test": 3}, epochs=1).read_text())
    few_config = yaml.safe_load(user_config(tmp_path, tmp_path / "unused", {}, task={"k_test": 3}, epochs=1)
                                .read_text())
    cfg = tmp_path / "paper.yaml"
    cfg.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "paper"), "zero_shot": {k: v for k, v in zero.items() if k != "output_dir"},
        "few_shot": {"languages": ["de", "ja"], "shots": 10,
                     "data": {lang: {"train": str(few["train_10"]), "val": str(few["dev"])} for lang in ("de", "ja")},
                     "config": {k: v for k, v in few_config.items() if k != "output_dir"}},
        "mrv_languages": ["en", "de", "ja"]}))
    res = ccrk("paper-tables", "--config", cfg, "--start-from", base_model, timeout=900)
    assert noise(res) == [], "\n".join(noise(res))
    out = tmp_path / "paper"
    tables = json.loads((out / "paper_tables.json").read_text())
    assert res.stdout.endswith((out / "paper_tables.md").read_text())          # the tables, printed last
    check_report(out / "zero_shot", {"test": list(langs), "translate_test": ["de", "ja"]}, 3)
    for lang in ("de", "ja"):
        report = check_report(out / "few_shot" / lang, {"test": [lang]}, 3)
        assert report["train"]["step"] == 16 // 8 and report["task"]["train_languages"] == [lang]
        assert tables["recall_at_1"]["few_shot_10"][lang]["t2i"] == report["test"]["test"]["languages"][lang]["t2i"]["R@1"]
    zero_report = json.loads((out / "zero_shot" / "report.json").read_text())
    row = tables["recall_at_1"]["zero_shot"]
    assert row["avg"]["i2t"] == pytest.approx(np.mean([zero_report["test"]["test"]["languages"][lang]["i2t"]["R@1"]
                                                       for lang in langs if lang != "en"]))
    assert set(tables["recall_at_1"]["translate_test"]) == {"de", "ja", "avg"}
    # MRV: en from the English model's ranks, de and ja from each few-shot model's
    cols = [load_ranks(out / "zero_shot" / "test" / "test" / "ranks.parquet", ["en"])]
    cols += [load_ranks(out / "few_shot" / lang / "test" / "test" / "ranks.parquet", [lang]) for lang in ("de", "ja")]
    assert all(list(c[0]) == list(cols[0][0]) for c in cols)
    for j, d in enumerate(("t2i", "i2t")):
        assert tables["mrv"]["mrv"][d] == pytest.approx(mean_rank_variance(np.hstack([c[2 + j] for c in cols])))
    text = (out / "paper_tables.md").read_text()
    assert "| few_shot_10 | IR |" in text and "MRV over en, de, ja (20 test images" in text
    # submitted again: every run is found done (no report rewritten), the same tables
    reports = [out / "zero_shot" / "report.json"] + [out / "few_shot" / lang / "report.json" for lang in ("de", "ja")]
    written = [p.stat().st_mtime_ns for p in reports]
    assert ccrk("paper-tables", "--config", cfg, "--start-from", base_model, timeout=300).returncode == 0
    again = json.loads((out / "paper_tables.json").read_text())
    assert again["recall_at_1"] == tables["recall_at_1"] and again["mrv"] == tables["mrv"]
    assert [p.stat().st_mtime_ns for p in reports] == written


def test_wit_per_language_test_sets(ray_local, base_model, rows, tmp_path):
    root, r = rows
    data = task_data.wit(root, {"train": (r["train"], ("en",)), "val": (r["val"], ("en",)),
                                "test_de": (r["test"], ("de",)), "test_tr": (r["test2"], ("tr",))})
    cfg = user_config(tmp_path, tmp_path / "out", {"train": str(data["train"]), "val": str(data["val"]),
                                                   "test": {"de": str(data["test_de"]), "tr": str(data["test_tr"])}},
                      task={"test_languages": ["de", "tr"], "k_test": None}, epochs=1)
    run_finetune("wit", cfg, base_model)
    check_report(tmp_path / "out", {"test_de": ["de"], "test_tr": ["tr"]}, None)


def test_bad_finetune_configs_are_clear_errors(base_model, tmp_path):
    cfg = user_config(tmp_path, tmp_path / "o", {"train": "x", "test": {"xx": "y"}})
    with pytest.raises(ConfigError, match="data.test has sets for xx, not among task.test_languages"):
        load_config("multi30k", cfg, base_model)
    cfg = user_config(tmp_path, tmp_path / "o", {"train": "x", "translate_test": {"de": "y", "xx": "z"}})
    with pytest.raises(ConfigError, match="data.translate_test has sets for xx, not among task.test_languages"):
        load_config("multi30k", cfg, base_model)
    cfg = user_config(tmp_path, tmp_path / "o", {"train": "x"}, task={"name": "wit"})
    with pytest.raises(ConfigError, match="task.name 'wit' does not match --task multi30k"):
        load_config("multi30k", cfg, base_model)
    with pytest.raises(ConfigError, match="is not a saved model"):
        load_config("multi30k", cfg, tmp_path)
    cfg = user_config(tmp_path, tmp_path / "o", {"train": "x"})
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"data": {"tokenizer": "t"}}))
    with pytest.raises(ConfigError, match="a model spec file needs a model: mapping"):
        load_config("multi30k", cfg, spec)
    spec.write_text(yaml.safe_dump({"model": {"vision": "resnet10t"}}))
    with pytest.raises(ConfigError, match=r"spec.yaml: model: unknown key\(s\) vision"):
        load_config("multi30k", cfg, spec)
    spec.write_text(yaml.safe_dump({"model": {"vision_name": "resnet10t", "text_config": {"model_type": "bert"}}}))
    with pytest.raises(ConfigError, match="data.tokenizer is required: the model spec"):
        load_config("multi30k", cfg, spec)
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"output_dir": "o", "data": {"train": "x"}, "model": {"fusion_layers": 3}}))
    with pytest.raises(ConfigError, match="only lr_mult, temperature can be set when fine-tuning"):
        load_config("multi30k", path, base_model)
    # the shipped defaults reach the config, the user's values win
    cfg = user_config(tmp_path, tmp_path / "o", {"train": "x"}, lr=0.5)
    d = yaml.safe_load(cfg.read_text())
    del d["data"]["image_size"]                   # the task's own resolution
    cfg.write_text(yaml.safe_dump(d))
    loaded, _ = load_config("multi30k", cfg, base_model)
    assert loaded.train.lr == 0.5 and loaded.train.schedule == "linear" and loaded.task.k_test == 128
    assert loaded.data.image_size == 384 and loaded.data.image_keys and loaded.data.languages == ("en",)
