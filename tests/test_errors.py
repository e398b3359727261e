"""Every mistake a user can make is one line on stderr naming the file, row, field or config key,
exit code 2 (usage, config, model, tokenizer) or 1 (data), before any Ray cluster starts, and with
no traceback. Each case runs ``ccrk`` as a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import tiny_text_config

REPO = Path(__file__).resolve().parents[1]


def ccrk(tmp_path: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``ccrk ARGS``; Ray's session files would go under tmp_path/ray, which must stay empty."""
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    environ.update(PYTHONPATH=str(REPO), RAY_TMPDIR=str(tmp_path / "ray"), **(env or {}))
    res = subprocess.run([sys.executable, "-m", "ccrk_ray", *map(str, args)], capture_output=True, text=True,
                         timeout=180, cwd=REPO, env=environ)
    assert not list((tmp_path / "ray").glob("**/session_*")), "a Ray cluster was started"
    return res


def one_line(res: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == code and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def pretrain_config(tmp_path: Path, tiny_data, **sections) -> Path:
    cfg = {"output_dir": str(tmp_path / "out"),
           "data": {"train": str(tiny_data["train"]), "languages": ["en", "de"], "image_size": 32,
                    "max_length": 16, "tokenizer": str(tiny_data["tokenizer"])},
           "model": {"vision_name": "resnet10t", "embed_dim": 8, "text_config": tiny_text_config(600, 16),
                     "text_pretrained": False},
           "train": {"epochs": 1, "batch_size": 8},
           "scaling": {"workers": [1, 1]}}
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("section,values,needle", [
    ("train", {"epochs": "two"}, "train.epochs: expected an integer, got 'two'"),
    ("train", {"batch_size": "32"}, "train.batch_size: expected an integer, got '32'"),
    ("scaling", {"workers": 2}, "scaling.workers: expected [an integer, an integer], got 2"),
    ("model", {"embed_dim": "big"}, "model.embed_dim: expected an integer, got 'big'"),
    ("scaling", {"max_failures": "lots"}, "scaling.max_failures: expected an integer, got 'lots'"),
    ("train", {"checkpoint_every": 2.5}, "train.checkpoint_every: expected an integer, got 2.5"),
    ("train", {"lr": [1e-4]}, "train.lr: expected a number, got [0.0001]"),
    ("data", {"image_keys": "yes"}, "data.image_keys: expected true/false, got 'yes'"),
])
def test_config_values_of_the_wrong_type_name_the_key(tmp_path, tiny_data, capsys, section, values, needle):
    """In-process (the same ``main`` the console script runs; the subprocess case is below)."""
    import ray

    from ccrk_ray.cli import main

    assert main(["pretrain", "--config", str(pretrain_config(tmp_path, tiny_data, **{section: values}))]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    assert not ray.is_initialized()


def test_a_config_value_of_the_wrong_type_as_a_user_sees_it(tmp_path, tiny_data):
    res = ccrk(tmp_path, "pretrain", "--config", pretrain_config(tmp_path, tiny_data, train={"epochs": "two"}))
    one_line(res, 2, "config.yaml: train.epochs: expected an integer, got 'two'")


def test_a_set_value_of_the_wrong_type_as_a_user_sees_it(tmp_path, tiny_data, capsys):
    """--set goes through the same checks as the file: in-process for finetune and tune (the same
    main), as a subprocess for pretrain."""
    from ccrk_ray.cli import main

    res = ccrk(tmp_path, "pretrain", "--config", pretrain_config(tmp_path, tiny_data), "--set", "train.epochs=two")
    one_line(res, 2, "train.epochs: expected an integer, got 'two'")
    for command in (["finetune"], ["tune", "--num-samples", "1"]):
        argv = [*command, "--task", "multi30k", "--config", str(pretrain_config(tmp_path, tiny_data)),
                "--start-from", str(tmp_path / "none"), "--set", "train.lr"]
        assert main(argv) == 2
        assert "argument --set: expected section.key=value, e.g. train.lr=1e-4" in capsys.readouterr().err


def test_a_tokenizer_that_does_not_exist(tmp_path, tiny_data):
    res = ccrk(tmp_path, "pretrain", "--config",
               pretrain_config(tmp_path, tiny_data, data={"tokenizer": str(tmp_path / "no_tokenizer")}))
    one_line(res, 2, f"tokenizer {tmp_path / 'no_tokenizer'}: cannot be loaded")


def test_training_data_with_the_wrong_schema_names_the_file_and_column(tmp_path, tiny_data):
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"image_id": ["a"], "image": [b"x"], "captions_en": [["a cat"]]}), bad / "part-0.parquet")
    res = ccrk(tmp_path, "pretrain", "--config", pretrain_config(tmp_path, tiny_data, data={"train": str(bad)}))
    one_line(res, 1, str(bad / "part-0.parquet"), "missing column 'captions_de'")


