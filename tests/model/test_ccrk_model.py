import pytest
import torch

from ccrk_ray.model import CCRKModel, ModelConfig
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
