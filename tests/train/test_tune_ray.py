"""``ccrk tune`` on real Ray: trials are Ray Train fine-tuning runs launched from Tune trials, with
ASHA on the objective reported each epoch; results table, best config, best model (evaluated),
an interrupted sweep resumed, and bad search spaces refused before any trial starts."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from ccrk_ray.cli import main
from ccrk_ray.core.config import ConfigError
from ccrk_ray.tasks.finetune import load_config
from tests.train import task_data
from tests.conftest import RAY

pytestmark = RAY
REPO = Path(__file__).resolve().parents[2]
TRAIN = 64     # training images of the Multi30K stand-in


@pytest.fixture(scope="module")
def base_model(tiny_data, tmp_path_factory):
    """A small saved dual-encoder model (ITC only: fast trials), its tokenizer and preprocessing."""
    return task_data.save_tiny_model(tmp_path_factory.mktemp("base_model"), tiny_data["tokenizer"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Multi30K stand-in (TRAIN train / 16 val / 20 test images), converted by ``ccrk convert``'s code."""
    root = tmp_path_factory.mktemp("tune_tasks")
    rows = {"train": task_data.scenes(root, "train", TRAIN, 21), "val": task_data.scenes(root, "val", 16, 22),
            "test_2016_flickr": task_data.scenes(root, "test", 20, 23)}
    return {k: str(v) for k, v in task_data.multi30k(root, rows).items()}


