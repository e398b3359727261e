import io
import json
import pickle
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ccrk_ray.data.transforms import BadRowError, ImageTransform, OneToKBatchTransform, choose_captions, decode_image
from ccrk_ray.core.languages import CCRK_LANGUAGES
from ccrk_ray.data.tokenizer import CaptionTokenizer


def jpeg(w=40, h=30, colour=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="JPEG")
    return buf.getvalue()


def test_decode_names_the_row_and_field_of_corrupt_images():
    assert decode_image(jpeg()).size == (40, 30)
    with pytest.raises(BadRowError, match=r"row 'img-7': field 'image' is not a decodable image"):
        decode_image(b"\xff\xd8 not really a jpeg", "img-7")


def test_eval_transform_is_deterministic_uint8_chw():
    t = ImageTransform(image_size=16, train=False)
    a, b = t(decode_image(jpeg())), t(decode_image(jpeg()))
    assert a.shape == (3, 16, 16) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert abs(int(a[0].mean()) - 200) < 6 and a[1].mean() < 20


def test_train_crop_box_stays_inside_and_respects_scale():
    t = ImageTransform(image_size=16, train=True, scale=(0.5, 0.9))
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = t.crop_box(64, 48, rng)
        assert 0 <= left < right <= 64 and 0 <= top < bottom <= 48
        assert 0.45 * 64 * 48 <= (right - left) * (bottom - top) <= 0.95 * 64 * 48
    out = t(decode_image(jpeg(64, 48)), rng)
    assert out.shape == (3, 16, 16)


def test_hflip_mirrors_the_image():
    img = Image.new("RGB", (16, 16), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 8, 16))               # white left half
    flipped = ImageTransform(16, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_prob=1.0)(img)
    assert flipped[0, :, 12:].mean() > 250 and flipped[0, :, :4].mean() < 5
    with pytest.raises(ValueError, match="hflip_prob"):
        ImageTransform(16, hflip_prob=2)


def test_choose_captions_keeps_language_order_and_samples_k():
    row = {"image_id": "a", "captions_en": ["hello"], "captions_de": ["hallo", "servus"], "captions_fr": ["salut"]}
    assert choose_captions(row, ["en", "de", "fr"], 3, None) == ["hello", "hallo", "salut"]
    rng = np.random.default_rng(0)
    picks = [tuple(choose_captions(row, ["en", "de", "fr"], 2, rng)) for _ in range(200)]
    assert all(len(p) == 2 for p in picks)
    assert {p[0] for p in picks} >= {"hello", "hallo", "servus"}  # every language and caption can come first
    assert ("salut", "hello") not in picks                         # order follows the language list


def test_rows_missing_languages_are_named():
    row = {"image_id": "x9", "captions_en": ["hi"], "captions_de": [], "captions_fr": None}
    with pytest.raises(BadRowError, match=r"row 'x9': needs captions in 2 languages, missing captions_de, captions_fr"):
        choose_captions(row, ["en", "de", "fr"], 2, None)


def test_batch_transform_on_real_shards(tiny_data):
    table = pq.read_table(sorted(tiny_data["train"].glob("*.parquet"))[0]).slice(0, 5)
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    tok = CaptionTokenizer(tiny_data["tokenizer"], max_length=24)
    out = OneToKBatchTransform(tok, CCRK_LANGUAGES, 10, ImageTransform(64, train=False))(batch)
    assert out["pixel_values"].shape == (5, 3, 64, 64) and out["pixel_values"].dtype == np.uint8
    assert out["input_ids"].shape == (5, 10, 24) and out["attention_mask"].shape == (5, 10, 24)
    assert list(out["image_id"]) == list(batch["image_id"])
    # image-major: caption k of image i is the language k caption of row i
    ids, _ = tok([batch["captions_ru"][3][0]])
    np.testing.assert_array_equal(out["input_ids"][3, CCRK_LANGUAGES.index("ru")], ids[0])
    with pytest.raises(ValueError, match="K=11"):
        OneToKBatchTransform(tok, CCRK_LANGUAGES, 11, ImageTransform(64))


def test_several_captions_arrive_as_numpy_arrays_and_image_keys_and_bookkeeping_pass_through(tiny_data):
    """Parquet list columns become numpy arrays per row (several captions: no truth value); ids map
    to stable int64 keys; ``_``-columns follow the rows that are kept."""
    from ccrk_ray.data.transforms import image_key

    table = pq.read_table(sorted(tiny_data["train"].glob("*.parquet"))[0]).slice(0, 4)
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in ("image_id", "image", "captions_en")}
    batch["captions_en"] = np.array([np.array([c[0], c[0] + " again"], dtype=object)
                                     for c in batch["captions_en"]], dtype=object)
    batch["image"] = batch["image"].copy()
    batch["image"][1] = b"not an image"
    batch["_pos"] = np.arange(10, 14)
    tok = CaptionTokenizer(tiny_data["tokenizer"], max_length=24)
    t = OneToKBatchTransform(tok, ["en"], 1, ImageTransform(32, train=True), with_ids=False, on_bad_row="skip",
                             image_keys=True, seed=0)
    out = t(batch)
    assert out["input_ids"].shape == (3, 1, 24) and t.skipped.counts == {"corrupt_image": 1}
    assert list(out["_pos"]) == [10, 12, 13]
    ids = [batch["image_id"][i] for i in (0, 2, 3)]
    assert list(out["image_key"]) == [image_key(i) for i in ids] and out["image_key"].dtype == np.int64
    assert image_key("a") == image_key("a") != image_key("b")


