"""Every caption of the kit's real multi-caption annotation files reaches evaluation: Multi30K
task2 (5 English and 5 German captions per image) and WIT (each language its own images, several
captions per image by URL), converted with ``ccrk convert``'s converters, then loaded the way
validation and two-stage evaluation load a split. Expected values come from reading the files
directly. The Ray path (``ccrk evaluate``) on IGLUE Flickr30K/xFlickr&CO is in
tests/eval/test_evaluate_ray.py."""

from __future__ import annotations

import base64
import gzip
import io
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

KIT = Path(__file__).resolve().parents[2].parent / "shared" / "data"
if not KIT.is_dir():
    pytest.skip(f"real data kit {KIT} not found (it sits next to the repository in CI)", allow_module_level=True)

from ccrk_ray.data.converters import convert_multi30k, convert_wit  # noqa: E402
from ccrk_ray.data.tokenizer import CaptionTokenizer  # noqa: E402
from ccrk_ray.data.transforms import caption_slots, load_split  # noqa: E402


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def check_split(data: Path, expected: dict[str, dict[str, list[str]]], tokenizer) -> dict:
    """Slots and counts, every caption once with its own image, in image order, texts intact."""
    langs = list(expected)
    counts = {lang: sum(map(len, caps.values())) for lang, caps in expected.items()}
    most = max(sum(len(expected[lang].get(i, [])) for lang in langs) for i in set().union(*expected.values()))
    assert caption_slots(str(data), langs) == (most, counts)
    tok = CaptionTokenizer(tokenizer, 24)
    split = load_split(str(data), langs, tok, 32)
    ids = list(split["image_id"])
    assert sorted(ids) == sorted(set().union(*expected.values()))
    for j, lang in enumerate(langs):
        part = slice(split["offsets"][j], split["offsets"][j + 1])
        assert [ids[o] for o in split["owner"][part]] == [i for i in ids for _ in expected[lang].get(i, [])]
        want, _ = tok([c for i in ids for c in expected[lang].get(i, [])])
        np.testing.assert_array_equal(split["input_ids"][part], want)
    return split


def test_multi30k_task2_five_captions_per_language(tiny_data, tmp_path):
    raw = KIT / "multi30k" / "data" / "task2" / "raw"
    names = (KIT / "multi30k" / "data" / "task1" / "image_splits" / "test_2016_flickr.txt").read_text().split("\n")[:30]
    (tmp_path / "images").mkdir()
    for n, name in enumerate(names):
        (tmp_path / "images" / name).write_bytes(jpeg(n))
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    files, expected = {}, {}
    for lang in ("en", "de"):
        for k in range(1, 6):
            lines = gzip.open(raw / f"test_2016.{k}.{lang}.gz").read().decode("utf-8").split("\n")[:30]
            path = tmp_path / f"{k}.{lang}"
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            files.setdefault(lang, []).append(path)
            for name, line in zip(names, lines):
                expected.setdefault(lang, {}).setdefault(Path(name).stem, []).append(line)
    res = convert_multi30k(files, tmp_path / "list.txt", tmp_path / "images", tmp_path / "out")
    assert res.rows_written == 30 and res.skipped.total == 0
    split = check_split(tmp_path / "out", expected, tiny_data["tokenizer"])
    assert len(split["owner"]) == 300 and np.bincount(split["owner"]).tolist() == [10] * 30


def test_wit_languages_with_their_own_images(tiny_data, tmp_path):
    wit = KIT / "iglue" / "datasets" / "wit" / "annotations"
    ann, expected, ids_of = {}, {}, {}
    for lang in ("ja", "en"):
        lines = [json.loads(x) for x in (wit / f"test_{lang}.jsonl").read_text(encoding="utf-8").splitlines()[:40]]
        out = []
        for r in lines:
            image_id = ids_of.setdefault(r["image_url"], r["wit_ix"])
            r = dict(r, image_content=base64.b64encode(jpeg(zlib.crc32(str(image_id).encode()))).decode("ascii"))
            out.append(json.dumps(r, ensure_ascii=False) + "\n")
            if r["caption_reference_description"].strip():
                expected.setdefault(lang, {}).setdefault(image_id, []).append(r["caption_reference_description"])
        ann[lang] = tmp_path / f"test_{lang}.jsonl"
        ann[lang].write_text("".join(out), encoding="utf-8")
    res = convert_wit(ann, tmp_path / "out")
    assert res.skipped.total == 0
    only = {lang: set(expected[lang]) - set(expected[other]) for lang, other in (("ja", "en"), ("en", "ja"))}
    assert only["ja"] and only["en"]                 # each language has images the other lacks ...
    split = check_split(tmp_path / "out", expected, tiny_data["tokenizer"])
    ids = list(split["image_id"])
    for j, lang in enumerate(("ja", "en")):          # ... and every image is evaluated in its own languages
        owners = {ids[o] for o in split["owner"][split["offsets"][j]:split["offsets"][j + 1]]}
        assert owners == set(expected[lang])