def sweep_config(path: Path, out: Path, data: dict, tune: dict, **train) -> Path:
    cfg = {"output_dir": str(out),
           "data": {"train": data["train"], "val": data["val"], "test": data["test_2016_flickr"], "image_size": 32,
                    "max_length": 24, "cpus_per_actor": 0.5},
           "task": {"val_languages": ["en", "de"], "k_test": None},
           "train": {"epochs": 2, "batch_size": 8, "global_batch_size": 8, "lr": 1e-3, "warmup": 1, "log_every": 100,
                     **train},
           "scaling": {"workers": [1, 1], "max_failures": 0},
           "tune": tune}
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def per_epoch(exp_dir: Path) -> dict[str, dict[int, float]]:
    """Tune's own record of every trial: {trial_id: {epoch: objective}} from each result.json."""
    out = {}
    for f in exp_dir.glob("*/result.json"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            out.setdefault(r["trial_id"], {})[r["epoch"]] = r["objective"]
    return out


def tune_states(exp_dir: Path) -> dict[str, tuple[str, int]]:
    """{trial_id: (status, last epoch Tune processed)} in the newest experiment state file Tune
    wrote, {} before the first."""
    files = sorted(exp_dir.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        state = json.loads(files[-1].read_text())
    except json.JSONDecodeError:        # being written
        return {}
    out = {}
    for trial_json, meta_json in state["trial_data"]:
        trial, meta = json.loads(trial_json), json.loads(meta_json)
        last = meta.get("last_result") or {}
        out[trial["trial_id"]] = (trial["status"], int(last.get("epoch", 0) or 0))
    return out


GATE = "GO"      # train.pause_until of every trial (relative to its output dir); pause_after_epoch 1


def release(out: Path, trials) -> None:
    for trial in trials:
        (out / "trials" / trial / GATE).touch()


def interrupt_sweep(args: list[str], env: dict, out: Path, log_path: Path) -> tuple[str, str]:
    """Run ``ccrk tune ARGS`` in a subprocess and SIGKILL it at a known point: every trial pauses
    after its first epoch's checkpoint (``train.pause_after_epoch``) until its gate file exists.
    Once Tune has processed a trial's epoch 1 and kept it running (ASHA never stops the first trial
    to reach a rung), that trial stays paused; the others are released until one has terminated.
    Returns (terminated trial, interrupted trial)."""
    exp = out / "ray_results" / "tune"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "ccrk_ray", "tune", *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    t0, held = time.perf_counter(), None
    try:
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.perf_counter() - t0 < 300, log_path.read_text()[-3000:]
            states = tune_states(exp)
            paused = {t.parent.name for t in out.glob(f"trials/*/{GATE}.waiting")}
            if held is None:
                kept = [t for t in sorted(paused) if states.get(t, ("", 0)) == ("RUNNING", 1)]
                held = kept[0] if kept else None
            if held is not None:
                release(out, (t.name for t in (out / "trials").iterdir() if t.name != held))
                done = [t for t, (status, _) in states.items() if status == "TERMINATED"]
                if done:
                    return done[0], held
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):      # already gone: the assertion above says why
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        print(f"sweep interrupted after {time.perf_counter() - t0:.1f}s")


def test_three_trial_sweep_interrupted_resumed_asha_table_best_config_and_model(ray_local, base_model, data,
                                                                                tmp_path):
    """3 trials, 2 at a time, ASHA on r_mean - 0.5 mrv; the sweep's driver is killed once a trial
    has finished and another is halfway, then ``--resume`` finishes it."""
    from ccrk_ray.eval.evaluate import run_evaluate

    out = tmp_path / "sweep"
    space = {"lr": {"loguniform": [3e-4, 3e-3]}, "temperature": {"uniform": [0.03, 0.12]},
             "batch_size": {"choice": [4, 8]}, "warmup": {"uniform": [0.0, 0.3]}, "weight_decay": 0.02}
    cfg = sweep_config(tmp_path / "c.yaml", out, data, {"objective": "r_mean-mrv", "mrv_weight": 0.5, "seed": 3,
                                                        "space": space}, trace_dir=str(tmp_path / "trace"),
                       pause_after_epoch=1, pause_until=GATE)
    args = ["--task", "multi30k", "--config", str(cfg), "--checkpoint", str(base_model), "--num-samples", "3",
            "--max-concurrent", "2"]
    # the interrupted driver joins this module's cluster, as a job submitted to a cluster would
    # Tune writes its experiment state every 10 s by default: the test must see a finished trial
    # recorded while another is mid-run, and a trial trains for a few seconds
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO),
           "TUNE_GLOBAL_CHECKPOINT_S": "0.5"}
    finished, interrupted = interrupt_sweep(args, env, out, tmp_path / "first.log")
    print(f"interrupted: trial {finished} terminated, trial {interrupted} paused after its first epoch")
    assert not (out / "results.csv").exists()
    t0 = time.perf_counter()
    stop = threading.Event()
    gates = threading.Thread(target=lambda: [release(out, (t.name for t in (out / "trials").iterdir()))
                                             for _ in iter(lambda: stop.wait(0.1), True)], daemon=True)
    gates.start()           # every trial, the interrupted one too, passes its gate from now on
    try:
        assert main(["tune", *args, "--resume"]) == 0
    finally:
        stop.set()
    print(f"resumed sweep finished in {time.perf_counter() - t0:.1f}s")
    # trials stopped by Tune left no Ray Train placement group (worker CPUs) reserved behind them
    assert [pg for pg in ray_local.util.placement_group_table().values() if pg["state"] != "REMOVED"] == []

    rows = read_csv(out / "results.csv")
    print((out / "results.md").read_text())
    assert len(rows) == 3 and len({r["trial"] for r in rows}) == 3 and {finished, interrupted} < {r["trial"] for r in rows}
    md = (out / "results.md").read_text().splitlines()
    assert len(md) == 2 + 3 and all(r["trial"] in "".join(md) for r in rows)
    history = per_epoch(out / "ray_results" / "tune")
    for r in rows:
        lr, temp, bs, warmup = float(r["lr"]), float(r["temperature"]), int(r["batch_size"]), float(r["warmup"])
        assert 3e-4 <= lr <= 3e-3 and 0.03 <= temp <= 0.12 and bs in (4, 8) and 0 <= warmup <= 0.3
        assert float(r["weight_decay"]) == 0.02
        # the objective Tune saw is computed from the validation metrics of the same report
        r_mean, mrv = float(r["val_r_mean"]), float(r["val_mrv"])
        assert mrv == pytest.approx((float(r["val_mrv_t2i"]) + float(r["val_mrv_i2t"])) / 2)
        assert float(r["objective"]) == pytest.approx(r_mean - 0.5 * mrv)
        assert 0 <= r_mean <= 100 and mrv >= 0 and math.isfinite(float(r["loss"]))
        # ASHA: a trial runs both epochs, or was stopped after epoch 1 behind another trial's epoch 1
        epochs = history[r["trial"]]
        # Tune's own history of the interrupted trial may lack the epoch whose report the trial
        # committed just before its driver was killed (the resumed trial goes on after it)
        first = 2 if r["trial"] == interrupted and 1 not in epochs else 1
        assert sorted(epochs) == list(range(first, int(r["epochs_done"]) + 1))
        if r["status"] == "stopped early":
            assert r["epochs_done"] == "1"
            assert any(h.get(1, -math.inf) > epochs[1] for t, h in history.items() if t != r["trial"])
        else:
            assert r["status"] == "finished" and r["epochs_done"] == "2"
        if first == 1:
            assert float(r["best_objective"]) == pytest.approx(max(epochs.values()))
        else:
            assert float(r["best_objective"]) >= max(epochs.values()) - 1e-9
        # each trial's config, checkpoints, TensorBoard logs and best model are under the sweep directory
        trial = out / "trials" / r["trial"]
        tc = yaml.safe_load((trial / "config.yaml").read_text())
        assert tc["train"]["lr"] == pytest.approx(lr) and tc["model"]["temperature"] == pytest.approx(temp)
        assert tc["train"]["batch_size"] == tc["train"]["global_batch_size"] == bs
        assert list((trial / "tensorboard").glob("events.out.tfevents.*"))
        assert list((trial / "ray_results" / "finetune").glob("checkpoint_*"))
        best = json.loads((trial / "ray_results" / "finetune" / "best" / "best.json").read_text())
        assert best["epoch"] == int(r["best_epoch"]) and best["score"] == pytest.approx(float(r["best_objective"]))
        assert best["metric"] == "objective"
        # the trial's model started from the sampled temperature, not the checkpoint's learned one
        saved = json.loads((trial / "ray_results" / "finetune" / "best" / best["dir"] / "config.json").read_text())
        assert saved["temperature"] == pytest.approx(temp)
        # resume: the finished trial was not started again and trained each step once; the
        # interrupted one restarted once, from its epoch-1 checkpoint (not from step 1)
        per_epoch_steps = TRAIN // bs
        attempts = (trial / "attempts.jsonl").read_text().splitlines()
        steps = [json.loads(line) for f in sorted((tmp_path / "trace" / r["trial"]).glob("*.jsonl"))
                 for line in f.read_text().splitlines()]
        runs = {}
        for st in steps:
            runs.setdefault(st["attempt"], []).append(st["step"])
        if r["trial"] == finished:
            assert len(attempts) == 1 and len(runs) == 1
            trained = sorted(st["step"] for st in steps)     # (a stopped trial may have begun its next epoch)
            assert trained == list(range(1, len(trained) + 1)) and len(trained) >= int(r["epochs_done"]) * per_epoch_steps
        if r["trial"] == interrupted:
            assert len(attempts) == 2 and len(runs) == 2
            first, second = sorted(runs.values(), key=min)
            assert sorted(first)[:per_epoch_steps] == list(range(1, per_epoch_steps + 1))
            assert sorted(second) == list(range(per_epoch_steps + 1, 2 * per_epoch_steps + 1))
    assert [float(r["best_objective"]) for r in rows] == sorted((float(r["best_objective"]) for r in rows), reverse=True)

    # best_config.yaml is a config `ccrk finetune` takes, with the best trial's hyperparameters
    top = rows[0]
    cfg_best, _ = load_config("multi30k", out / "best_config.yaml", base_model)
    assert cfg_best.train.lr == pytest.approx(float(top["lr"])) and cfg_best.train.batch_size == int(top["batch_size"])
    assert cfg_best.train.warmup == pytest.approx(float(top["warmup"])) and cfg_best.train.weight_decay == 0.02
    assert cfg_best.model["temperature"] == pytest.approx(float(top["temperature"]))
    assert cfg_best.train.epochs == 2 and cfg_best.task.val_languages == ("en", "de")
    assert Path(cfg_best.output_dir) == out / "best_finetune" and cfg_best.data.test == data["test_2016_flickr"]
    assert "tune" not in yaml.safe_load((out / "best_config.yaml").read_text())

    # the exported model is the best trial's best epoch: `ccrk evaluate` of it on the validation
    # split scores exactly what that epoch reported
    best_model = out / "best_model"
    best_dir = out / "trials" / top["trial"] / "ray_results" / "finetune" / "best"
    best = json.loads((best_dir / "best.json").read_text())
    assert (best_model / "model.safetensors").read_bytes() == (best_dir / best["dir"] / "model.safetensors").read_bytes()
    val = run_evaluate(str(best_model), data["val"], str(tmp_path / "eval_val"), languages=["en", "de"], itc_only=True)
    assert val["mean"]["r_mean"] == pytest.approx(best["r_mean"], abs=1e-6)
    assert sorted(val["languages"]) == ["de", "en"] and val["num_images"] == 16
    report = json.loads((out / "tune_report.json").read_text())
    assert report["best"]["trial"] == top["trial"] and report["errors"] == 0

    # the same sweep again without --resume is refused
    assert main(["tune", *args]) == 2


