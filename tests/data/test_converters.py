"""Tests of the data-set converters (ccrk_ray.data.converters) on the real files of ../shared/data.

Expected values always come from an independent read of the source files (plain json / gzip
here), never from the converter. Images: the real photos of ../shared/data/images where they
exist, small generated stand-in JPEGs for the rest, staged in a temporary folder under the names
each format expects; a few images are left out on purpose (missing_image).
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import gzip
import io
import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
if not DATA.is_dir():
    pytest.skip(f"real data kit {DATA} not found (it sits next to the repository in CI; see "
                "shared/data/README.md)", allow_module_level=True)

from ccrk_ray.core.config import ConfigError  # noqa: E402
from ccrk_ray.commands import convert as convert_command  # noqa: E402
from ccrk_ray.data import converters as conv  # noqa: E402
from ccrk_ray.data.converters import (  # noqa: E402
    SUCCESS_FILE,
    ShardWriter,
    convert_ccrk,
    convert_coco,
    convert_iglue,
    convert_multi30k,
    convert_wit,
    multi30k_files,
)
from ccrk_ray.data.schema import arrow_schema  # noqa: E402
from ccrk_ray.core.languages import CCRK_LANGUAGES  # noqa: E402

XFLICKRCO = DATA / "iglue" / "datasets" / "xFlickrCO" / "annotations"
XFLICKRCO_LANGS = ("de", "en", "es", "id", "ja", "ru", "tr", "zh")
FLICKR30K = DATA / "iglue" / "datasets" / "flickr30k" / "annotations"
WIT = DATA / "iglue" / "datasets" / "wit" / "annotations"
TASK1 = DATA / "multi30k" / "data" / "task1"
PT_TASK1 = DATA / "framed-multi30k-pt" / "data" / "multi30k" / "task1"
COCO_CN = DATA / "coco-cn" / "data" / "coco-cn_ext.icap2020.txt"
M30K_LANGS = ("en", "de", "fr", "cs")


# ----------------------------------------------------------------------------------------------
# Independent readers and image staging
# ----------------------------------------------------------------------------------------------


def jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def text_lines(path: Path) -> list[str]:
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    lines = raw.decode("utf-8").split("\n")
    assert lines[-1] == ""
    return lines[:-1]


def standin_jpeg(key: str) -> bytes:
    h = zlib.crc32(key.encode("utf-8"))
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (h & 255, (h >> 8) & 255, (h >> 16) & 255)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def coco_name(coco_id: int, subset: str = "val2014") -> str:
    return f"COCO_{subset}_{int(coco_id):012d}.jpg"


@dataclass
class Kit:
    flickr: Path                                  # <flickr id>.jpg
    coco: Path                                    # val2014/COCO_val2014_<id>.jpg, train2014/...
    real: dict[str, Path]                         # "flickr30k:<id>" / "coco:<id>" -> original photo
    missing: set[str] = field(default_factory=set)  # staged names deliberately left out


@pytest.fixture(scope="session")
def kit(tmp_path_factory) -> Kit:
    root = tmp_path_factory.mktemp("images")
    real = {}
    for m in jsonl(DATA / "index" / "images_manifest.jsonl"):
        real[m["key"]] = DATA / m["file"]
    k = Kit(root / "flickr", root / "coco", real)
    for d in (k.flickr, k.coco / "val2014", k.coco / "train2014"):
        d.mkdir(parents=True)

    def stage(path: Path, real_key: str) -> None:
        if real_key in real:
            os.symlink(real[real_key], path)
        else:
            path.write_bytes(standin_jpeg(path.name))

    # Flickr30k: Multi30K test_2016_flickr (= the Flickr half of xFlickrCO test) and val, plus
    # every real Flickr photo of the kit (most are Multi30K train images).
    test16 = text_lines(TASK1 / "image_splits" / "test_2016_flickr.txt")
    k.missing |= {n for n in test16[10:999:494] if f"flickr30k:{Path(n).stem}" not in real}
    assert len(k.missing) == 3
    names = test16 + text_lines(TASK1 / "image_splits" / "val.txt")
    names += [f"{key.split(':')[1]}.jpg" for key in real if key.startswith("flickr30k:")]
    for name in dict.fromkeys(names):
        if name not in k.missing:
            stage(k.flickr / name, f"flickr30k:{Path(name).stem}")
    # COCO: the COCO half of xFlickrCO test (val2014), and COCO-CN ext images (first 300 + real ones).
    coco_ids = [r["id"] for r in jsonl(XFLICKRCO / "en" / "test.jsonl") if isinstance(r["id"], int)]
    k.missing |= {coco_name(i) for i in [i for i in coco_ids if f"coco:{i}" not in real][3:700:696]}
    for cid in coco_ids:
        if coco_name(cid) not in k.missing:
            stage(k.coco / "val2014" / coco_name(cid), f"coco:{cid}")
    for i, (name, _) in enumerate(coco_cn_entries()):
        path = k.coco / name
        if not path.exists() and (i < 300 or f"coco:{int(Path(name).stem[-12:])}" in real):
            stage(path, f"coco:{int(Path(name).stem[-12:])}")
    return k


def coco_cn_entries() -> list[tuple[str, str]]:
    """(image path 'train2014/COCO_train2014_<id>.jpg', caption) per line of COCO-CN ext."""
    out = []
    for line in COCO_CN.read_bytes().decode("utf-8").split("\n"):
        if line:
            ref, caption = line.split("\t", 1)
            name = ref.split("#", 1)[0]
            out.append((f"{name.split('_')[1]}/{name}.jpg", caption))
    return out


def read_out(out_dir: Path, languages) -> list[dict]:
    """All rows of the shards, in shard order, after checking the schema, names and temp files."""
    out_dir = Path(out_dir)
    names = sorted(p.name for p in out_dir.iterdir())
    assert not [n for n in names if n.endswith(".tmp")], names
    shards = sorted(out_dir.glob("*.parquet"))
    assert [p.name for p in shards] == [f"part-{i:05d}.parquet" for i in range(len(shards))]
    expected = arrow_schema(languages)
    rows = []
    for p in shards:
        table = pq.read_table(p)
        assert table.schema.equals(expected), (table.schema, expected)
        rows += table.to_pylist()
    return rows


def run_parser(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ccrk")
    convert_command.add_arguments(parser.add_subparsers(dest="command", required=True).add_parser("convert"))
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# iglue: xFlickrCO test in 8 languages, flickr30k *_ann.jsonl
# ----------------------------------------------------------------------------------------------


def test_iglue_xflickrco_all_languages(kit, tmp_path):
    ann = {lang: XFLICKRCO / lang / "test.jsonl" for lang in XFLICKRCO_LANGS}
    expected: dict[str, dict] = {}
    for lang in XFLICKRCO_LANGS:
        for r in jsonl(ann[lang]):
            e = expected.setdefault(str(r["id"]), {"img_path": r["img_path"], "caps": {}})
            assert lang not in e["caps"]
            e["caps"][lang] = r["sentences"]
    assert len(expected) == 2000 and all(len(e["caps"]) == 8 for e in expected.values())
    roots = [kit.flickr, kit.coco / "val2014"]

    def staged(e):
        return next((r / e["img_path"] for r in roots if (r / e["img_path"]).is_file()), None)

    missing = [i for i, e in expected.items() if staged(e) is None]
    blank = [i for i, e in expected.items() if any(not s.strip() for c in e["caps"].values() for s in c)]
    assert len(missing) == 5 and sorted(blank) == ["122239", "6312211170"]   # real blank de / id captions
    assert not set(missing) & set(blank)

    res = convert_iglue(ann, roots, tmp_path / "out", split="test", rows_per_shard=700)
    assert res.skipped.as_dict() == {"missing_image": 5, "empty_caption": 2}
    assert sorted(res.skipped.example_ids["empty_caption"]) == sorted(blank)
    assert set(res.skipped.example_ids["missing_image"]) == set(missing)
    rows = read_out(tmp_path / "out", XFLICKRCO_LANGS)
    want = [i for i in expected if i not in missing and i not in blank]
    assert res.rows_written == len(rows) == 1993 and len(res.shards) == 3
    assert [r["image_id"] for r in rows] == want            # order of first appearance
    n_real = 0
    for r in rows:
        e = expected[r["image_id"]]
        for lang in XFLICKRCO_LANGS:
            assert r[f"captions_{lang}"] == e["caps"][lang], (r["image_id"], lang)
        assert r["image"] == staged(e).read_bytes()
        n_real += staged(e).is_symlink()
        assert (r["split"], r["source"]) == ("test", "iglue")
    assert n_real == 39                                      # every real xFlickrCO photo of the kit


def test_iglue_translate_test_files_as_the_cli_reads_them(kit, tmp_path):
    """IGLUE translate-test (``annotations_machine-translate/{lang}/test_gmt.jsonl``: each language's
    xFlickr&CO test captions machine-translated into English) through ``ccrk convert iglue --ann-dir
    ... --name test_gmt``: the same images as the test set, every translation under its source
    language's column (how ``data.translate_test`` is evaluated and reported)."""
    from ccrk_ray.cli import main

    gmt = XFLICKRCO.parent / "annotations_machine-translate"
    langs = sorted(p.name for p in gmt.iterdir())
    assert langs == ["de", "es", "id", "ja", "ru", "tr", "zh"]                # no English
    expected = {lang: {str(r["id"]): r["sentences"] for r in jsonl(gmt / lang / "test_gmt.jsonl")} for lang in langs}
    test_ids = [str(r["id"]) for r in jsonl(XFLICKRCO / "de" / "test.jsonl")]
    assert all(list(expected[lang]) == test_ids for lang in langs)           # the test set's images, in order
    out = tmp_path / "gmt"
    assert main(["convert", "iglue", "--ann-dir", str(gmt), "--name", "test_gmt", "--languages", ",".join(langs),
                 "--images", str(kit.flickr), "--images", str(kit.coco / "val2014"), "--out", str(out)]) == 0
    rows = read_out(out, langs)
    # left out, as for the test set: the 5 images the kit cannot stage, and the 2 images whose de / id
    # test caption is blank (so is its translation)
    assert len(rows) == 2000 - 5 - 2 and not {"6312211170", "122239"} & {r["image_id"] for r in rows}
    for r in rows:
        for lang in langs:
            assert r[f"captions_{lang}"] == expected[lang][r["image_id"]], (r["image_id"], lang)
    de = {r["image_id"]: r["captions_de"] for r in rows}
    assert de["1007129816"] == ["The man is wearing an orange woolen hat."]     # English, under de


