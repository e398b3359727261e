"""NRCCR's TextData / FeatureData layout (``ccrk_ray.data.nrccr``), built from the kit's real Multi30K
captions (the translation files themselves are not in the kit: German task1 captions stand in for
``enc2de`` and English for the back-translation)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from ccrk_ray.core.config import DataError
from ccrk_ray.data.nrccr import (align_views, parse_cap_id, read_bigfile, read_captions, read_video2frames,
                                 write_bigfile)

KIT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "multi30k" / "data" / "task1"


def kit_lines(lang: str, n: int = 25) -> tuple[list[str], list[str]]:
    if not KIT.is_dir():
        pytest.skip(f"real data kit {KIT} not found (it sits next to the repository in CI)")
    names = (KIT / "image_splits" / "val.txt").read_text().split("\n")[:n]
    lines = gzip.open(KIT / "raw" / f"val.{lang}.gz").read().decode("utf-8").split("\n")[:n]
    return [Path(x).stem for x in names], lines


def write_view(path: Path, items, tag: str, texts, skip=()) -> Path:
    path.write_text("".join(f"{item}#{tag}#0 {text}\n" for i, (item, text) in enumerate(zip(items, texts))
                            if i not in skip), encoding="utf-8")
    return path


def test_views_of_real_captions_align_by_item_and_index(tmp_path):
    items, en = kit_lines("en")
    _, de = kit_lines("de")
    files = {"source": write_view(tmp_path / "en.txt", items, "enc", en),
             "translation": write_view(tmp_path / "de_trans.txt", items, "enc2de", de),
             "back_translation": write_view(tmp_path / "back.txt", items, "enc2de2enc", en, skip={3, 7}),
             "native": write_view(tmp_path / "de.txt", items, "de", de)}
    keys, views, missing = align_views(files)
    assert keys == [(i, 0) for i in items]
    assert views["translation"][(items[5], 0)] == de[5].strip() and views["source"][(items[0], 0)] == en[0].strip()
    assert missing == {"source": 0, "translation": 0, "back_translation": 2, "native": 0}
    assert read_captions(files["back_translation"])[0] == "enc2de2enc"
    # a view with an (item, k) the source lacks: the files are not aligned
    write_view(tmp_path / "bad.txt", ["not_in_source"] + items[1:], "enc2de", de)
    with pytest.raises(DataError, match=r"bad.txt has 1 caption\(s\) the source .*en.txt lacks, the first "
                                        r"not_in_source#…#0"):
        align_views({"source": files["source"], "translation": tmp_path / "bad.txt"})


def test_caption_ids_and_lines_are_checked_with_file_and_line():
    assert parse_cap_id("Ptf_2VRj-V0_000122_000132#enc2zh#0") == ("Ptf_2VRj-V0_000122_000132", "enc2zh", 0)
    assert parse_cap_id("v1#zh2enc#12") == ("v1", "zh2enc", 12)
    for bad, why in (("v1#enc", "not <item>#<tag>#<k>"), ("v1#ENC#0", "has tag 'ENC'"), ("v1#enc#x", "index 'x'")):
        with pytest.raises(ValueError, match=why):
            parse_cap_id(bad)


def test_bad_caption_files_name_file_and_line(tmp_path):
    cases = {"a v1#enc#0 text\n": "not <item>#<tag>#<k>",
             "v1#enc#0 one\nv1#enc#0 again\n": ":2: caption v1#enc#0 appears twice",
             "v1#enc#0 one\nv2#enc2de#0 two\n": ":2: tag 'enc2de' in a file of 'enc' captions",
             "v1#enc#0 \n": ":1: caption v1#enc#0 has no text"}
    for n, (text, why) in enumerate(cases.items()):
        p = tmp_path / f"{n}.txt"
        p.write_text(text, encoding="utf-8")
        with pytest.raises(DataError, match=why):
            read_captions(p)
    p = tmp_path / "latin.txt"
    p.write_bytes(b"v1#enc#0 caf\xe9\n")
    with pytest.raises(DataError, match="not UTF-8"):
        read_captions(p)


def test_bigfile_round_trip_and_disagreeing_files(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(7, 5)).astype(np.float32)
    ids = [f"img{i}" for i in range(7)]
    folder = write_bigfile(tmp_path / "f", ids, feats)
    got_ids, got = read_bigfile(folder)
    assert got_ids == ids and isinstance(got, np.memmap)
    np.testing.assert_array_equal(got, feats)
    (folder / "shape.txt").write_text("7 6\n")
    with pytest.raises(DataError, match=r"feature.bin has 140 bytes; shape.txt's 7×6 float32 needs 168"):
        read_bigfile(folder)
    (folder / "shape.txt").write_text("8 5\n")
    with pytest.raises(DataError, match="id.txt holds 7 ids but .*shape.txt says 8"):
        read_bigfile(folder)


def test_video2frames_is_parsed_never_executed_and_frames_must_exist(tmp_path):
    p = tmp_path / "video2frames.txt"
    p.write_text(repr({"v1": ["v1_1", "v1_2"], "v2": ["v2_1"]}))
    assert read_video2frames(p, {"v1_1", "v1_2", "v2_1"}) == {"v1": ["v1_1", "v1_2"], "v2": ["v2_1"]}
    with pytest.raises(DataError, match=r"frame 'v2_1' of 'v2' is not in the features' id.txt \(1 of its 1"):
        read_video2frames(p, {"v1_1", "v1_2"})
    marker = tmp_path / "executed"
    p.write_text(f"__import__('pathlib').Path({str(marker)!r}).touch() or {{}}")
    with pytest.raises(DataError, match="not a dict literal"):
        read_video2frames(p)
    assert not marker.exists()
    p.write_text("{'v1': 3}")
    with pytest.raises(DataError, match=r"expected \{item: \[frame id, ...\]\}"):
        read_video2frames(p)
