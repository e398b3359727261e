"""Training pieces that need no Ray: schedule, accumulation, checkpoint housekeeping, config
variables, gradient checkpointing."""

import json

import pytest
import torch
import yaml

from ccrk_ray.core.config import ConfigError, expand_vars
from ccrk_ray.model import CCRKModel, ModelConfig
from ccrk_ray.tasks.finetune import TASKS, load_config
from ccrk_ray.objectives.styles import build_objective
from ccrk_ray.train.best import BEST_FILE, BestStore
from ccrk_ray.train.schedule import accumulation, lr_factor
from ccrk_ray.train.trainer import build_trainer, clean_orphan_checkpoints, run_exists
from tests.conftest import tiny_text_config


def test_lr_schedule_warms_up_then_decays_to_zero():
    cos, lin = lr_factor(4, 20, "cosine"), lr_factor(4, 20, "linear")
    assert [cos(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cos(4) == pytest.approx(1.0) and cos(12) == pytest.approx(0.5) and cos(20) == pytest.approx(0.0)
    assert lin(12) == pytest.approx(0.5) and lin(8) == pytest.approx(0.75) and lin(30) == 0.0
    with pytest.raises(ValueError, match="schedule must be"):
        lr_factor(1, 2, "step")


def test_accumulation_keeps_the_global_batch():
    assert [accumulation(128, 32, w) for w in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(ValueError, match="global_batch_size 128 is not a multiple of batch_size 32 x 3 workers"):
        accumulation(128, 32, 3)


def test_orphan_checkpoints_are_removed_committed_ones_kept(tmp_path):
    run = tmp_path / "runs" / "pretrain"
    for name in ("checkpoint_00000010_m", "checkpoint_00000020_m", "checkpoint_00000030_m"):
        (run / name).mkdir(parents=True)
        (run / name / "progress.json").write_text("{}")
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({
        "checkpoint_results": [{"checkpoint_dir_name": "checkpoint_00000010_m"}],
        "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_00000020_m"}}))
    assert run_exists(str(tmp_path / "runs"), "pretrain") and not run_exists(str(tmp_path / "runs"), "other")
    assert clean_orphan_checkpoints(str(tmp_path / "runs"), "pretrain") == ["checkpoint_00000030_m"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_00000010_m", "checkpoint_00000020_m",
                                                     "checkpoint_manager_snapshot.json"]
    # no snapshot: nothing was ever committed
    (run / "checkpoint_manager_snapshot.json").unlink()
    assert clean_orphan_checkpoints(str(tmp_path / "runs"), "pretrain") == ["checkpoint_00000010_m",
                                                                            "checkpoint_00000020_m"]
    assert clean_orphan_checkpoints(str(tmp_path / "runs"), "missing") == []


def test_config_variables_expand_or_name_what_is_missing():
    env = {"DATA": "s3://b/d", "EMPTY": ""}
    assert expand_vars({"train": "${DATA}/train", "n": 3, "l": ["$x", "${DATA}"]}, env) == {
        "train": "s3://b/d/train", "n": 3, "l": ["$x", "s3://b/d"]}
    with pytest.raises(ConfigError, match="cfg.yaml: environment variable.s. not set: EMPTY, NOPE"):
        expand_vars({"a": "${NOPE}", "b": ["${EMPTY}"]}, env, where="cfg.yaml")


def test_best_model_pointer_replaces_the_previous_best(tmp_path):
    model = CCRKModel(ModelConfig(text_config=tiny_text_config(100), text_pretrained=False, embed_dim=8))
    store = BestStore(str(tmp_path / "best"))
    assert store.read() is None
    store.save_model(model, metric="val/r_mean", score=40.0, step=10, epoch=1)
    store.save_model(model, metric="val/r_mean", score=55.5, step=20, epoch=2, r_mean=55.5)
    assert store.read() == {"dir": "step_00000020", "metric": "val/r_mean", "score": 55.5, "step": 20, "epoch": 2,
                            "r_mean": 55.5, "mrv": None}
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["best.json", "step_00000020"]
    CCRKModel.from_pretrained(tmp_path / "best" / "step_00000020")
    # a resumed run reaching step 20 again: the directory the pointer names is never overwritten
    store.save_model(model, metric="val/r_mean", score=60.0, step=20, epoch=2)
    assert store.read()["dir"] == "step_00000020.2"
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["best.json", "step_00000020.2"]


def test_best_pointer_survives_a_crash_mid_write(tmp_path, monkeypatch):
    """A write that dies half-way (here: the disk fills after a few bytes) leaves the previous
    pointer whole, and the model it names; the next save works."""
    import os

    model = CCRKModel(ModelConfig(text_config=tiny_text_config(100), text_pretrained=False, embed_dim=8))
    store = BestStore(str(tmp_path / "best"))
    first = store.save_model(model, metric="val/r_mean", score=40.0, step=10, epoch=1)
    real_fdopen = os.fdopen

    class FillsUp:
        """A file that takes 7 bytes, then the disk is full."""
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:7])
            self.f.flush()
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FillsUp(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space left"):
        store.save_model(model, metric="val/r_mean", score=50.0, step=20, epoch=2)
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert store.read() == first                                       # whole, and still the first
    assert json.loads((tmp_path / "best" / BEST_FILE).read_text()) == first
    assert not [p for p in (tmp_path / "best").iterdir() if p.name.endswith(".tmp")]
    CCRKModel.from_pretrained(tmp_path / "best" / first["dir"])
    assert store.save_model(model, metric="val/r_mean", score=50.0, step=20, epoch=2)["score"] == 50.0


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = ModelConfig(text_config=dict(tiny_text_config(100), num_hidden_layers=2), text_pretrained=False,
                      embed_dim=8, fusion_layers=1)
    model = CCRKModel(cfg).train()
    batch = {"pixel_values": torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8),
             "input_ids": torch.randint(3, 100, (4, 2, 8)), "attention_mask": torch.ones(4, 2, 8, dtype=torch.long)}
    objective = build_objective("one_to_k", itm_weight=0.0, mlm_weight=0.0, languages=["en", "de"])

    def grads():
        model.zero_grad()
        torch.manual_seed(1)
        objective(model, batch)["loss"].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.text.modules())
    again = grads()
    assert plain.keys() == again.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(again[name], plain[name], atol=1e-6, rtol=1e-5)