def test_iglue_flickr30k_ann_files_several_per_language(kit, tmp_path):
    files = [FLICKR30K / "test_ann.jsonl", FLICKR30K / "valid_ann.jsonl"]
    expected = {str(r["id"]): r["sentences"] for f in files for r in jsonl(f)}
    assert len(expected) == 2014 and {len(v) for v in expected.values()} == {5}
    res = convert_iglue({"en": files}, kit.flickr, tmp_path / "out")
    rows = read_out(tmp_path / "out", ["en"])
    gone = {Path(n).stem for n in kit.missing if not n.startswith("COCO")}
    assert res.skipped.as_dict() == {"missing_image": 3}
    assert {r["image_id"] for r in rows} == set(expected) - gone
    for r in rows:
        assert r["captions_en"] == expected[r["image_id"]]
        assert r["image"] == (kit.flickr / f"{r['image_id']}.jpg").read_bytes()


def test_iglue_same_id_twice_in_one_language_is_a_duplicate(kit, tmp_path):
    en = jsonl(XFLICKRCO / "en" / "test.jsonl")[:20]
    src = tmp_path / "en.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in en + en[:2]), encoding="utf-8")
    res = convert_iglue({"en": src}, kit.flickr, tmp_path / "out")
    assert res.skipped.counts["duplicate_id"] == 2
    assert res.skipped.example_ids["duplicate_id"] == [str(en[0]["id"]), str(en[1]["id"])]