def test_recipe_options_of_the_training_crop_change_what_they_should():
    import numpy as np
    from PIL import Image

    from ccrk_ray.data.transforms import ImageTransform

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8))

    def run(**kw):
        return ImageTransform(32, train=True, **kw)(img, np.random.default_rng(7))

    plain = run()
    assert np.array_equal(plain, run())                                     # seeded: reproducible
    assert not np.array_equal(plain, run(interpolation="bicubic"))         # same box, other resampling
    flipped = run(hflip_prob=1.0)
    assert np.array_equal(flipped, plain[:, :, ::-1])
    augmented = run(randaugment=(2, 7))
    assert augmented.shape == plain.shape and augmented.dtype == np.uint8
    assert np.array_equal(augmented, run(randaugment=(2, 7)))              # RandAugment seeded from the rng
    differ = [not np.array_equal(ImageTransform(32, train=True, randaugment=(2, 7))(img, np.random.default_rng(s)),
                                 ImageTransform(32, train=True)(img, np.random.default_rng(s))) for s in range(8)]
    assert sum(differ) >= 6                     # two ops at magnitude 7 change almost every image
    wide = [ImageTransform(32, train=True, scale=(0.2, 0.2)).crop_box(120, 80, np.random.default_rng(s))
            for s in range(5)]
    assert all(abs((r - l) * (b - t) / (120 * 80) - 0.2) < 0.03 for l, t, r, b in wide)


def test_caption_passes_show_each_caption_of_a_row_once_per_epoch(tiny_data):
    """Five passes over rows with 5, 3 and 1 captions: each of the 5 shown once, the 3 in turn,
    the order another in the next epoch; with one pass captions are drawn at random as before."""
    import pyarrow.parquet as pq

    from ccrk_ray.data.tokenizer import CaptionTokenizer

    table = pq.read_table(tiny_data["test"]).slice(0, 3)
    base = {c: table.column(c).to_numpy(zero_copy_only=False) for c in ("image_id", "image")}
    colours = ["red", "blue", "green", "yellow", "white"]
    caps = [[f"a {c} circle" for c in colours], [f"a {c} square" for c in colours[:3]], ["a triangle"]]
    tok = CaptionTokenizer(tiny_data["tokenizer"], max_length=12)
    t = OneToKBatchTransform(tok, ["en"], 1, ImageTransform(32, train=True), seed=0, caption_passes=5)

    def shown(epoch):
        out = []
        for cycle in range(5):
            batch = {**base, "captions_en": np.array([np.array(c, dtype=object) for c in caps], dtype=object),
                     "_epoch": np.full(3, epoch), "_key": np.arange(3), "_cycle": np.full(3, cycle)}
            out.append([tuple(r[0]) for r in t(batch)["input_ids"]])
        return out

    def texts(row):
        return {tuple(tok([c])[0][0]) for c in caps[row]}

    e0, e1 = shown(0), shown(1)
    assert sorted(p[0] for p in e0) == sorted(texts(0)) and len({p[0] for p in e0}) == 5
    assert {p[1] for p in e0} == texts(1) and [p[1] for p in e0[:3]] == [p[1] for p in e0[3:]] + [e0[2][1]]
    assert {p[2] for p in e0} == texts(2)
    assert [p[0] for p in e0] != [p[0] for p in e1]                   # another order next epoch
    assert shown(0) == e0                                              # deterministic: resumable


def test_total_steps_count_every_pass():
    from ccrk_ray.train.schedule import total_steps

    assert total_steps([[100, 28]], 16, 3) == 8 * 3
    assert total_steps([[100, 28]], 16, 3, passes=5) == 40 * 3


# A training stream's data actor in a fresh interpreter: the module it loads, the tokenizer as Ray
# ships it (pickled in the driver), the 1-to-K transform with the training crop on real rows
DATA_ACTOR = """
import json, pickle, sys
import pyarrow.parquet as pq
import ccrk_ray.data.ingest
from ccrk_ray.data.transforms import ImageTransform, OneToKBatchTransform
shard, tokenizer, randaugment = sys.argv[1], pickle.load(open(sys.argv[2], "rb")), json.loads(sys.argv[3])
crop = ImageTransform(32, train=True, hflip_prob=0.5, randaugment=tuple(randaugment) if randaugment else None)
table = pq.read_table(shard).slice(0, 4)
out = OneToKBatchTransform(tokenizer, ("en", "de"), 2, crop)({c: table.column(c).to_numpy(zero_copy_only=False)
                                                             for c in table.column_names})
assert out["pixel_values"].shape == (4, 3, 32, 32)
print("torch" in sys.modules)
"""


def test_a_data_actor_loads_torch_only_for_randaugment(tiny_data, tmp_path):
    """Decoding is PIL and tokenising the ``tokenizers`` backend: a data actor without RandAugment
    never imports torch (seconds of start-up and ~470 MB per actor); RandAugment, which draws from
    torch's generator, brings it."""
    tokenizer = tmp_path / "tokenizer.pkl"
    tokenizer.write_bytes(pickle.dumps(CaptionTokenizer(tiny_data["tokenizer"], max_length=16)))
    shard = sorted(tiny_data["train"].glob("*.parquet"))[0]
    loaded = []
    for randaugment in (None, [2, 7]):
        res = subprocess.run([sys.executable, "-c", DATA_ACTOR, str(shard), str(tokenizer), json.dumps(randaugment)],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        loaded.append(res.stdout.split()[-1])
    assert loaded == ["False", "True"]