# --- the shipped task configs ----------------------------------------------------------------------

# (global batch, max_length, epochs, lr, k_test) of the reference's configs and launch commands
REFERENCE = {"multi30k": (64, 40, 10, 3e-5, 128), "mscoco": (64, 40, 10, 3e-5, 256),
             "xflickrco": (64, 80, 10, 3e-5, 128), "xflickrco_fewshot": (64, 80, 60, 1e-5, 128),
             "wit": (80, 80, 5, 3e-5, 128),
             **{f"multi30k_{lang}": (64, 40, 10, 3e-5, 128) for lang in ("de", "fr", "cs")},
             **{f"mscoco_{lang}": (64, 40, 10, 3e-5, 256) for lang in ("ja", "zh")}}


@pytest.fixture(scope="module")
def long_model(tiny_data, tmp_path_factory):
    """A saved model whose text encoder takes 80 tokens (the longest task's max_length)."""
    from tests.train import task_data

    return task_data.save_tiny_model(tmp_path_factory.mktemp("long_model"), tiny_data["tokenizer"],
                                     fusion_layers=1, max_length=80)


@pytest.mark.parametrize("task", TASKS)
def test_every_task_config_is_usable_as_shipped_with_the_reference_values(task, long_model, tmp_path):
    """A user's file naming only the data (and the worker counts the shipped file's comment offers)
    validates; the values are the reference's."""
    user = {"output_dir": str(tmp_path / "o"), "data": {"train": "train", "val": "val", "test": "test"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(user))
    cfg, _ = load_config(task, tmp_path / "c.yaml", long_model)
    batch, max_length, epochs, lr, k_test = REFERENCE[task]
    t = cfg.train
    assert (t.global_batch_size, cfg.data.max_length, t.epochs, t.lr, cfg.task.k_test) == (
        batch, max_length, epochs, pytest.approx(lr), k_test)
    assert t.global_batch_size == t.batch_size * 4 and cfg.scaling.workers == (4, 4)
    assert t.grad_clip == 0.0 and t.schedule == "linear" and t.warmup == 0.1 and cfg.data.image_size == 384
    for workers in ([1, 1], [1, 2], [2, 2]):
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({**user, "scaling": {"workers": workers}}))
        assert load_config(task, tmp_path / "c.yaml", long_model)[0].scaling.workers == tuple(workers)