# ----------------------------------------------------------------------------------------------
# multi30k (+ the Portuguese extension)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["test_2016_flickr", "val"])
def test_multi30k_five_languages(kit, tmp_path, split):
    captions, image_list = multi30k_files(TASK1, split, M30K_LANGS)
    captions["pt"] = PT_TASK1 / "raw" / f"{split}.pt.gz"
    names = text_lines(image_list)
    lines = {lang: text_lines(path) for lang, path in captions.items()}
    assert all(len(v) == len(names) for v in lines.values())
    res = convert_multi30k(captions, image_list, kit.flickr, tmp_path / "out", split=split)
    rows = read_out(tmp_path / "out", [*M30K_LANGS, "pt"])
    kept = [i for i, n in enumerate(names) if n not in kit.missing]
    assert res.rows_written == len(rows) == len(kept) >= 1000 - 3
    assert res.skipped.as_dict() == ({"missing_image": 3} if split.startswith("test") else {})
    for r, i in zip(rows, kept, strict=True):
        assert r["image_id"] == Path(names[i]).stem
        for lang in (*M30K_LANGS, "pt"):
            assert r[f"captions_{lang}"] == [lines[lang][i]], (names[i], lang)
        assert r["image"] == (kit.flickr / names[i]).read_bytes()


def test_multi30k_train_real_photos(kit, tmp_path):
    captions, image_list = multi30k_files(TASK1, "train", ("en", "de"))
    captions["pt"] = PT_TASK1 / "raw" / "train.pt.gz"
    names = text_lines(image_list)
    lines = {lang: text_lines(p) for lang, p in captions.items()}
    res = convert_multi30k(captions, image_list, kit.flickr, tmp_path / "out")
    rows = read_out(tmp_path / "out", ["en", "de", "pt"])
    staged = [i for i, n in enumerate(names) if (kit.flickr / n).is_file()]
    assert len(rows) == len(staged) >= 100
    assert res.skipped.as_dict() == {"missing_image": 29000 - len(staged)}
    for r, i in zip(rows, staged, strict=True):
        assert r["image_id"] == Path(names[i]).stem
        assert {lang: r[f"captions_{lang}"] for lang in lines} == {lang: [v[i]] for lang, v in lines.items()}
        assert r["image"] == kit.real[f"flickr30k:{r['image_id']}"].read_bytes()


def _small_multi30k(tmp_path: Path, n: int = 40) -> tuple[dict[str, Path], Path, list[str]]:
    names = text_lines(TASK1 / "image_splits" / "val.txt")[:n]
    (tmp_path / "image_splits").mkdir()
    (tmp_path / "raw").mkdir()
    image_list = tmp_path / "image_splits" / "val.txt"
    image_list.write_text("".join(x + "\n" for x in names), encoding="utf-8")
    files = {}
    for lang in ("en", "de"):
        raw = gzip.open(TASK1 / "raw" / f"val.{lang}.gz").read().split(b"\n")[:n]
        files[lang] = tmp_path / "raw" / f"val.{lang}"
        files[lang].write_bytes(b"\n".join(raw) + b"\n")
    return files, image_list, names


