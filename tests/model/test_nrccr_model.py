"""The NRCCR model on tiny configs: the same code path as mBERT + real features, no download."""

from __future__ import annotations

import pytest
import torch

from ccrk_ray.model.nrccr import NRCCRConfig, NRCCRModel
from ccrk_ray.objectives.losses import nrccr_triplet

TINY_BERT = dict(model_type="bert", vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=32)


def tiny(**kw) -> NRCCRModel:
    torch.manual_seed(0)
    cfg = dict(text_name_or_path=None, text_config=TINY_BERT, train_layers=[2, 3], text_hidden=16, text_heads=2,
               key_query_size=8, visual="vector", visual_dim=12, video_hidden=16, video_heads=2, common_dim=24,
               discriminator="not-so-weak")
    cfg.update(kw)
    return NRCCRModel(NRCCRConfig(**cfg))


def captions(b: int, length: int, seed: int, real: list[int] | None = None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    for row, n in enumerate(real or []):
        mask[row, n:] = 0
        ids[row, n:] = 0
    return ids, mask


def test_frozen_layers_and_embeddings_get_no_gradient_and_the_discriminator_is_not_the_encoders():
    model = tiny().train()
    feats = torch.randn(4, 12)
    out = model(feats, None, captions(4, 7, 1), captions(4, 6, 2), captions(4, 8, 3))
    loss = nrccr_triplet(out.source, out.item) + nrccr_triplet(out.cross, out.item) + nrccr_triplet(out.back, out.item)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for n, p in model.text.named_parameters():
        trained = ".layer.2." in f".{n}" or ".layer.3." in f".{n}"
        assert p.requires_grad == trained, n
        assert (grads[f"text.{n}"] is not None) == trained, n
    assert grads["text.embeddings.word_embeddings.weight"] is None
    assert grads["text_head.attention.query.weight"].abs().sum() > 0
    assert grads["item_map.linear.weight"].abs().sum() > 0
    encoder_params = {id(p) for p in model.encoder_parameters()}
    assert not any(id(p) in encoder_params for p in model.discriminator.parameters())
    assert all(p.requires_grad for p in model.discriminator.parameters())
    with pytest.raises(ValueError, match="outside the text encoder's 4 layers"):
        tiny(train_layers=[4])
    assert all(p.requires_grad for p in tiny(train_layers=None).text.parameters())


def test_embeddings_are_unit_norm_and_padding_does_not_change_a_caption_or_a_video():
    model = tiny(visual="frames", visual_dim=12, max_frames=10).eval()
    ids, mask = captions(3, 9, 4, real=[5, 9, 7])
    batch = model.encode_text(ids, mask)
    assert batch.shape == (3, 24) and torch.allclose(batch.norm(dim=1), torch.ones(3), atol=1e-5)
    alone = model.encode_text(ids[:1, :5], mask[:1, :5])
    assert torch.allclose(batch[0], alone[0], atol=1e-5)             # the mean is over real tokens only
    frames = torch.randn(2, 6, 12)
    fmask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6])
    videos = model.encode_item(frames, fmask)
    assert torch.allclose(videos[0], model.encode_item(frames[:1, :3])[0], atol=1e-5)
    with pytest.raises(ValueError, match="11 positions, the model has 10"):
        model.encode_item(torch.randn(1, 11, 12))


def test_the_cross_view_reads_the_translation_and_the_source_view_does_not():
    model = tiny().eval()
    src, back = captions(2, 6, 1), captions(2, 6, 3)
    a = model.text_views(src, captions(2, 5, 2), back)
    b = model.text_views(src, captions(2, 5, 9), back)
    assert torch.equal(a.source, b.source) and torch.equal(a.back, b.back)
    assert not torch.allclose(a.cross, b.cross) and not torch.allclose(a.translation, b.translation)
    assert a.source_states.shape == (2, 6, 16) and a.translation_states.shape == (2, 5, 16)


def test_a_frozen_image_tower_stays_frozen_and_in_eval_mode():
    model = tiny(visual="clip", clip_name="vit_tiny_patch16_224", clip_kwargs={"img_size": 32, "patch_size": 16},
                 visual_dim=12).train()
    assert not model.visual.tower.training and model.visual.proj.training
    pixels = torch.randn(2, 3, 32, 32)
    emb = model.encode_item(pixels)
    emb.sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.visual.tower.parameters())
    assert model.visual.proj.weight.grad.abs().sum() > 0
    assert len(model.image_mean) == 3 and len(model.image_std) == 3


@pytest.mark.parametrize("visual", ["vector", "frames", "clip"])
def test_save_and_load_give_the_same_embeddings_offline(visual, tmp_path):
    kw = {"clip_name": "vit_tiny_patch16_224", "clip_kwargs": {"img_size": 32, "patch_size": 16}} if visual == "clip" else {}
    model = tiny(visual=visual, **kw).eval()
    item = {"vector": torch.randn(3, 12), "frames": torch.randn(3, 4, 12), "clip": torch.randn(3, 3, 32, 32)}[visual]
    ids, mask = captions(3, 6, 5, real=[6, 4, 2])
    model.save_pretrained(tmp_path / "m")
    loaded = NRCCRModel.from_pretrained(tmp_path / "m")
    assert not loaded.training and loaded.config.text_name_or_path is None
    assert torch.equal(model.encode_text(ids, mask), loaded.encode_text(ids, mask))
    assert torch.equal(model.encode_item(item), loaded.encode_item(item))
    assert loaded.config.train_layers == [2, 3]
    assert all(p.requires_grad == q.requires_grad for p, q in zip(model.parameters(), loaded.parameters()))


def test_bad_configs_name_the_key():
    for kw, needle in [({"visual": "audio"}, "visual must be one of"), ({"visual": "clip"}, "needs clip_name"),
                       ({"discriminator": "huge"}, "discriminator must be one of"),
                       ({"dropout": 1.0}, "dropout must be in")]:
        with pytest.raises(ValueError, match=needle):
            NRCCRConfig(**kw)
    with pytest.raises(ValueError, match="unknown NRCCR model config key"):
        NRCCRConfig.from_dict({"family": "nrccr", "hiden": 3})


def test_the_saved_model_loader_knows_the_family(tmp_path):
    from ccrk_ray.core.config import ConfigError
    from ccrk_ray.model.saved import load_model

    tiny().save_pretrained(tmp_path / "m")
    assert isinstance(load_model(tmp_path / "m", family="nrccr"), NRCCRModel)
    with pytest.raises(ConfigError, match="holds a saved NRCCR model, this command takes a CCRK one"):
        load_model(tmp_path / "m")