def test_data_that_is_not_parquet(tmp_path, tiny_data):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "part-0.parquet").write_text("not parquet at all")
    res = ccrk(tmp_path, "evaluate", "--checkpoint", saved_model(tmp_path, tiny_data), "--data", tmp_path / "d",
               "--out", tmp_path / "e")
    one_line(res, 1, str(tmp_path / "d" / "part-0.parquet"), "not a readable parquet file")


def saved_model(tmp_path: Path, tiny_data) -> Path:
    from ccrk_ray.data.tokenizer import CaptionTokenizer
    from ccrk_ray.model import CCRKModel, ModelConfig
    from ccrk_ray.model.saved import Preprocess, save_model_dir

    model = CCRKModel(ModelConfig(text_config=tiny_text_config(600, 16), text_pretrained=False, embed_dim=8))
    return save_model_dir(tmp_path / "model", model, CaptionTokenizer(tiny_data["tokenizer"], 16),
                          Preprocess(32, 16, ("en", "de")))


def test_corrupt_weights_are_named_at_once(tmp_path, tiny_data):
    model = saved_model(tmp_path, tiny_data)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])       # a cut download
    res = ccrk(tmp_path, "evaluate", "--checkpoint", model, "--data", tiny_data["test"], "--out", tmp_path / "e")
    one_line(res, 2, f"{weights}: not a readable safetensors file")


def test_unreachable_object_storage(tmp_path):
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
           "AWS_REGION": "us-east-1", "CCRK_S3_RETRIES": "0", "CCRK_S3_CONNECT_TIMEOUT": "1"}
    res = ccrk(tmp_path, "validate", "s3://ccrk-nowhere/data", env=env)
    one_line(res, 1, "s3://ccrk-nowhere/data: cannot be read", "NETWORK_CONNECTION")
    res = ccrk(tmp_path, "validate", "s3://ccrk-nowhere/data", env={**env, "CCRK_S3_RETRIES": "many"})
    one_line(res, 2, "CCRK_S3_RETRIES='many': expected an integer")


def test_convert_refuses_object_storage_before_reading_anything(tmp_path):
    res = ccrk(tmp_path, "convert", "coco", "--json", tmp_path / "missing.json", "--lang", "en", "--images",
               tmp_path, "--out", "s3://bucket/out")
    one_line(res, 2, "--out s3://bucket/out: ccrk convert reads and writes local files")
    assert not (REPO / "s3:").exists() and not Path("s3:").exists()
    res = ccrk(tmp_path, "convert", "coco", "--json", "s3://bucket/ann.json", "--lang", "en", "--images", tmp_path,
               "--out", tmp_path / "o")
    one_line(res, 2, "--json s3://bucket/ann.json")


def test_validate_reports_every_broken_file_and_checks_the_rest(tmp_path, tiny_data):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted(Path(tiny_data["test"]).glob("*.parquet"))
    for f in good:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "a-broken.parquet").write_text("garbage")
    (folder / "z-cut.parquet").write_bytes(good[0].read_bytes()[:200])
    res = ccrk(tmp_path, "validate", folder)
    assert res.returncode == 1, res.stderr
    out = res.stdout
    assert f"{folder / 'a-broken.parquet'}: not a readable parquet file" in out
    assert f"{folder / 'z-cut.parquet'}: not a readable parquet file" in out
    assert f"{len(good) + 2} files, 40 rows checked" in out and "2 files with schema errors" in out


def test_training_data_that_is_not_there(tmp_path, tiny_data):
    res = ccrk(tmp_path, "pretrain", "--config",
               pretrain_config(tmp_path, tiny_data, data={"train": str(tmp_path / "nowhere")}))
    one_line(res, 2, f"no data at {tmp_path / 'nowhere'}")
