"""``ccrk pretrain`` on real Ray Train: mid-epoch resume on another worker count (data and
checkpoints on s3://), and a real fault (SIGKILL of a training worker, once mid-interval and once
right at a checkpoint report)."""

from __future__ import annotations

import copy
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ccrk_ray.core.config import ConfigError
from ccrk_ray.tasks.pretrain import run_pretrain
from ccrk_ray.train.config import PretrainConfig
from ccrk_ray.model.saved import load_model
from ccrk_ray.train.trainer import clean_orphan_checkpoints
from tests.commands import ccrk, noise
from tests.conftest import RAY, tiny_text_config, upload_dir

pytestmark = RAY

LANGS = ["en", "de", "zh"]


def write_config(path: Path, tiny_data, out: Path, storage_path: str | None = None, **overrides) -> Path:
    cfg = {
        "output_dir": str(out),
        "data": {"train": str(tiny_data["train"]), "languages": LANGS, "image_size": 32, "max_length": 24,
                 "tokenizer": str(tiny_data["tokenizer"]), "chunk_rows": 8, "cpus_per_actor": 0.4},
        "model": {"vision_name": "resnet10t", "text_config": tiny_text_config(600, 24), "embed_dim": 16},
        "objective": {"name": "one_to_k", "itm_weight": 0.0, "mlm_weight": 0.0},
        "train": {"epochs": 1, "batch_size": 8, "global_batch_size": 16, "lr": 1e-3, "warmup": 1,
                  "trace_dir": str(out / "trace"), "log_every": 100},
        "scaling": {"workers": [2, 2], "max_failures": 0},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        cfg[section][key] = copy.deepcopy(value)
    del cfg["model"]["text_config"]["vocab_size"]      # filled in from the tokenizer
    if storage_path:
        cfg["storage_path"] = storage_path
    path.write_text(yaml.safe_dump(cfg))
    return path


# The paper recipe's options (configs/pretrain_ccrk_paper.yaml) on the tiny model: MITM and CMLM
# through a fusion layer over the 512-wide image tokens, the reference's masking and ITC gradient,
# its image augmentation and caption normalisation
PAPER_RECIPE = {
    "model.text_config": dict(tiny_text_config(600, 24), num_hidden_layers=2),
    "model.fusion_layers": 1, "model.cross_proj": False, "model.fusion_dropout": 0.1,
    "model.text_positions": "from_zero", "model.image_mean": [0.48145466, 0.4578275, 0.40821073],
    "model.image_std": [0.26862954, 0.26130258, 0.27577711],
    "objective.itm_weight": 1.0, "objective.mlm_weight": 1.0, "objective.mask_rule": "count",
    "objective.max_masks": 12, "objective.mask_span_prob": 0.2, "objective.itc_gradient": "reference",
    "data.crop_scale": [0.2, 1.0], "data.interpolation": "bicubic", "data.hflip": 0.5, "data.randaugment": [2, 7],
    "data.pre_caption": 40, "train.betas": [0.9, 0.98], "train.grad_clip": 1.0,
}


def read_trace(out: Path) -> list[dict]:
    """Every traced optimiser step of every worker process: step, epoch, keys, pid."""
    rows = []
    for f in sorted((out / "trace").glob("*.jsonl")):
        pid = int(f.stem.split("pid")[1])
        for line in f.read_text().splitlines():
            rows.append({**json.loads(line), "pid": pid, "rank": int(f.stem.split("-")[0][4:])})
    return rows


def final_lineage(trace: list[dict]) -> dict[int, list[int]]:
    """Keys trained per step by the attempt whose work survived: a step redone by a later
    worker-group attempt (after a restart) replaces the earlier attempt's."""
    started: dict[int, float] = {}
    for row in trace:
        started[row["attempt"]] = min(started.get(row["attempt"], row["time"]), row["time"])
    steps: dict[int, tuple[int, list[int]]] = {}
    for row in sorted(trace, key=lambda r: started[r["attempt"]]):
        attempt, keys = steps.get(row["step"], (row["attempt"], []))
        if attempt != row["attempt"]:
            keys = []
        steps[row["step"]] = (row["attempt"], keys + row["keys"])
    return {s: sorted(keys) for s, (_, keys) in steps.items()}


def test_config_errors_name_the_key(tmp_path, tiny_data):
    path = write_config(tmp_path / "c.yaml", tiny_data, tmp_path / "o")
    cfg = yaml.safe_load(path.read_text())
    cfg["train"]["learning_rate"] = 1
    with pytest.raises(ConfigError, match="train: unknown key.*learning_rate"):
        PretrainConfig.from_dict(cfg)
    cfg = yaml.safe_load(path.read_text())
    cfg["scaling"]["workers"] = [1, 3]
    with pytest.raises(ConfigError, match="global_batch_size 16 is not a multiple of batch_size 8 x 3 workers"):
        PretrainConfig.from_dict(cfg)
    cfg = yaml.safe_load(path.read_text())
    cfg["objective"]["name"] = "one_to_many"
    with pytest.raises(ConfigError, match="'one_to_many' is not one of one_to_k, one_to_one, cross_lingual"):
        PretrainConfig.from_dict(cfg)
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["fusion"] = 2
    with pytest.raises(ConfigError, match="model: unknown key.s. fusion"):
        PretrainConfig.from_dict(cfg)
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["fusion_layers"] = 1         # the tiny text model has 1 layer: none left for text alone
    with pytest.raises(ConfigError, match="model: text_layers=0 \\+ fusion_layers=1 do not fit the text encoder's 1"):
        PretrainConfig.from_dict(cfg)
    with pytest.raises(ConfigError, match="no such file"):
        PretrainConfig.from_yaml(tmp_path / "missing.yaml")


def test_resume_mid_epoch_on_another_worker_count_with_data_and_checkpoints_on_s3(tiny_data, s3_server, tmp_path):
    """Stop after 3 of the epoch's 6 steps on 2 workers; resume on 1 worker (gradient accumulation
    2 keeps the global batch): the epoch's 96 rows are each trained exactly once. Data and
    checkpoints are on s3:// (a real S3 server on 127.0.0.1, the code path users take), float16
    autocast with a gradient scaler (open_clip's ``amp``; the CPU supports it too; the scaler's
    state travels in the checkpoint), with the paper recipe's options. Both runs start their own
    local cluster (no other Ray instance on the machine, as for a user)."""
    import boto3

    endpoint, bucket = s3_server
    upload_dir(endpoint, bucket, tiny_data["train"], "train-run/train")
    out = tmp_path / "run"
    on_s3 = {"data.train": f"s3://{bucket}/train-run/train", "train.precision": "amp", **PAPER_RECIPE}
    first = write_config(tmp_path / "a.yaml", tiny_data, out, **on_s3, **{"train.max_steps": 3},
                         storage_path=f"s3://{bucket}/runs")
    m1 = run_pretrain(PretrainConfig.from_yaml(first))
    assert m1["step"] == 3 and m1["world_size"] == 2
    assert all(np.isfinite(m1[f"loss/{k}"]) and m1[f"loss/{k}"] > 0 for k in ("itc", "itm", "mlm")), m1
    # rows read: the segments decoded ahead of training count too (prefetch), at most the epoch
    assert 48 <= m1["rows_read"] <= 96, m1
    assert m1["loss/grad_scale"] > 1                      # the float16 loss scale was in use
    # per-worker throughput, data and batch time per step, for each of the 2 workers
    assert all(m1[f"worker/{r}/{k}"] > 0 for r in (0, 1) for k in ("samples_per_s", "batch_ms_per_step"))
    assert all(m1[f"worker/{r}/data_ms_per_step"] >= 0 for r in (0, 1))
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=endpoint).list_objects_v2(
        Bucket=bucket, Prefix="runs/pretrain/")["Contents"]]
    assert "runs/pretrain/checkpoint_manager_snapshot.json" in keys
    assert any(k.startswith("runs/pretrain/checkpoint_00000003_m/model/") for k in keys), keys
    state = boto3.client("s3", endpoint_url=endpoint).get_object(
        Bucket=bucket, Key="runs/pretrain/checkpoint_00000003_m/training_state.pt")["Body"].read()
    scaler = torch.load(io.BytesIO(state), weights_only=True)["grad_scaler"]
    assert scaler["scale"] > 1
    with pytest.raises(ConfigError, match="holds a finished run; pass --resume"):
        run_pretrain(PretrainConfig.from_yaml(first))
    # the resume as a user runs it: `ccrk pretrain --resume`, its own local cluster; then the test set
    second = write_config(tmp_path / "b.yaml", tiny_data, out, **on_s3, **{"scaling.workers": [1, 1],
                                                                        "data.test": str(tiny_data["test"])},
                          storage_path=f"s3://{bucket}/runs")
    res = ccrk("pretrain", "--config", second, "--resume", timeout=600)
    assert noise(res) == [], "\n".join(noise(res))
    m2 = json.loads((out / "train_result.json").read_text())["metrics"]
    assert m2["step"] == 6 and m2["world_size"] == 1 and m2["grad_accumulation"] == 2
    assert m2["rows_read"] == 96 - 48 and np.isfinite(m2["loss"])
    assert "per step: w0 " in res.stdout + res.stderr and "worker/1/samples_per_s" not in m2
    test_report = json.loads((out / "test" / "test" / "report.json").read_text())
    assert test_report["num_images"] == 40 and list(test_report["languages"]) == LANGS

    trace = read_trace(out)
    assert sorted({r["step"] for r in trace if r["rank"] == 1}) == [1, 2, 3]     # rank 1 existed in run 1 only
    lineage = final_lineage(trace)
    assert sorted(lineage) == [1, 2, 3, 4, 5, 6]
    assert all(len(keys) == 16 for keys in lineage.values())
    every = [k for keys in lineage.values() for k in keys]
    assert len(every) == 96 and len(set(every)) == 96         # 2 files x 48 rows, each once
    assert {k >> 32 for k in every} == {0, 1}
    final = load_model(out / "model")
    assert final.config.embed_dim == 16 and final.fusion[0].cross_attn.k_proj_weight.shape == (32, 512)