def test_bad_search_spaces_are_clear_errors_before_any_trial(base_model, data, tmp_path):
    from ccrk_ray.tune.sweep import prepare_sweep

    def err(tune: dict, match: str, **kw):
        cfg = sweep_config(tmp_path / "c.yaml", tmp_path / "o", data, tune, **kw)
        with pytest.raises(ConfigError, match=match):
            prepare_sweep("multi30k", cfg, base_model, 2)
        assert not (tmp_path / "o").exists()       # nothing started, nothing written

    err({"space": {"lr": {"loguniform": [1e-4, 1e-3]}, "dropout": {"choice": [0.1]}}},
        r"unknown hyperparameter\(s\) dropout \(known: lr, lr_mult, temperature")
    err({"space": {}}, "tune.space is empty")
    err({"space": {"lr": 1e-3, "epochs": 2}}, "varies no hyperparameter")
    err({"space": {"lr": {"normal": [0, 1]}}}, "expected one of uniform, loguniform")
    err({"space": {"lr": {"loguniform": [0, 1e-3]}}}, "needs low > 0")
    err({"space": {"lr": {"uniform": [1e-3, 1e-4]}}}, "needs low < high")
    err({"space": {"lr": [1e-3, 1e-4]}}, "a list needs a distribution")
    err({"space": {"epochs": {"uniform": [1, 3]}}}, "integer values only")
    err({"space": {"temperature": {"uniform": [0.01, 0.9]}}}, r"temperature: value 0.9 is not valid: model.temperature")
    err({"space": {"batch_size": {"choice": [1, 8]}}}, r"batch_size: value 1 is not valid: train.batch_size must be")
    err({"space": {"batch_size": {"choice": [8, 512]}}}, f"{TRAIN} rows: not one full global batch of 512")
    err({"space": {"lr_mult": {"choice": [1.0, 3.0]}}}, "lr_mult changes nothing; fix it, leave it out, or start "
        r"from pre-trained encoders \(--start-from MODEL_SPEC.yaml\)")
    err({"objective": "mrv"}, "tune.objective must be one of r_mean, -mrv, r_mean-mrv")
    err({"objective": "-mrv", "spcae": {}}, r"tune: unknown key\(s\) spcae")
    cfg = sweep_config(tmp_path / "c.yaml", tmp_path / "o", data, {"objective": "-mrv"})
    d = yaml.safe_load(cfg.read_text())
    d["task"]["val_languages"] = ["en"]
    cfg.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match="needs MRV on validation"):
        prepare_sweep("multi30k", cfg, base_model, 2)
    assert main(["tune", "--task", "multi30k", "--config", str(cfg), "--checkpoint", str(base_model),
                 "--num-samples", "0"]) == 2
    # the default space: around the config's values, epochs fixed
    from ccrk_ray.tune.sweep import parse_dist

    sweep, _ = prepare_sweep("multi30k", sweep_config(tmp_path / "c.yaml", tmp_path / "o", data, {}), base_model, 4)
    space = {k: parse_dist(k, v) for k, v in sweep["space"].items()}
    assert space["lr"].kind == "loguniform" and space["lr"].args == pytest.approx((1e-3 / 3, 3e-3))
    assert space["batch_size"].args == (4, 8) and space["epochs"].args == (2,)
    assert set(space) == {"lr", "temperature", "batch_size", "epochs", "warmup", "weight_decay"}