def test_multi30k_invalid_utf8_and_empty_lines_are_counted(kit, tmp_path):
    files, image_list, names = _small_multi30k(tmp_path)
    de = files["de"].read_bytes().split(b"\n")
    de[6] = b"Ein Hund l\xe4uft \xff\xfe im Park."        # Latin-1 / garbage bytes: not UTF-8
    de[8] = b""                                              # an empty caption line
    files["de"].write_bytes(b"\n".join(de))
    res = convert_multi30k(files, image_list, kit.flickr, tmp_path / "out")
    assert res.skipped.as_dict() == {"invalid_utf8": 1, "empty_caption": 1}
    assert res.skipped.example_ids == {"invalid_utf8": [Path(names[6]).stem],
                                       "empty_caption": [Path(names[8]).stem]}
    rows = read_out(tmp_path / "out", ["en", "de"])
    assert [r["image_id"] for r in rows] == [Path(x).stem for i, x in enumerate(names) if i not in (6, 8)]


def test_multi30k_misaligned_files_are_a_clear_error(kit, tmp_path):
    files, image_list, names = _small_multi30k(tmp_path)
    de = files["de"].read_bytes().split(b"\n")
    files["de"].write_bytes(b"\n".join(de[:20] + de[21:]))
    with pytest.raises(ConfigError) as err:
        convert_multi30k(files, image_list, kit.flickr, tmp_path / "out")
    msg = str(err.value)
    assert str(files["de"]) in msg and "39 lines" in msg and "has 40" in msg and str(image_list) in msg
    assert not (tmp_path / "out").exists()                   # checked before anything is written


# ----------------------------------------------------------------------------------------------
# coco: Karpathy-style JSON built from real COCO-CN (zh) and xFlickrCO COCO (ja) captions
# ----------------------------------------------------------------------------------------------


def test_coco_train_shape_groups_captions_by_image(kit, tmp_path):
    entries = coco_cn_entries()
    karpathy = [{"caption": c, "image": img, "image_id": int(Path(img).stem[-12:])} for img, c in entries]
    src = tmp_path / "coco-cn_train.json"
    src.write_text(json.dumps(karpathy, ensure_ascii=False), encoding="utf-8")
    groups: dict[str, list[str]] = {}
    for img, c in entries:
        groups.setdefault(img, []).append(c)
    assert len(entries) == 4712 and len(groups) == 4573 and max(map(len, groups.values())) == 3
    res = convert_coco(src, kit.coco, tmp_path / "out", lang="zh", split="train")
    rows = read_out(tmp_path / "out", ["zh"])
    staged = [img for img in groups if (kit.coco / img).is_file()]
    assert res.skipped.as_dict() == {"missing_image": len(groups) - len(staged)}
    assert [r["image_id"] for r in rows] == [str(int(Path(img).stem[-12:])) for img in staged]
    for r, img in zip(rows, staged, strict=True):
        assert r["captions_zh"] == groups[img]
        assert r["image"] == (kit.coco / img).read_bytes()
    assert sum((kit.coco / img).is_symlink() for img in staged) == 12      # the real COCO-CN photos

    # The official {"images", "annotations"} layout (STAIR Captions' shape) gives the same rows.
    files = {img: i for i, img in enumerate(groups)}
    official = {"images": [{"id": i, "file_name": img} for img, i in files.items()],
                "annotations": [{"image_id": files[img], "caption": c, "id": k} for k, (img, c) in enumerate(entries)]}
    src2 = tmp_path / "official.json"
    src2.write_text(json.dumps(official, ensure_ascii=False), encoding="utf-8")
    convert_coco(src2, kit.coco, tmp_path / "out2", lang="zh")
    rows2 = read_out(tmp_path / "out2", ["zh"])
    assert [(r["captions_zh"], r["image"]) for r in rows2] == [(r["captions_zh"], r["image"]) for r in rows]


def test_coco_test_shape_japanese(kit, tmp_path):
    ja = [r for r in jsonl(XFLICKRCO / "ja" / "test.jsonl") if isinstance(r["id"], int)]
    entries = [{"image": f"val2014/{r['img_path']}", "caption": r["sentences"], "image_id": r["id"]} for r in ja]
    for e in entries[::100]:
        del e["image_id"]                                     # test files of some releases have none
    src = tmp_path / "coco_ja_test.json"
    src.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    res = convert_coco([src], [kit.coco], tmp_path / "out", lang="ja")
    rows = read_out(tmp_path / "out", ["ja"])
    kept = [e for e in entries if (kit.coco / e["image"]).is_file()]
    assert res.skipped.as_dict() == {"missing_image": 2} and len(rows) == len(kept) == 998
    for r, e in zip(rows, kept, strict=True):
        assert r["image_id"] == (str(e["image_id"]) if "image_id" in e else Path(e["image"]).stem)
        assert r["captions_ja"] == e["caption"]
        assert r["image"] == (kit.coco / e["image"]).read_bytes()