def test_sigkill_of_a_worker_resumes_from_the_last_checkpoint(ray_local, tiny_data, tmp_path, monkeypatch):
    """Kill a training worker twice — mid-interval and right at a checkpoint report — and the run
    still completes every step; no row of an epoch is trained twice in the surviving lineage."""
    out = tmp_path / "run"
    path = write_config(tmp_path / "c.yaml", tiny_data, out, **{
        "train.epochs": 2, "train.checkpoint_every": 2, "scaling.max_failures": 3})
    kills = []

    def killer():
        for target_step in (3, 8):           # step 8 is a checkpoint step: killed as it reports
            deadline = time.time() + 240
            while time.time() < deadline:
                rows = [r for r in read_trace(out) if r["step"] >= target_step] if (out / "trace").is_dir() else []
                if rows:
                    pid = rows[-1]["pid"]
                    try:
                        os.kill(pid, signal.SIGKILL)
                        kills.append((target_step, pid))
                    except ProcessLookupError:
                        pass
                    break
                time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    metrics = run_pretrain(PretrainConfig.from_yaml(path))
    thread.join(timeout=5)
    assert [s for s, _ in kills] == [3, 8], kills
    assert metrics["step"] == 12 and metrics["epoch"] == 2
    trace = read_trace(out)
    assert len({r["pid"] for r in trace}) >= 4          # 2 workers x (1 + restarts)
    lineage = final_lineage(trace)
    assert sorted(lineage) == list(range(1, 13))
    for epoch_steps in (range(1, 7), range(7, 13)):
        keys = [k for s in epoch_steps for k in lineage[s]]
        assert len(keys) == 96 and len(set(keys)) == 96
    # the final checkpoint loads, and nothing uncommitted is left behind after a clean finish
    model = load_model(out / "model")
    assert model.config.embed_dim == 16
    assert clean_orphan_checkpoints(str(out / "ray_results"), "pretrain") == []
    result = json.loads((out / "train_result.json").read_text())
    assert Path(result["checkpoint"]).name.startswith("checkpoint_00000012")