def test_lr_mult_is_searched_when_the_start_has_fresh_layers(tiny_data, data, tmp_path):
    """From pre-trained encoders (a model spec), CCRK's own layers start fresh: lr_mult is in the
    default space and a space varying it is accepted; each trial's config carries its value."""
    from ccrk_ray.tasks.finetune import StartingPoint
    from ccrk_ray.tune.sweep import parse_dist, prepare_sweep, trial_config

    spec = task_data.save_encoders(tmp_path / "enc", tiny_data["tokenizer"])
    assert StartingPoint.of(spec).fresh_layers
    sweep, _ = prepare_sweep("multi30k", sweep_config(tmp_path / "c.yaml", tmp_path / "o", data, {}), spec, 4)
    assert parse_dist("lr_mult", sweep["space"]["lr_mult"]).args == (1.0, 2.0, 5.0)
    assert sweep["checkpoint"] == str(spec.resolve())
    cfg = sweep_config(tmp_path / "c.yaml", tmp_path / "o", data,
                       {"space": {"lr_mult": {"choice": [1.0, 4.0]}, "lr": {"loguniform": [1e-4, 1e-3]}}})
    sweep, _ = prepare_sweep("multi30k", cfg, spec, 2)
    d = trial_config(sweep, {"lr_mult": 4.0, "lr": 2e-4}, "t0")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(d))
    trial_cfg, start = load_config("multi30k", tmp_path / "t.yaml", spec)
    assert trial_cfg.model["lr_mult"] == 4.0 and trial_cfg.train.lr == pytest.approx(2e-4) and start.init_from is None
    # a value the model rejects is refused before any trial, as for every hyperparameter
    bad = sweep_config(tmp_path / "c.yaml", tmp_path / "o", data, {"space": {"lr_mult": {"choice": [0.0, 2.0]}}})
    with pytest.raises(ConfigError, match="tune.space.lr_mult: value 0.0 is not valid"):
        prepare_sweep("multi30k", bad, spec, 2)