# ----------------------------------------------------------------------------------------------
# wit: real IGLUE WIT lines, base64 pixels added for most images, URL-only for the rest
# ----------------------------------------------------------------------------------------------


def _tiff_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, "TIFF")
    return buf.getvalue()


def test_wit_pixels_grouped_by_image_url_only_urls_are_missing(tmp_path):
    langs = ("en", "ja", "el", "id", "da")
    real = {lang: jsonl(WIT / f"test_{lang}.jsonl") for lang in langs}
    blank = {r["wit_ix"] for rows in real.values() for r in rows if not r["caption_reference_description"].strip()}
    assert len(blank) == 2                                    # a '\xa0' (el) and an '' (id) caption
    tif = next(r["wit_ix"] for r in real["en"] if r["image_url"].endswith(".tif"))

    def has_pixels(wid: str) -> bool:
        return wid in blank or wid == tif or zlib.crc32(wid.encode()) % 4 != 0

    def pixels(wid: str) -> bytes:
        return _tiff_bytes() if wid == tif else standin_jpeg(wid)

    ann, seen = {}, set()
    for lang, rows in real.items():
        out = []
        for r in rows:
            r = dict(r)
            wid = r["wit_ix"]
            # pixels on the first line of an image only for half the images, on every line for the rest
            if has_pixels(wid) and (wid not in seen or zlib.crc32(wid.encode()) % 2):
                r["image_content"] = base64.b64encode(pixels(wid)).decode("ascii")
            seen.add(wid)
            out.append(json.dumps(r, ensure_ascii=False) + "\n")
        ann[lang] = tmp_path / f"test_{lang}.jsonl"
        ann[lang].write_text("".join(out), encoding="utf-8")

    expected: dict[str, dict] = {}
    for lang, rows in real.items():
        for r in rows:
            e = expected.setdefault(r["image_url"], {"id": r["wit_ix"], "caps": {}})
            e["caps"].setdefault(lang, []).append(r["caption_reference_description"])
    assert len(expected) < sum(map(len, real.values())) and any(len(e["caps"]) > 1 for e in expected.values())

    res = convert_wit(ann, tmp_path / "out")
    rows = read_out(tmp_path / "out", langs)
    want = [e for e in expected.values() if has_pixels(e["id"]) and e["id"] not in blank and e["id"] != tif]
    assert res.skipped.as_dict() == {
        "missing_image": sum(not has_pixels(e["id"]) for e in expected.values()),
        "empty_caption": 2, "unsupported_image_format": 1}
    assert sorted(res.skipped.example_ids["empty_caption"]) == sorted(blank)
    assert [r["image_id"] for r in rows] == [e["id"] for e in want]
    for r, e in zip(rows, want, strict=True):
        assert {lang: r[f"captions_{lang}"] for lang in langs} == {lang: e["caps"].get(lang) for lang in langs}
        assert r["image"] == standin_jpeg(e["id"])


def test_wit_real_files_have_only_urls(tmp_path):
    res = convert_wit({"tr": WIT / "test_tr.jsonl"}, tmp_path / "out")
    urls = {r["image_url"] for r in jsonl(WIT / "test_tr.jsonl")}
    assert res.rows_written == 0 and res.skipped.as_dict() == {"missing_image": len(urls)}
    assert read_out(tmp_path / "out", ["tr"]) == []           # one empty shard: the schema is there


# ----------------------------------------------------------------------------------------------
# ccrk JSON lines: real photos and captions, and one row of every bad kind
# ----------------------------------------------------------------------------------------------


def _gif_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("P", (8, 8), 3).save(buf, "GIF")
    return buf.getvalue()


