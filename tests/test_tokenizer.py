import numpy as np
import pytest

from ccrk_ray.core.config import ConfigError
from transformers import AutoTokenizer

from ccrk_ray.data.tokenizer import CaptionTokenizer, load_tokenizer, train_tokenizer

CAPTIONS = ["There is a small red circle on the left on a white background.",
            "Ein kleiner roter Kreis links auf weißem Hintergrund.",
            "白色背景上，左边有一个红色小圆形。",
            "白い背景の左側に小さな赤い円が一つあります。",
            "Маленький красный круг слева на белом фоне."] * 40


def test_trained_tokenizer_loads_with_autotokenizer_and_has_xlmr_specials(tmp_path):
    path = train_tokenizer(CAPTIONS, tmp_path / "tok", vocab_size=300)
    tok = AutoTokenizer.from_pretrained(str(path))
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.mask_token == "<mask>" and tok.mask_token_id == len(tok) - 1
    ids = tok(CAPTIONS[0])["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2
    # words of a repeated corpus become whole pieces; CJK characters are split off one by one
    assert "▁circle" in tok.convert_ids_to_tokens(ids)
    zh = tok.convert_ids_to_tokens(tok(CAPTIONS[2])["input_ids"])
    assert "红" in zh and "圆" in zh
    assert tok.decode(ids, skip_special_tokens=True) == CAPTIONS[0]


def test_caption_tokenizer_equals_hf_call_and_pads_to_length(tmp_path):
    path = train_tokenizer(CAPTIONS, tmp_path / "tok", vocab_size=300)
    hf = load_tokenizer(path)
    fast = CaptionTokenizer(path, max_length=12)
    ids, mask = fast(CAPTIONS[:5])
    ref = hf(CAPTIONS[:5], padding="max_length", truncation=True, max_length=12, return_tensors="np")
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    assert ids.shape == (5, 12) and ids.dtype == np.int64
    short = CaptionTokenizer(hf, max_length=40)(["Маленький круг."])
    assert short[1].sum() < 40 and short[0][0, short[1].sum():].tolist() == [1] * (40 - short[1].sum())


def test_caption_tokenizer_pickles_without_the_hf_object(tmp_path):
    import pickle

    fast = CaptionTokenizer(train_tokenizer(CAPTIONS, tmp_path / "tok", vocab_size=300), max_length=16)
    again = pickle.loads(pickle.dumps(fast))
    assert again.hf is None
    np.testing.assert_array_equal(again(CAPTIONS[:3])[0], fast(CAPTIONS[:3])[0])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CAPTIONS, tmp_path, vocab_size=10)
    with pytest.raises(ConfigError, match=f"tokenizer {tmp_path / 'does-not-exist'}: cannot be loaded"):
        load_tokenizer(tmp_path / "does-not-exist")


def test_pre_caption_normalises_as_the_reference_code():
    from ccrk_ray.data.tokenizer import pre_caption

    assert pre_caption("A <person> on a red-and-white bike, riding/walking... (quickly)!", 30) == \
        "a person on a red and white bike riding walking quickly"
    assert pre_caption("Zwei  Hunde; spielen: im ~Schnee~", 3) == "zwei hunde spielen"
    assert pre_caption("一只狗在草地上奔跑。", 5) == "一只狗在草地上奔跑。"        # only ASCII punctuation goes


def test_caption_tokenizer_with_pre_caption_gives_the_ids_of_the_normalised_caption(tmp_path):
    from ccrk_ray.data.tokenizer import CaptionTokenizer, train_tokenizer

    path = train_tokenizer(["a dog runs on the grass", "A DOG, running!"] * 20, tmp_path / "tok", vocab_size=200)
    plain, normalised = CaptionTokenizer(path, 16), CaptionTokenizer(path, 16, pre_caption=2)
    ids, mask = normalised(["A DOG, running!"])
    expected_ids, expected_mask = plain(["a dog"])
    assert (ids == expected_ids).all() and (mask == expected_mask).all()
    assert not (plain(["A DOG, running!"])[0] == ids).all()