def test_a_sweep_on_object_storage_writes_no_credentials(base_model, data, s3_server, tmp_path):
    """``ccrk tune`` as a user runs it (its own local cluster) with its experiment on S3 and
    distinctive credentials in the environment: no object in the bucket, and no file in the
    output folder, holds the key, the secret or the session token (Tune pickles its RunConfig,
    filesystem included, into the experiment state)."""
    import boto3

    from tests.commands import ccrk

    endpoint, bucket = s3_server
    secrets = {"AWS_ACCESS_KEY_ID": "AKIACCRKDISTINCTKEY7", "AWS_SECRET_ACCESS_KEY": "ccrk+Distinct/Secret+0123456789",
               "AWS_SESSION_TOKEN": "ccrkDistinctSessionToken42"}
    out = tmp_path / "sweep"
    cfg = sweep_config(tmp_path / "c.yaml", out, data, {"space": {"lr": {"choice": [1e-3, 2e-3]}}, "name": "s3sweep"},
                       epochs=1)
    d = yaml.safe_load(cfg.read_text())
    d["storage_path"] = f"s3://{bucket}/sweeps"
    cfg.write_text(yaml.safe_dump(d))
    ccrk("tune", "--task", "multi30k", "--config", cfg, "--checkpoint", base_model, "--num-samples", 1,
         env={**secrets, "AWS_ENDPOINT_URL": endpoint}, timeout=600)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="sweeps/")
            for o in page.get("Contents", [])]
    assert any(k.endswith("tuner.pkl") for k in keys) and any(k.endswith("best.json") for k in keys)
    for key in keys:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        for name, value in secrets.items():
            assert value.encode() not in body, f"{name} written to s3://{bucket}/{key}"
    for f in out.rglob("*"):
        if f.is_file():
            body = f.read_bytes()
            assert not any(v.encode() in body for v in secrets.values()), f"a credential written to {f}"
    assert (out / "best_model" / "model.safetensors").is_file()