def test_the_paper_recipe_config_validates_with_the_reference_values():
    from pathlib import Path

    from ccrk_ray.train.config import PretrainConfig, train_transform

    path = Path(__file__).resolve().parents[2] / "ccrk_ray" / "configs" / "pretrain_ccrk_paper.yaml"
    cfg = PretrainConfig.from_yaml(path).validate()
    m, o, t, d = cfg.model, cfg.objective, cfg.train, cfg.data
    assert m["text_layers_from"] == list(range(1, 24, 2)) and (m["text_layers"], m["fusion_layers"]) == (6, 6)
    model_config = ModelConfig.from_dict(m)
    assert model_config.text_positions == "from_zero" and not model_config.cross_proj
    assert (o["mask_rule"], o["max_masks"], o["mask_span_prob"], o["itc_gradient"]) == ("count", 12, 0.2, "reference")
    assert t.betas == (0.9, 0.98) and t.grad_clip == 1.0 and t.global_batch_size == 128 and t.warmup < 0.05
    crop = train_transform(d)
    assert (crop.scale, crop.interpolation, crop.hflip_prob, crop.randaugment) == ((0.2, 1.0), "bicubic", 0.5, (2, 7))
    assert d.pre_caption == 40 and d.max_length == 40


def test_set_items_override_the_file_and_are_checked_like_it(tmp_path):
    from ccrk_ray.core.config import parse_sets
    from ccrk_ray.train.config import PretrainConfig

    assert parse_sets(["train.lr=1e-4", "data.languages=[en, de]", "scaling.workers=[2,4]", "train.max_steps=null",
                       "model.text_config.num_hidden_layers=2"]) == {
        "train": {"lr": 1e-4, "max_steps": None}, "data": {"languages": ["en", "de"]}, "scaling": {"workers": [2, 4]},
        "model": {"text_config": {"num_hidden_layers": 2}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "o"), "data": {"train": "t"},
                                    "train": {"lr": 3e-4, "epochs": 2, "batch_size": 8}}))
    cfg = PretrainConfig.from_yaml(path, ["train.lr=1e-5", "train.epochs=5", "data.tokenizer=xlm-roberta-large"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size, cfg.data.tokenizer) == (1e-5, 5, 8,
                                                                                            "xlm-roberta-large")
    with pytest.raises(ConfigError, match="train.epochs: expected an integer, got 'two'"):
        PretrainConfig.from_yaml(path, ["train.epochs=two"])
    with pytest.raises(ConfigError, match="train: unknown key.*lrr"):
        PretrainConfig.from_yaml(path, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="--set 'train.lr': expected section.key=value"):
        PretrainConfig.from_yaml(path, ["train.lr"])


def test_what_ray_trains_controller_unpickles_imports_no_torch(tmp_path):
    """A run's Ray Train controller unpickles the trainer's ``train_loop_config`` and its callbacks
    before it starts any worker: they must not make it import torch, timm or transformers (the
    workers do; the controller would spend ~2–5 s of CPU on it at every run's start). Checked in a
    fresh process, as the controller is one."""
    import subprocess
    import sys

    from ray import cloudpickle

    from ccrk_ray.train.config import LoopConfig, TrainSection
    from ccrk_ray.train.loop import run_worker
    from ccrk_ray.tune.callbacks import SweepReportCallback, TrialPlacementGroups

    loop = LoopConfig(model={"embed_dim": 16}, objective="itc", objective_args={}, data=None,
                      train=TrainSection(epochs=3, lr=2e-4))
    trainer = build_trainer(loop, storage_path=str(tmp_path), name="run", num_workers=(1, 1),
                            callbacks=[TrialPlacementGroups(str(tmp_path / "pg.txt"))])
    shipped = tmp_path / "controller.pkl"
    # (a SweepReportCallback is made only inside a Tune trial: its class, which the controller
    # imports the same way, stands for it)
    shipped.write_bytes(cloudpickle.dumps((trainer.train_loop_config, trainer.run_config.callbacks,
                                           SweepReportCallback)))
    check = ("import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read()); "
             "print(sorted(m for m in ('torch', 'timm', 'transformers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", check, str(shipped)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    # and every worker gets the loop config back as it was built

    class Echo:
        def __init__(self, cfg):
            self.cfg = cfg

        def run(self):
            return self.cfg

    assert run_worker(Echo, trainer.train_loop_config) == loop
