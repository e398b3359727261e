import pytest
import torch

from ccrk_ray.model import CCRKModel, ModelConfig
from ccrk_ray.objectives.losses import one_to_k_contrastive
from ccrk_ray.model.encoders import build_text_encoder, build_vision_encoder
from tests.conftest import tiny_text_config


def tiny_model(**kw) -> CCRKModel:
    torch.manual_seed(0)
    return CCRKModel(ModelConfig(vision_name="resnet10t", text_config=tiny_text_config(100), embed_dim=16, **kw))


def batch(n=3, k=2, length=7):
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.randint(4, 100, (n, k, length), generator=g), torch.ones(n, k, length, dtype=torch.long))


def test_forward_gives_normalised_image_major_features_and_clamped_temperature():
    model = tiny_model()
    img, txt, temp = model(*batch())
    assert img.shape == (3, 16) and txt.shape == (6, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(6))
    assert temp.item() == pytest.approx(0.07)
    with torch.no_grad():
        model.temp.fill_(5.0)
    assert model.temperature.item() == 0.5
    with torch.no_grad():
        model.temp.fill_(-1.0)
    assert model.temperature.item() == pytest.approx(0.001)


def test_uint8_pixels_are_normalised_with_the_encoder_mean_std():
    model = tiny_model()
    pixels = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    got = model.normalize_pixels(pixels)[0, :, 0, 0]
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(got, expected)
    floats = torch.randn(1, 3, 4, 4)
    assert model.normalize_pixels(floats) is floats


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model().eval()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    again = CCRKModel.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        a, b = model(*batch()), again(*batch())
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    with pytest.raises(FileNotFoundError, match="not a saved CCRK model"):
        CCRKModel.from_pretrained(tmp_path)


def test_vision_weights_load_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    src = build_vision_encoder("resnet10t")
    save_file(src.state_dict(), str(tmp_path / "vision.safetensors"))
    loaded = build_vision_encoder("resnet10t", checkpoint_path=str(tmp_path / "vision.safetensors"))
    fresh = build_vision_encoder("resnet10t")
    key = "conv1.0.weight"
    torch.testing.assert_close(loaded.state_dict()[key], src.state_dict()[key])
    assert not torch.equal(fresh.state_dict()[key], src.state_dict()[key])


def test_text_encoder_loads_from_a_local_pretrained_path(tmp_path):
    from transformers import AutoConfig, AutoModel

    cfg = dict(tiny_text_config(100))
    src = AutoModel.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    src.save_pretrained(tmp_path / "text")
    loaded = build_text_encoder(str(tmp_path / "text"))        # the same call as "xlm-roberta-large"
    assert loaded.pooler is None
    torch.testing.assert_close(loaded.embeddings.word_embeddings.weight, src.embeddings.word_embeddings.weight)
    arch_only = build_text_encoder(str(tmp_path / "text"), pretrained=False)
    assert arch_only.config.hidden_size == 32
    assert not torch.equal(arch_only.embeddings.word_embeddings.weight, src.embeddings.word_embeddings.weight)


def test_bad_model_configs():
    with pytest.raises(ValueError, match="unknown timm vision model 'no_such_net'"):
        build_vision_encoder("no_such_net")
    with pytest.raises(ValueError, match="model_type"):
        build_text_encoder(None, config={"hidden_size": 8})
    with pytest.raises(ValueError, match="unknown model config key"):
        ModelConfig.from_dict({"vision": "x"})
    with pytest.raises(ValueError, match="temperature"):
        tiny_model(temperature=0.9)


# --- fusion (CCLM / X-VLM design) -------------------------------------------------------------

def hf_text_dir(tmp_path, layers=3):
    from transformers import AutoConfig, AutoModel

    cfg = dict(tiny_text_config(100), num_hidden_layers=layers)
    torch.manual_seed(1)
    src = AutoModel.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    src.save_pretrained(tmp_path / "text")
    return tmp_path / "text", src


def fusion_model(text_dir, **kw) -> CCRKModel:
    torch.manual_seed(0)
    return CCRKModel(ModelConfig(vision_name="resnet10t", text_name_or_path=str(text_dir), text_layers=2,
                                 fusion_layers=1, embed_dim=16, **kw))


def test_fusion_layers_take_self_attention_and_ffn_from_the_upper_text_layer(tmp_path):
    text_dir, src = hf_text_dir(tmp_path)
    model = fusion_model(text_dir)
    assert len(model.text.encoder.layer) == 2 and len(model.fusion) == 1
    upper = src.encoder.layer[2]
    f = model.fusion[0]
    q, k, v = f.self_attn.in_proj_weight.chunk(3)
    torch.testing.assert_close(q, upper.attention.self.query.weight)
    torch.testing.assert_close(v, upper.attention.self.value.weight)
    torch.testing.assert_close(f.ffn_in.weight, upper.intermediate.dense.weight)
    torch.testing.assert_close(f.ffn_norm.weight, upper.output.LayerNorm.weight)
    # the two text-only layers are the pre-trained first two
    torch.testing.assert_close(model.text.encoder.layer[1].output.dense.weight, src.encoder.layer[1].output.dense.weight)
    # the MLM head's output matrix is the word embedding matrix itself (tied)
    assert model.mlm_head.word_embeddings.weight is model.text.get_input_embeddings().weight


