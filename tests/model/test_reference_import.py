"""Importing checkpoints of the CCRK reference code: key mapping, both file wrappings, and what the
imported model computes, on tiny checkpoints in the reference's layout."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import ccrk_ray
from ccrk_ray.core.config import ConfigError
from ccrk_ray.data.tokenizer import train_tokenizer
from ccrk_ray.model.reference import CLIP_MEAN, CLIP_STD, import_checkpoint
from ccrk_ray.model.saved import Preprocess
from tests.commands import ccrk
from tests.model.reference_layout import (FIRST_FUSION, SWIN, TEXT_CONFIG, full_wrapping, reference_outputs,
                                          reference_state)

CAPTIONS = ["a dog runs on the grass", "two children play football", "ein hund läuft", "un chat dort"] * 10


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    (root / "text").mkdir()
    (root / "text" / "config.json").write_text(json.dumps(TEXT_CONFIG))
    (root / "swin.json").write_text(json.dumps(SWIN))
    tokenizer = train_tokenizer(CAPTIONS, root / "tok", vocab_size=100)
    return root, tokenizer


def do_import(kit, obj, name, **kw):
    root, tokenizer = kit
    src = root / f"{name}.th"
    torch.save(obj, src)
    out = import_checkpoint(src, root / name, vision_config=root / "swin.json", text_config=str(root / "text"),
                            tokenizer=tokenizer, **kw)
    return ccrk_ray.load_model(out), out


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=g)
    ids = torch.randint(3, 90, (3, 9), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0                          # a shorter caption: padding must not be attended to
    ids[1, 6:] = 1
    return pixels, ids, mask


@torch.no_grad()
def test_a_pretraining_checkpoint_imports_and_computes_what_the_reference_computes(kit):
    state = reference_state(pretrain=True)
    model, out = do_import(kit, {"model": state}, "pretrain")
    assert not model.training
    pixels, ids, mask = inputs()
    tokens = model.image_tokens(pixels)
    text_feat, itm, mlm = reference_outputs(state, tokens, ids, mask)
    assert (model.encode_text(ids, mask) - text_feat).abs().max() < 1e-5
    assert (model.match_logits(pixels, ids, mask) - itm).abs().max() < 1e-4
    assert (model.mlm_logits(pixels, ids, mask) - mlm).abs().max() < 1e-4
    # the image side: the mean token first, then the patch tokens, through vision_proj
    assert tokens.shape == (3, 1 + 2 * 2, 128)
    assert torch.allclose(tokens[:, 0], tokens[:, 1:].mean(1), atol=1e-6)
    expected = F.normalize(F.linear(tokens[:, 0], state["vision_proj.weight"], state["vision_proj.bias"]), dim=-1)
    assert torch.allclose(model.encode_image(pixels), expected, atol=1e-6)


def test_swin_weights_move_to_timms_layout_and_pixels_use_clips_statistics(kit):
    state = reference_state(pretrain=True, seed=1)
    model, out = do_import(kit, state, "bare")
    # Microsoft's Swin merges patches at the end of stage i, timm at the start of stage i + 1
    assert torch.equal(model.vision.layers[1].downsample.reduction.weight,
                       state["vision_encoder.layers.0.downsample.reduction.weight"])
    assert torch.equal(model.vision.layers[2].blocks[1].attn.qkv.weight,
                       state["vision_encoder.layers.2.blocks.1.attn.qkv.weight"])
    assert torch.equal(model.fusion[0].cross_attn.k_proj_weight,
                       state[f"text_encoder.bert.encoder.layer.{FIRST_FUSION}.crossattention.self.key.weight"])
    assert model.temp.item() == pytest.approx(0.07)
    pixels = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(model.normalize_pixels(pixels)[0, :, 0, 0], expected)
    config = json.loads((out / "config.json").read_text())
    assert config["text_positions"] == "from_zero" and config["cross_proj"] is False
    assert config["fusion_dropout"] == 0.1 and config["text_layers"] == FIRST_FUSION
    pre = Preprocess.read(out)
    assert (pre.image_size, pre.max_length, pre.pre_caption) == (64, 40, 40)


def test_the_full_pretraining_wrapping_needs_trust_pickle(kit):
    state = reference_state(pretrain=True, seed=2)
    with pytest.raises(ConfigError, match="runs pickled code: pass --trust-pickle"):
        do_import(kit, full_wrapping(state), "wrapped")
    model, out = do_import(kit, full_wrapping(state), "wrapped", trust_pickle=True)
    assert Preprocess.read(out).max_length == 30 and Preprocess.read(out).pre_caption == 30   # its config's
    assert torch.equal(model.text.embeddings.word_embeddings.weight,
                       state["text_encoder.bert.embeddings.word_embeddings.weight"])


@torch.no_grad()
def test_a_finetuned_checkpoint_imports_without_an_mlm_head(kit, caplog):
    state = reference_state(pretrain=False, seed=3)
    with caplog.at_level("WARNING", logger="ccrk"):
        model, out = do_import(kit, {"model": state, "config": {"image_res": 64, "max_tokens": 24}}, "finetuned")
    assert "without the MLM head" in caplog.text
    pixels, ids, mask = inputs(1)
    text_feat, itm, _ = reference_outputs(state, model.image_tokens(pixels), ids, mask)
    assert (model.encode_text(ids, mask) - text_feat).abs().max() < 1e-5
    assert (model.match_logits(pixels, ids, mask) - itm).abs().max() < 1e-4
    assert Preprocess.read(out).max_length == 24


def test_checkpoints_that_do_not_fit_are_one_clear_error(kit):
    root, _ = kit
    state = reference_state(pretrain=False, seed=4)
    with pytest.raises(ConfigError, match="trained at 384 px but the vision config is for 64 px"):
        do_import(kit, {"model": state, "config": {"image_res": 384}}, "res")
    state["bbox_head.0.weight"] = torch.zeros(2, 2)
    with pytest.raises(ConfigError, match="weights with no place in the model: bbox_head.0.weight"):
        do_import(kit, state, "extra")
    with pytest.raises(ConfigError, match="not a CCRK/CCLM checkpoint"):
        do_import(kit, {"model": {"encoder.weight": torch.zeros(1)}}, "other")
    wrong = reference_state(pretrain=False, seed=4)
    wrong["text_proj.weight"] = torch.zeros(16, 48)
    with pytest.raises(ConfigError, match="do not fit the architecture"):
        do_import(kit, wrong, "wrong")


def test_the_command_imports_and_says_so_or_names_the_problem(kit):
    root, tokenizer = kit
    torch.save(reference_state(pretrain=True, seed=5), root / "cli.th")
    res = ccrk("import-checkpoint", root / "cli.th", "--out", root / "cli", "--vision-config", root / "swin.json",
               "--text-config", root / "text", "--tokenizer", tokenizer, timeout=300)
    assert "imported" in res.stdout and (root / "cli" / "model.safetensors").is_file()
    assert (root / "cli" / "tokenizer.json").is_file()
    res = ccrk("import-checkpoint", root / "missing.th", "--out", root / "x", check=False, timeout=300)
    assert res.returncode == 2 and res.stderr.strip() == f"ccrk: error: {root / 'missing.th'}: no such checkpoint file"
