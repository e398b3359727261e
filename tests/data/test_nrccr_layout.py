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


def kit_image(item: str) -> Path | None:
    import json

    manifest = KIT.parents[2] / "index" / "images_manifest.jsonl"
    for line in manifest.read_text().splitlines():
        d = json.loads(line)
        if d["key"] == f"flickr30k:{item}":
            return KIT.parents[2] / d["file"]
    return None


def layout(tmp_path: Path, n: int = 12):
    """One split in NRCCR's layout from real Multi30K val captions: training views (en source, its
    "translation" and back-translation) and test views (native de, its English translation)."""
    items, en = kit_lines("en", n)
    _, de = kit_lines("de", n)
    text = tmp_path / "TextData"
    text.mkdir()
    train = {"source": write_view(text / "val_enc.txt", items, "enc", en),
             "translation": write_view(text / "val_enc2de.txt", items, "enc2de", de),
             "back_translation": write_view(text / "val_enc2de2enc.txt", items, "enc2de2enc", en, skip={4})}
    test = {"native": write_view(text / "val_de.txt", items, "de", de),
            "native_en": write_view(text / "val_de2enc.txt", items, "de2enc", en)}
    return items, en, de, train, test


def test_convert_nrccr_with_image_features_keeps_views_aligned_and_counts_what_it_skips(tmp_path):
    import pyarrow.parquet as pq

    from ccrk_ray.data.nrccr import convert_nrccr

    items, en, de, train, _ = layout(tmp_path)
    feats = np.random.default_rng(0).normal(size=(len(items), 6)).astype(np.float32)
    feats[7, 2] = np.nan                                              # a broken feature vector
    keep = [i for i in range(len(items)) if i != 9]                   # item 9 has no features
    write_bigfile(tmp_path / "FeatureData" / "resnet_152", [items[i] for i in keep], feats[keep])
    ids = tmp_path / "val_id.txt"
    ids.write_text("\n".join(items[:11]) + "\n")                      # the split leaves item 11 out
    summary = convert_nrccr(train, tmp_path / "out", language="de", split="train",
                            features=tmp_path / "FeatureData" / "resnet_152", ids=ids, rows_per_shard=4)
    table = pq.read_table(tmp_path / "out")
    expect = [i for i in range(11) if i not in (4, 7, 9)]
    assert table.column("image_id").to_pylist() == [items[i] for i in expect]
    assert table.column("text_source").to_pylist() == [[en[i]] for i in expect]
    assert table.column("text_translation").to_pylist() == [[de[i]] for i in expect]
    assert table.column("text_back_translation").to_pylist() == [[en[i]] for i in expect]
    assert table.column("caption_k").to_pylist() == [[0]] * len(expect)
    got = np.array(table.column("features").to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(got[:, 0, :], feats[expect])       # one row per image, exact
    assert summary["rows_written"] == len(expect) == summary["captions_written"]
    # item 4 lost its only caption (no back-translation), so it is an item without captions too
    assert summary["skipped"] == {"missing_view_caption": 1, "no_captions": 1, "bad_features": 1,
                                  "missing_features": 1, "not_in_split": 1}
    assert summary["skipped_examples"]["missing_view_caption"] == [f"{items[4]}#0"]
    assert len(summary["shards"]) == 2
    assert set(table.column("language").to_pylist()) == {"de"} and set(table.column("split").to_pylist()) == {"train"}


def test_convert_nrccr_with_frames_and_with_images(tmp_path):
    import pyarrow.parquet as pq

    from ccrk_ray.data.nrccr import convert_nrccr, even_frames

    items, en, de, _, test = layout(tmp_path)
    frames = {item: [f"{item}_{t}" for t in range(3 + i)] for i, item in enumerate(items)}
    frame_ids = [f for fs in frames.values() for f in fs]
    feats = np.arange(len(frame_ids) * 4, dtype=np.float32).reshape(-1, 4)
    write_bigfile(tmp_path / "frames", frame_ids, feats)
    (tmp_path / "video2frames.txt").write_text(repr({k: v for k, v in frames.items() if k != items[2]}))
    summary = convert_nrccr(test, tmp_path / "vid", language="de", split="test", features=tmp_path / "frames",
                            video2frames=tmp_path / "video2frames.txt", max_frames=5)
    table = pq.read_table(tmp_path / "vid")
    assert summary["skipped"] == {"missing_features": 1}
    row = {r["image_id"]: r for r in table.to_pylist()}
    row_of = {f: i for i, f in enumerate(frame_ids)}
    for item in (items[0], items[10]):
        picked = even_frames(frames[item], 5)
        assert len(row[item]["features"]) == min(5, len(frames[item]))
        np.testing.assert_array_equal(np.array(row[item]["features"]), feats[[row_of[f] for f in picked]])
    assert even_frames([str(i) for i in range(10)], 4) == ["0", "3", "6", "9"]
    assert row[items[0]]["text_native"] == [de[0]] and row[items[0]]["text_native_en"] == [en[0]]
    # images: the kit's real photos of four of these items; the others are counted
    folder = tmp_path / "images"
    folder.mkdir()
    real = [item for item in items if kit_image(item) is not None]
    for item in real:
        (folder / f"{item}.jpg").symlink_to(kit_image(item).resolve())
    (folder / f"{items[0]}.jpg").write_bytes(b"not a jpeg")
    summary = convert_nrccr(test, tmp_path / "img", language="de", split="test", images=folder)
    table = pq.read_table(tmp_path / "img")
    assert sorted(table.column("image_id").to_pylist()) == sorted(real) and len(real) == 4
    assert summary["skipped"] == {"missing_image": len(items) - 5, "corrupt_image": 1}
    assert table.column("image").to_pylist()[0][:2] == b"\xff\xd8"


def test_convert_nrccr_refuses_what_it_cannot_read(tmp_path):
    from ccrk_ray.core.config import ConfigError
    from ccrk_ray.data.nrccr import convert_nrccr

    items, en, de, train, test = layout(tmp_path)
    write_bigfile(tmp_path / "f", items, np.zeros((len(items), 2)))
    with pytest.raises(ConfigError, match="tagged 'enc2de', the translation view of language 'fr' is 'enc2fr'"):
        convert_nrccr(train, tmp_path / "o", language="fr", split="train", features=tmp_path / "f")
    with pytest.raises(ConfigError, match="views must be among"):
        convert_nrccr({"english": train["source"]}, tmp_path / "o", language="de", split="train",
                      features=tmp_path / "f")
    with pytest.raises(ConfigError, match="one of the two"):
        convert_nrccr(train, tmp_path / "o", language="de", split="train")
    # a view with a caption the key view lacks: the files are not aligned
    write_view(tmp_path / "extra.txt", items + ["999"], "enc2de", de + ["x"])
    with pytest.raises(DataError, match="not aligned by"):
        convert_nrccr({"source": train["source"], "translation": tmp_path / "extra.txt"}, tmp_path / "o",
                      language="de", split="train", features=tmp_path / "f")


def test_ccrk_convert_nrccr_as_a_user_runs_it(tmp_path):
    import pyarrow.parquet as pq

    from tests.commands import ccrk

    items, en, de, train, _ = layout(tmp_path)
    write_bigfile(tmp_path / "feat", items, np.ones((len(items), 3)))
    res = ccrk("convert", "nrccr", "--view", f"source={train['source']}", "--view",
               f"translation={train['translation']}", "--view", f"back_translation={train['back_translation']}",
               "--language", "de", "--split", "train", "--features", tmp_path / "feat", "--out", tmp_path / "out",
               timeout=120)
    assert f"convert nrccr: {len(items) - 1} items ({len(items) - 1} captions) written to 1 shard(s)" in res.stdout
    assert "missing_view_caption: 1, no_captions: 1" in res.stdout
    assert pq.read_table(tmp_path / "out").num_rows == len(items) - 1
    res = ccrk("convert", "nrccr", "--view", f"english={train['source']}", "--language", "de", "--split", "train",
               "--features", tmp_path / "feat", "--out", tmp_path / "o2", check=False, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"ccrk: error: --view english={train['source']}: unknown view (known: source, translation, "
        "back_translation, native, native_en)"]


def test_the_batch_transform_pads_frames_tokenises_each_view_and_skips_bad_rows(tiny_data):
    from ccrk_ray.data.nrccr import NRCCRBatchTransform
    from ccrk_ray.data.tokenizer import CaptionTokenizer
    from ccrk_ray.data.transforms import BadRowError

    tok = CaptionTokenizer(tiny_data["tokenizer"], 12)
    obj = lambda values: np.array(values + [None], dtype=object)[:-1]  # noqa: E731  (arrays of lists)
    batch = {"image_id": np.array(["a", "b", "c", "d", "e"], dtype=object),
             "features": obj([[[1.0, 2.0]] * 3, [[0.0, 1.0]] * 6, [[1.0, float("nan")]], [[1.0, 2.0, 3.0]],
                              [[5.0, 5.0]]]),
             "text_source": obj([["a red car", "a blue car"], ["a dog"], ["x"], ["y"], ["a cat", "two cats"]]),
             "text_translation": obj([["ein rotes auto", "ein blaues auto"], ["ein hund"], ["x"], ["y"], ["eine katze"]]),
             "text_back_translation": obj([["a red car", "a blue car"], ["a dog"], ["x"], ["y"], ["a cat", "a cat"]]),
             "_pos": np.arange(5), "_key": np.arange(5), "_epoch": np.zeros(5, dtype=np.int64),
             "_cycle": np.array([0, 0, 0, 0, 1])}
    t = NRCCRBatchTransform(tok, max_frames=4, feature_dim=2, on_bad_row="skip", caption_passes=2)
    out = t(batch)
    assert out["visual"].shape == (2, 4, 2) and out["visual"].dtype == np.float32
    np.testing.assert_array_equal(out["visual_mask"], [[1, 1, 1, 0], [1, 1, 1, 1]])   # b: 6 frames → 4
    np.testing.assert_array_equal(out["_pos"], [0, 1])
    assert t.skipped.as_dict() == {"bad_features": 2, "missing_view_caption": 1}
    # row a shows caption k in all three views alike (the views stay aligned)
    k = [tok(["a red car"])[0][0].tolist(), tok(["a blue car"])[0][0].tolist()].index(out["source_ids"][0].tolist())
    want = tok([["ein rotes auto", "ein blaues auto"][k]])[0][0]
    np.testing.assert_array_equal(out["translation_ids"][0], want)
    assert out["back_translation_ids"].shape == (2, 12) and out["source_mask"].shape == (2, 12)
    with pytest.raises(BadRowError, match="row 'c': field 'features' holds non-finite values"):
        NRCCRBatchTransform(tok, max_frames=4, feature_dim=2)(batch)