def test_fusion_forward_shapes_and_image_conditioning(tmp_path):
    text_dir, _ = hf_text_dir(tmp_path)
    model = fusion_model(text_dir).eval()
    pixels, ids, mask = batch(n=3, k=1, length=7)
    tokens = model.image_tokens(pixels)
    assert tokens.shape == (3, 1 + 1, 512)            # pooled + 1×1 patch grid of resnet10t at 32 px
    hidden = model.text_hidden(ids[:, 0], mask[:, 0])
    fused = model.fuse(hidden, mask[:, 0], tokens)
    assert fused.shape == (3, 7, 32)
    assert model.itm_head(fused).shape == (3, 2)
    assert model.mlm_head(fused).shape == (3, 7, 100)
    # the same text fused with another image gives other states: the image is attended to
    other = model.fuse(hidden, mask[:, 0], tokens.flip(0))
    assert not torch.allclose(fused, other)


def test_lr_mult_applies_to_new_parameters_only(tmp_path):
    text_dir, _ = hf_text_dir(tmp_path)
    model = fusion_model(text_dir, lr_mult=3.0)
    new = model.new_parameter_names()
    assert "fusion.0.cross_attn.in_proj_weight" in new and "itm_head.net.0.weight" in new and "temp" in new
    assert "vision.conv1.0.weight" in new                  # vision not pre-trained here
    assert "fusion.0.self_attn.in_proj_weight" not in new and "text.embeddings.word_embeddings.weight" not in new
    groups = model.param_groups(lr=1e-4, weight_decay=0.01)
    by_lr = {}
    for g in groups:
        by_lr.setdefault(g["lr"], 0)
        by_lr[g["lr"]] += sum(p.numel() for p in g["params"])
    assert sorted(by_lr) == pytest.approx([1e-4, 3e-4])
    assert sum(by_lr.values()) == sum(p.numel() for p in model.parameters())
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p.dim() < 2 for p in g["params"]))
    # nothing pre-trained: no favourites
    assert tiny_model().new_parameter_names() == set()


def test_fusion_model_round_trip(tmp_path):
    text_dir, _ = hf_text_dir(tmp_path)
    model = fusion_model(text_dir).eval()
    model.save_pretrained(tmp_path / "saved")
    again = CCRKModel.from_pretrained(tmp_path / "saved").eval()
    assert len(again.text.encoder.layer) == 2 and len(again.fusion) == 1
    pixels, ids, mask = batch(n=2, k=1, length=5)
    with torch.no_grad():
        a = model.itm_head(model.fuse(model.text_hidden(ids[:, 0], mask[:, 0]), mask[:, 0], model.image_tokens(pixels)))
        b = again.itm_head(again.fuse(again.text_hidden(ids[:, 0], mask[:, 0]), mask[:, 0], again.image_tokens(pixels)))
    torch.testing.assert_close(a, b)


def test_fusion_config_errors(tmp_path):
    text_dir, _ = hf_text_dir(tmp_path)
    with pytest.raises(ValueError, match="text_layers=2 \\+ fusion_layers=2 do not fit the text encoder's 3 layers"):
        CCRKModel(ModelConfig(text_name_or_path=str(text_dir), text_layers=2, fusion_layers=2))
    with pytest.raises(ValueError, match="text_layers_from \\[0, 5\\] names a layer"):
        fusion_model(text_dir, text_layers_from=[0, 5])
    with pytest.raises(ValueError, match="text_positions must be one of model, from_zero"):
        ModelConfig(text_positions="absolute")
    with pytest.raises(ValueError, match="no fusion layers"):
        tiny_model().fuse(torch.zeros(1, 2, 32), torch.ones(1, 2), torch.zeros(1, 2, 512))


def test_without_cross_proj_the_cross_attention_reads_the_vision_width(tmp_path):
    """CCLM/X-VLM: key/value projections take the 512-wide image tokens; no projection layer."""
    text_dir, _ = hf_text_dir(tmp_path)
    model = fusion_model(text_dir, cross_proj=False).eval()
    attn = model.fusion[0].cross_attn
    assert model.vision_to_text is None
    assert attn.k_proj_weight.shape == (32, 512) and attn.v_proj_weight.shape == (32, 512)
    pixels, ids, mask = batch(n=2, k=1)
    assert model.match_logits(pixels, ids[:, 0], mask[:, 0]).shape == (2, 2)
    assert model.mlm_logits(pixels, ids[:, 0], mask[:, 0]).shape == (2, 7, 100)


