"""The whole demo path at tiny size: ``ccrk demo`` as a user runs it, starting its own local Ray
cluster on this machine's CPUs."""

import json

import pyarrow.parquet as pq
import pytest
import torch

from ccrk_ray.core.files import prepare_out_dir
from ccrk_ray.core.languages import CCRK_LANGUAGES
from ccrk_ray.experiments.demo import MARKER, OUTPUTS, DemoConfig
from tests.commands import ccrk, noise
from tests.conftest import RAY

pytestmark = RAY

TRAIN, TEST, BATCH, EPOCHS = 128, 40, 16, 2


@pytest.fixture(scope="module")
def demo_cli(tmp_path_factory):
    """``ccrk demo`` run as a user runs it; its output directory, config, report and output."""
    out = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(out=str(out), train_images=TRAIN, val_images=8, test_images=TEST, epochs=EPOCHS,
                     batch_size=BATCH, warmup_steps=2, text_width=32, embed_dim=32, vocab_size=600)
    res = ccrk("demo", "--out", out, "--train-images", TRAIN, "--val-images", 8, "--test-images", TEST,
               "--epochs", EPOCHS, "--batch-size", BATCH, "--warmup-steps", 2, "--text-width", 32,
               "--embed-dim", 32, "--vocab-size", 600, timeout=600)
    return out, cfg, json.loads((out / "report.json").read_text()), res


@pytest.fixture(scope="module")
def demo_run(demo_cli):
    return demo_cli[:3]


def test_the_output_is_ours_and_ends_with_the_table(demo_cli):
    """What a person reads: our progress lines and the table, none of Ray's own chatter."""
    out, cfg, report, res = demo_cli
    assert noise(res) == [], "\n".join(noise(res))
    lines = res.stdout.strip().splitlines()
    assert any("generated" in line and "train/val/test images" in line for line in lines)
    assert any("training resnet10t" in line for line in lines)
    assert any("[ccrk" in line and "epoch 2/2" in line for line in lines)      # from the Ray Train worker
    assert lines[-1].startswith("MRV (mean rank std across languages") and lines[-2].startswith("mean")


def test_report_has_the_contract_shape(demo_run):
    out, cfg, report = demo_run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["num_images"] == TEST
    assert list(on_disk["languages"]) == list(CCRK_LANGUAGES)
    for lang, dirs in on_disk["languages"].items():
        for d in ("t2i", "i2t"):
            m = dirs[d]
            assert (m["chance@1"], m["chance@5"], m["chance@10"]) == (2.5, 12.5, 25.0)
            assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 100
    assert set(on_disk["mrv"]) == {"t2i", "i2t"} and all(v >= 0 for v in on_disk["mrv"].values())


def test_training_ran_on_ray_workers_and_learned(demo_run):
    out, cfg, report = demo_run
    train = report["train"]
    world = train["world_size"]
    assert world in (1, 2)
    # the global batch is BATCH x 2 (the most workers) whatever the worker count: 1 worker accumulates 2
    assert train["epoch"] == EPOCHS and train["step"] == EPOCHS * (TRAIN // (BATCH * 2))
    assert train["grad_accumulation"] == 2 // world
    checkpoints = sorted(p for p in (out / "ray_results" / "pretrain").glob("checkpoint_*") if p.is_dir())
    assert 1 <= len(checkpoints) <= 2
    state = torch.load(checkpoints[-1] / "training_state.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == train["step"]
    progress = json.loads((checkpoints[-1] / "progress.json").read_text())
    # the epoch finished (no position inside it); no validation split, so no best model
    assert progress == {"epoch": EPOCHS, "step": train["step"], "position": None, "best": None}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert "epoch/loss" in acc.Tags()["scalars"]
    losses = [e.value for e in acc.Scalars("epoch/loss")]
    assert len(losses) == EPOCHS and losses[-1] < losses[0]


def test_report_equals_single_process_evaluation_of_the_saved_model(demo_run):
    """The Ray evaluation path (actors) gives exactly what one process computes from the model."""
    out, cfg, report = demo_run
    from ccrk_ray.data.transforms import ImageTransform, OneToKBatchTransform
    from ccrk_ray.eval.report import report_from_ranks
    from ccrk_ray.eval.retrieval import Embedder, rank_sharded
    from ccrk_ray.data.tokenizer import CaptionTokenizer

    table = pq.read_table(out / "data" / "test").sort_by("image_id")
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    rows = OneToKBatchTransform(CaptionTokenizer(out / "tokenizer", cfg.max_length), CCRK_LANGUAGES, 10,
                                ImageTransform(cfg.image_size, train=False))(batch)
    emb = Embedder(out / "model")(rows)
    expected = report_from_ranks(rank_sharded(emb["image_emb"], emb["text_emb"], languages=CCRK_LANGUAGES))
    assert report["languages"] == expected["languages"]
    assert report["mrv"] == pytest.approx(expected["mrv"], abs=1e-9)


def test_outputs_are_reloadable(demo_run):
    out, cfg, report = demo_run
    from transformers import AutoTokenizer

    from ccrk_ray.model import CCRKModel

    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert tok.mask_token == "<mask>"
    model = CCRKModel.from_pretrained(out / "model")
    assert model.config.text_pretrained is False and model.text.config.hidden_size == 32
    assert (out / MARKER).is_file()


def test_rerun_clears_only_its_own_outputs(demo_run, tmp_path):
    out, _, _ = demo_run
    (tmp_path / MARKER).write_text("{}")
    (tmp_path / "data").mkdir()
    (tmp_path / "report.json").write_text("{}")
    prepare_out_dir(tmp_path, MARKER, OUTPUTS, "demo")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / MARKER).write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="ccrk demo did not write: notes.txt"):
        prepare_out_dir(tmp_path, MARKER, OUTPUTS, "demo")


def test_ccrk_evaluate_reproduces_the_demo_report(demo_run, tmp_path, ray_local):
    out, cfg, report = demo_run
    from ccrk_ray.eval.evaluate import run_evaluate

    assert (out / "model" / "preprocess.json").is_file() and (out / "model" / "tokenizer.json").is_file()
    again = run_evaluate(str(out / "model"), str(out / "data" / "test"), str(tmp_path / "eval"))
    assert again["languages"] == report["languages"] and again["mrv"] == report["mrv"]
    assert (tmp_path / "eval" / "report.md").read_text().count("\n") > 10
    # a raw training checkpoint has no tokenizer/preprocess: flags supply them
    ckpt = sorted(p for p in (out / "ray_results" / "pretrain").glob("checkpoint_*") if p.is_dir())[-1]
    with pytest.raises(ValueError, match="--image-size and --max-length are needed"):
        run_evaluate(str(ckpt), str(out / "data" / "test"), str(tmp_path / "e2"))
    from_ckpt = run_evaluate(str(ckpt), str(out / "data" / "test"), str(tmp_path / "e2"), image_size=cfg.image_size,
                             max_length=cfg.max_length, tokenizer=str(out / "tokenizer"))
    assert from_ckpt["languages"] == report["languages"]
    with pytest.raises(ValueError, match="--k-test needs a model with fusion layers"):
        run_evaluate(str(out / "model"), str(out / "data" / "test"), str(tmp_path / "e3"), k_test=5)
    with pytest.raises(ValueError, match="has no caption column for xx|unknown language"):
        run_evaluate(str(out / "model"), str(out / "data" / "test"), str(tmp_path / "e4"), languages=["en", "xx"])
