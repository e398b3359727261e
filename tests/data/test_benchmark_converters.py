"""``ccrk convert xtd10|xtd200|flickr30k-200|xm3600`` on hand-made files in the layouts
CLIP_benchmark's loaders read (clip_benchmark/datasets/{xtd10,xtd200,flickr30k_200,crossmodal3600}.py):
every caption arrives with its image, Japanese ``jp`` files become ``ja``, FLORES codes are kept,
bad input is a one-line error or a counted skip."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from ccrk_ray.commands import convert as convert_command
from ccrk_ray.core.config import ConfigError


def run_parser(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ccrk")
    convert_command.add_arguments(parser.add_subparsers(dest="command", required=True).add_parser("convert"))
    return parser.parse_args(argv)


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (seed * 40 % 256, 90, 200)).save(buf, "JPEG")
    return buf.getvalue()


def rows(out: Path) -> dict[str, dict]:
    table = pq.read_table(out)
    return {r["image_id"]: r for r in table.to_pylist()}


def aligned_layout(root: Path, listing: str, files: dict[str, str], names: list[str], captions: dict[str, list[str]],
                   missing: str | None = None):
    """An image list, one caption file per language (relative paths in ``files``), images/."""
    (root / "images").mkdir(parents=True)
    (root / listing).parent.mkdir(parents=True, exist_ok=True)
    (root / listing).write_text("\n".join(names) + "\n", encoding="utf-8")
    for code, rel in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("\n".join(captions[code]) + "\n", encoding="utf-8")
    for i, name in enumerate(names):
        if name != missing:
            (root / "images" / name).write_bytes(jpeg(i))


def convert(argv: list) -> int:
    return convert_command.main(run_parser(["convert", *map(str, argv)]))


def test_xtd10_in_its_repository_layout(tmp_path):
    names = ["1001.jpg", "1002.jpg", "1003.jpg"]
    caps = {"en": ["a dog", "a cat", "two birds"], "de": ["ein Hund", "eine Katze", "zwei Vögel"],
            "jp": ["犬", "猫", "二羽の鳥"]}
    # XTD10/ holds most languages, MIC/ German and French, STAIR/ Japanese (as "jp")
    aligned_layout(tmp_path / "xtd", "XTD10/test_image_names.txt",
                   {"en": "XTD10/test_1kcaptions_en.txt", "de": "MIC/test_1kcaptions_de.txt",
                    "jp": "STAIR/test_1kcaptions_jp.txt"}, names, caps, missing="1003.jpg")
    assert convert(["xtd10", "--root", tmp_path / "xtd", "--languages", "en,de,ja", "--out", tmp_path / "out",
                    "--split", "test"]) == 0
    got = rows(tmp_path / "out")
    assert sorted(got) == ["1001", "1002"]                       # 1003's image is missing: skipped, counted
    assert got["1002"]["captions_ja"] == ["猫"] and got["1001"]["captions_de"] == ["ein Hund"]
    success = json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())
    assert success["skipped"]["missing_image"] == 1 and success["arguments"]["converter"] == "convert xtd10"
    with pytest.raises(ConfigError, match="no caption file test_1kcaptions_ko.txt for ko"):
        convert(["xtd10", "--root", tmp_path / "xtd", "--languages", "en,ko", "--out", tmp_path / "o2"])


@pytest.mark.parametrize("name, listing", [("xtd200", "test_image_names.txt"), ("flickr30k-200", "filenames.txt")])
def test_flores_coded_benchmarks(tmp_path, name, listing):
    names = ["a.jpg", "b.jpg"]
    caps = {"eng_Latn": ["a red car", "a boat"], "jpn_Jpan": ["赤い車", "ボート"], "swh_Latn": ["gari jekundu", "mashua"]}
    aligned_layout(tmp_path / name, listing, {c: f"{c}.txt" for c in caps}, names, caps)
    assert convert([name, "--root", tmp_path / name, "--languages", "eng_Latn,jpn_Jpan,swh_Latn",
                    "--out", tmp_path / "out"]) == 0
    got = rows(tmp_path / "out")
    assert got["b"]["captions_swh_Latn"] == ["mashua"] and got["a"]["captions_jpn_Jpan"] == ["赤い車"]
    # a caption file out of step with the image list is refused before anything is written
    (tmp_path / name / "eng_Latn.txt").write_text("only one line\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="has 1 lines but the image list"):
        convert([name, "--root", tmp_path / name, "--languages", "eng_Latn", "--out", tmp_path / "o2"])


def test_crossmodal3600_every_caption_of_every_language(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    lines = [{"image/key": "000411001ff7dd4f", "en": {"caption": ["a bowl of soup", "soup on a table"]},
              "de": {"caption": ["eine Suppe"]}, "ja": {"caption": ["スープ", "テーブルの上のスープ"]}},
             {"image/key": "0005ad1fdd2ac61e", "en": {"caption": ["a bike"]}, "de": {"caption": []},
              "ja": {"caption": ["自転車"]}},
             {"image/key": "00ffdeadbeef0000", "en": {"caption": ["no picture"]}}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n",
                                             encoding="utf-8")
    for i, x in enumerate(lines[:2]):
        (images / f"{x['image/key']}.jpg").write_bytes(jpeg(i))
    assert convert(["xm3600", "--captions", tmp_path / "captions.jsonl", "--images", images, "--languages", "en,de,ja",
                    "--out", tmp_path / "out"]) == 0
    got = rows(tmp_path / "out")
    assert sorted(got) == ["000411001ff7dd4f", "0005ad1fdd2ac61e"]
    assert got["000411001ff7dd4f"]["captions_ja"] == ["スープ", "テーブルの上のスープ"]      # every caption, not the first
    assert not got["0005ad1fdd2ac61e"]["captions_de"]                                     # that language has none
    assert json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())["skipped"]["missing_image"] == 1
    (tmp_path / "bad.jsonl").write_text('{"image/key": "x"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not valid JSON"):
        convert(["xm3600", "--captions", tmp_path / "bad.jsonl", "--images", images, "--languages", "en",
                 "--out", tmp_path / "o2"])