def test_text_layers_from_keeps_the_named_layers_in_order(tmp_path):
    text_dir, src = hf_text_dir(tmp_path, layers=4)
    model = fusion_model(text_dir, text_layers_from=[1, 3, 2])      # 2 text layers, 1 fusion layer
    for ours, index in zip(model.text.encoder.layer, [1, 3]):
        assert torch.equal(ours.attention.self.query.weight, src.encoder.layer[index].attention.self.query.weight)
    assert torch.equal(model.fusion[0].ffn_in.weight, src.encoder.layer[2].intermediate.dense.weight)
    saved = CCRKModel.from_pretrained(model.save_pretrained(tmp_path / "m"))     # the kept layers only
    assert saved.config.text_layers_from is None and len(saved.text.encoder.layer) == 2


def test_from_zero_positions_differ_from_xlmr_offsets_and_match_explicit_position_ids():
    model = tiny_model(text_positions="from_zero").eval()
    ids, mask = torch.randint(4, 100, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    ours = model.text_hidden(ids, mask)
    explicit = model.text(input_ids=ids, attention_mask=mask,
                          position_ids=torch.arange(6).expand(2, 6)).last_hidden_state
    assert torch.equal(ours, explicit)
    assert not torch.allclose(ours, model.text(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_image_mean_std_override_the_vision_models_own():
    clip_mean, clip_std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    model = tiny_model(image_mean=clip_mean, image_std=clip_std)
    pixels = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    expected = (1.0 - torch.tensor(clip_mean)) / torch.tensor(clip_std)
    assert torch.allclose(model.normalize_pixels(pixels)[0, :, 0, 0], expected)


TINY_SWIN = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1))


def test_a_224_swin_checkpoint_fine_tunes_a_step_at_384_with_window_12(tmp_path):
    torch.manual_seed(0)
    model = CCRKModel(ModelConfig(vision_name="swin_base_patch4_window7_224", vision_kwargs=TINY_SWIN,
                                  text_config=tiny_text_config(100), embed_dim=16))
    saved = model.save_pretrained(tmp_path / "224")
    _, ids, mask = batch(n=2, k=2)
    pixels224 = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    before = CCRKModel.from_pretrained(saved)
    with torch.no_grad():
        reference = before.encode_image(pixels224)
    assert before.with_image_size(224) is before                    # same size: untouched
    assert torch.equal(before.encode_image(pixels224), reference)

    big = CCRKModel.from_pretrained(saved).with_image_size(384)
    attn = big.vision.layers[0].blocks[0].attn
    assert big.input_size() == 384 and tuple(attn.window_size) == (12, 12)
    assert attn.relative_position_bias_table.shape == ((2 * 12 - 1) ** 2, 1)
    assert torch.equal(big.vision.layers[2].blocks[1].mlp.fc1.weight, before.vision.layers[2].blocks[1].mlp.fc1.weight)
    big.train()
    optimizer = torch.optim.AdamW(big.parameters(), lr=1e-3)
    pixels384 = torch.randint(0, 256, (2, 3, 384, 384), dtype=torch.uint8)
    image, text, temp = big(pixels384, ids, mask)
    loss = one_to_k_contrastive(image, text, temp)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(attn.relative_position_bias_table,
                                                    before.vision.layers[0].blocks[0].attn.relative_position_bias_table)
    resaved = CCRKModel.from_pretrained(big.save_pretrained(tmp_path / "384"))    # the 384 architecture
    assert resaved.input_size() == 384 and resaved.config.vision_kwargs["window_size"] == 12
    assert tiny_model().with_image_size(384).input_size() is None                # a CNN takes any size


def test_the_mlm_head_can_start_from_the_text_models_lm_head(tmp_path):
    from transformers import AutoConfig, AutoModelForMaskedLM

    cfg = dict(tiny_text_config(100), num_hidden_layers=3)
    torch.manual_seed(2)
    src = AutoModelForMaskedLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    src.save_pretrained(tmp_path / "mlm")
    model = fusion_model(tmp_path / "mlm", mlm_head_from_pretrained=True)
    assert torch.equal(model.mlm_head.dense.weight, src.lm_head.dense.weight)
    assert torch.equal(model.mlm_head.norm.weight, src.lm_head.layer_norm.weight)
    assert torch.equal(model.mlm_head.bias, src.lm_head.bias)
    assert torch.equal(model.text.embeddings.word_embeddings.weight, src.roberta.embeddings.word_embeddings.weight)
    assert not any(n.startswith("mlm_head.") for n in model.new_parameter_names())     # no lr_mult for them
    fresh = fusion_model(tmp_path / "mlm")
    assert "mlm_head.dense.weight" in fresh.new_parameter_names()
    assert not torch.equal(fresh.mlm_head.dense.weight, src.lm_head.dense.weight)