def test_ccrk_good_rows_arrive_and_each_bad_row_is_counted(kit, tmp_path):
    entries = jsonl(DATA / "index" / "image_captions.jsonl")[:24]
    lines: list[bytes] = []
    expected: dict[str, tuple[bytes, dict]] = {}
    n_pt = 0

    def add(obj) -> None:
        lines.append(json.dumps(obj, ensure_ascii=False).encode("utf-8"))

    for i, e in enumerate(entries):
        image = (DATA / e["file"]).read_bytes()
        caps = {lang: [c["text"] for c in cs] for lang, cs in e["captions"].items()}
        n_pt += len(caps.get("pt", []))
        rec = {("image", "binary", "img")[i % 3]: base64.b64encode(image).decode("ascii")}
        if i % 3 == 0:
            rec["caption"] = {lang: (v[0] if len(v) == 1 else v) for lang, v in caps.items()}
        elif i % 3 == 1:   # a list of caption objects, merged per language in order
            rec["caption"] = [{lang: v[k] for lang, v in caps.items() if len(v) > k}
                              for k in range(max(map(len, caps.values())))]
        else:
            rec["captions"] = caps
        if i == 5:
            row_id = str(len(lines) + 1)                     # no id: the line number
        else:
            row_id = e["key"]
            rec["image_id" if i % 2 else "id"] = row_id
        add(rec)
        expected[row_id] = (image, {lang: v for lang, v in caps.items() if lang in CCRK_LANGUAGES})

    jpeg = (DATA / entries[0]["file"]).read_bytes()
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    good_cap = {"en": "A photo."}
    add({"id": "bad-corrupt", "image": b64(b"this is not an image at all"), "caption": good_cap})
    add({"id": "bad-base64", "image": "!!!not base64", "caption": good_cap})
    add({"id": "bad-truncated", "image": b64(jpeg[: len(jpeg) * 6 // 10]), "caption": good_cap})
    add({"id": "bad-gif", "image": b64(_gif_bytes()), "caption": good_cap})
    add({"id": "bad-empty", "image": b64(jpeg), "caption": {"en": "   ", "de": "Ein Foto."}})
    add({"id": "bad-number", "image": b64(jpeg), "caption": {"en": 42}})
    add({"id": "bad-null", "image": b64(jpeg), "caption": {"de": ["Ein Foto.", None]}})
    lines.append(b'{"id": "bad-utf8", "image": "' + b64(jpeg).encode() + b'", "caption": {"de": "Ein \xff\xfe Foto"}}')
    lines.append(b'{"id": "bad-surrogate", "image": "' + b64(jpeg).encode()
                 + b'", "caption": {"en": "A \\udc80 photo"}}')              # a lone-surrogate JSON escape
    add({"id": entries[0]["key"], "image": b64(jpeg), "caption": good_cap})          # duplicate id
    add({"id": "bad-noimage", "caption": good_cap})
    add({"id": "bad-onlypt", "image": b64(jpeg), "caption": {"pt": "Só em português."}})
    add({"id": "bad-nolang", "image": b64(jpeg), "caption": "a caption without a language"})
    lines.insert(3, b"   ")                                  # blank lines are not rows
    src = tmp_path / "pretrain.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    # line numbers count the blank line too
    expected = {(str(int(k) + 1) if k.isdigit() and int(k) > 3 else k): v for k, v in expected.items()}

    res = convert_ccrk(src, tmp_path / "out", rows_per_shard=10)
    assert res.skipped.as_dict() == {"corrupt_image": 3, "unsupported_image_format": 1, "empty_caption": 1,
                                     "non_string_caption": 2, "invalid_utf8": 2, "duplicate_id": 1,
                                     "missing_image": 1, "missing_language": 2}
    assert res.skipped.example_ids == {
        "corrupt_image": ["bad-corrupt", "bad-base64", "bad-truncated"], "unsupported_image_format": ["bad-gif"],
        "empty_caption": ["bad-empty"], "non_string_caption": ["bad-number", "bad-null"],
        "invalid_utf8": ["bad-utf8", "bad-surrogate"], "duplicate_id": [entries[0]["key"]],
        "missing_image": ["bad-noimage"], "missing_language": ["bad-onlypt", "bad-nolang"]}
    assert res.ignored_languages == ({"pt": n_pt} if n_pt else {})
    rows = read_out(tmp_path / "out", CCRK_LANGUAGES)
    assert len(res.shards) == 3 and [r["image_id"] for r in rows] == list(expected)
    for r in rows:
        image, caps = expected[r["image_id"]]
        assert r["image"] == image
        assert {lang: r[f"captions_{lang}"] for lang in CCRK_LANGUAGES} == {lang: caps.get(lang)
                                                                            for lang in CCRK_LANGUAGES}
    record = json.loads((tmp_path / "out" / SUCCESS_FILE).read_text(encoding="utf-8"))
    assert record["rows_written"] == len(rows) and record["rows_skipped"] == 13
    assert record["skipped"] == res.skipped.as_dict()
    assert record["arguments"]["arguments"]["inputs"] == [str(src.resolve())]


def test_ccrk_malformed_json_line_names_file_and_line(tmp_path):
    src = tmp_path / "broken.jsonl"
    src.write_text('{"id": 1, "image": "", "caption": {"en": "x"}}\n{"id": 2, "image": \n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken\.jsonl:2: not valid JSON"):
        convert_ccrk(src, tmp_path / "out")
    assert not (tmp_path / "out" / SUCCESS_FILE).exists()


# ----------------------------------------------------------------------------------------------
# ShardWriter: shard sizes, idempotency, interrupted runs
# ----------------------------------------------------------------------------------------------


def _val_inputs():
    captions, image_list = multi30k_files(TASK1, "val", ("en", "de"))
    return captions, image_list


def _state(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(out.iterdir())}


def test_second_run_does_nothing_and_other_arguments_reconvert(kit, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ccrk")
    captions, image_list = _val_inputs()
    out = tmp_path / "out"
    first = convert_multi30k(captions, image_list, kit.flickr, out, rows_per_shard=400)
    assert first.rows_written == 1014 and [p.name for p in first.shards] == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    before = _state(out)
    caplog.clear()
    again = convert_multi30k(captions, image_list, kit.flickr, out, rows_per_shard=400)
    assert "nothing to do" in caplog.text
    caplog.clear()
    assert again.already_done and again.rows_written == 1014 and again.shards == first.shards
    assert _state(out) == before                             # not one file touched
    other = convert_multi30k(captions, image_list, kit.flickr, out, rows_per_shard=600)
    assert not other.already_done and "removing 4 file(s)" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == [SUCCESS_FILE, "part-00000.parquet", "part-00001.parquet"]
    assert len(read_out(out, ["en", "de"])) == 1014
    # a shard deleted behind the writer's back: the same arguments convert again
    (out / "part-00001.parquet").unlink()
    assert not convert_multi30k(captions, image_list, kit.flickr, out, rows_per_shard=600).already_done
    assert len(read_out(out, ["en", "de"])) == 1014


def test_changed_input_file_converts_again(kit, tmp_path):
    files, image_list, names = _small_multi30k(tmp_path)
    out = tmp_path / "out"
    assert convert_multi30k(files, image_list, kit.flickr, out).rows_written == 40
    assert convert_multi30k(files, image_list, kit.flickr, out).already_done
    en = files["en"].read_bytes().split(b"\n")
    en[0] = b"A different first caption."
    files["en"].write_bytes(b"\n".join(en))
    res = convert_multi30k(files, image_list, kit.flickr, out)
    assert not res.already_done
    assert read_out(out, ["en", "de"])[0]["captions_en"] == ["A different first caption."]


def test_leftovers_of_an_interrupted_run_are_removed(kit, tmp_path):
    captions, image_list = _val_inputs()
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00000.parquet").write_bytes(b"half a shard")
    (out / "part-00007.parquet").write_bytes(b"stale")
    (out / ".part-00001.parquet.tmp").write_bytes(b"in progress")
    (out / "notes.txt").write_text("not the writer's")
    res = convert_multi30k(captions, image_list, kit.flickr, out, rows_per_shard=512)
    assert sorted(p.name for p in out.iterdir()) == [SUCCESS_FILE, "notes.txt", "part-00000.parquet",
                                                     "part-00001.parquet"]
    assert (out / "notes.txt").read_text() == "not the writer's"
    assert res.rows_written == len(read_out(out, ["en", "de"])) == 1014


def test_crash_mid_conversion_leaves_no_temp_file_and_restarts_cleanly(kit, tmp_path, monkeypatch):
    captions, image_list = _val_inputs()
    out = tmp_path / "out"
    real_write = conv.pq.write_table
    calls = []

    def spy(table, where, **kw):
        where = Path(where)
        calls.append(where.name)
        assert not fnmatch.fnmatch(where.name, "*.parquet")    # temp names never match *.parquet
        assert where.parent == out
        if len(calls) == 3:
            where.write_bytes(b"PAR1 partial")
            raise KeyboardInterrupt
        real_write(table, where, **kw)
        assert where not in set(out.glob("*.parquet"))

    monkeypatch.setattr(conv.pq, "write_table", spy)
    with pytest.raises(KeyboardInterrupt):
        convert_multi30k(captions, image_list, kit.flickr, out, rows_per_shard=300)
    assert calls == [".part-00000.parquet.tmp", ".part-00001.parquet.tmp", ".part-00002.parquet.tmp"]
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    monkeypatch.setattr(conv.pq, "write_table", real_write)
    res = convert_multi30k(captions, image_list, kit.flickr, out, rows_per_shard=300)
    assert not res.already_done and len(res.shards) == 4
    assert sorted(p.name for p in out.iterdir()) == [SUCCESS_FILE] + [f"part-0000{i}.parquet" for i in range(4)]
    assert len(read_out(out, ["en", "de"])) == 1014


def test_shard_size_in_mb(kit, tmp_path):
    photos = sorted(kit.real.items())[:40]
    target = 0.5
    with ShardWriter(tmp_path / "out", ["en"], target_shard_mb=target, source="kit") as w:
        for key, path in photos:
            assert w.write(key, path.read_bytes(), {"en": f"photo {key}"})
    shards = w.result.shards
    assert len(shards) >= 3
    sizes = {key: path.stat().st_size + len(key) + len(f"photo {key}") for key, path in photos}
    for i, p in enumerate(shards):
        ids = pq.read_table(p, columns=["image_id"]).column(0).to_pylist()
        total = sum(sizes[k] for k in ids)
        if i < len(shards) - 1:
            assert total >= target * 2**20 > total - sizes[ids[-1]]
        assert p.stat().st_size < 1.5 * target * 2**20
    assert sum(len(pq.read_table(p)) for p in shards) == 40


def test_writer_checks_its_arguments(tmp_path):
    with pytest.raises(ConfigError, match="rows per shard"):
        ShardWriter(tmp_path, ["en"], rows_per_shard=0)
    with pytest.raises(ConfigError, match="MB"):
        ShardWriter(tmp_path, ["en"], target_shard_mb=-1)
    with pytest.raises(ConfigError, match="not a language code"):
        ShardWriter(tmp_path, ["en", "captions x"])
    with pytest.raises(ConfigError, match="required language"):
        ShardWriter(tmp_path, ["en"], required_languages=["de"])
    with pytest.raises(RuntimeError, match="context manager"):
        ShardWriter(tmp_path, ["en"]).write("a", b"", {"en": "x"})


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def test_cli_each_format(kit, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    for lang in ("en", "de"):
        rows = jsonl(XFLICKRCO / lang / "test.jsonl")[:30]
        (small / f"{lang}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                             encoding="utf-8")
    args = run_parser(["convert", "iglue", "--out", str(tmp_path / "ig"), "--ann", f"en={small / 'en.jsonl'}",
                       "--ann", f"de={small / 'de.jsonl'}", "--images", str(kit.flickr),
                       "--rows-per-shard", "10", "--split", "test"])
    assert convert_command.main(args) == 0
    rows = read_out(tmp_path / "ig", ["en", "de"])
    assert len(rows) == 30 - 1 and {r["split"] for r in rows} == {"test"}      # 1 of the 30 left out
    assert convert_command.main(args) == 0                                                # already done

    (tmp_path / "m30k_in").mkdir()
    _small_multi30k(tmp_path / "m30k_in")
    pt = tmp_path / "val.pt"
    pt.write_bytes(b"\n".join(gzip.open(PT_TASK1 / "raw" / "val.pt.gz").read().split(b"\n")[:40]) + b"\n")
    args = run_parser(["convert", "multi30k", "--out", str(tmp_path / "m"), "--task1", str(tmp_path / "m30k_in"),
                       "--name", "val", "--languages", "en,de", "--captions", f"pt={pt}",
                       "--images", str(kit.flickr), "--shard-mb", "0.0001", "--require-languages", "en,pt"])
    assert convert_command.main(args) == 0
    rows = read_out(tmp_path / "m", ["en", "de", "pt"])
    assert len(rows) == 40 and len(list((tmp_path / "m").glob("*.parquet"))) == 40   # ~100-byte target: one row a shard
    assert [r["captions_pt"] for r in rows] == [[x] for x in text_lines(pt)]

    entries = [{"image": f"val2014/{r['img_path']}", "caption": r["sentences"], "image_id": r["id"]}
               for r in jsonl(XFLICKRCO / "en" / "test.jsonl")[1000:1010]]
    (tmp_path / "coco.json").write_text(json.dumps(entries), encoding="utf-8")
    args = run_parser(["convert", "coco", "--out", str(tmp_path / "c"), "--json", str(tmp_path / "coco.json"),
                       "--lang", "en", "--images", str(kit.coco)])
    assert convert_command.main(args) == 0 and len(read_out(tmp_path / "c", ["en"])) == 10

    args = run_parser(["convert", "wit", "--out", str(tmp_path / "w"), "--ann", f"tr={WIT / 'test_tr.jsonl'}"])
    assert convert_command.main(args) == 1                                                # URLs only: no rows

    line = {"id": "x1", "img": base64.b64encode(standin_jpeg("x1")).decode(), "caption": {"en": "A.", "pt": "Um."}}
    (tmp_path / "p.jsonl").write_text(json.dumps(line) + "\n", encoding="utf-8")
    args = run_parser(["convert", "ccrk", "--out", str(tmp_path / "p"), "--input", str(tmp_path / "p.jsonl"),
                       "--languages", "en,pt", "--source", "mine"])
    assert convert_command.main(args) == 0
    (row,) = read_out(tmp_path / "p", ["en", "pt"])
    assert (row["captions_en"], row["captions_pt"], row["source"]) == (["A."], ["Um."], "mine")


def test_cli_bad_input_is_a_one_line_config_error(kit, tmp_path):
    missing = tmp_path / "nope" / "en.jsonl"
    with pytest.raises(ConfigError, match=str(missing)) as err:
        convert_command.main(run_parser(["convert", "iglue", "--out", str(tmp_path / "o"), "--ann", f"en={missing}",
                                "--images", str(kit.flickr)]))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        convert_command.main(run_parser(["convert", "coco", "--out", str(tmp_path / "o"), "--json", str(COCO_CN),
                                "--lang", "zh", "--images", str(tmp_path / "no-images")]))
    with pytest.raises(ConfigError, match="multi30k caption file .*val.xx.gz"):
        convert_command.main(run_parser(["convert", "multi30k", "--out", str(tmp_path / "o"), "--task1", str(TASK1),
                                "--name", "val", "--languages", "en,xx", "--images", str(kit.flickr)]))
    with pytest.raises(SystemExit):                          # argparse: --rows-per-shard xor --shard-mb
        run_parser(["convert", "wit", "--out", "o", "--ann", "en=x", "--rows-per-shard", "5", "--shard-mb", "1"])
