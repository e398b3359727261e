"""The Ray Data path on real Ray: local vs s3:// (a real S3 server on 127.0.0.1), bad rows skipped
and counted, schema problems named before training."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ccrk_ray.data import schema
from ccrk_ray.data.ingest import check_dataset, one_to_k_dataset
from ccrk_ray.data.stats import stats_actor
from ccrk_ray.core.storage import count_rows
from ccrk_ray.data.transforms import ImageTransform
from ccrk_ray.core.languages import CCRK_LANGUAGES
from ccrk_ray.data.tokenizer import CaptionTokenizer
from tests.conftest import RAY, upload_dir

pytestmark = RAY


def collect(ds):
    rows = {}
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, image_id in enumerate(b["image_id"]):
            rows[image_id] = (b["pixel_values"][i], b["input_ids"][i])
    return rows


def test_s3_and_local_give_the_same_rows(ray_local, s3_server, tiny_data):
    endpoint, bucket = s3_server
    upload_dir(endpoint, bucket, tiny_data["train"], "shards/train")
    uri = f"s3://{bucket}/shards/train"
    assert count_rows(uri) == count_rows(str(tiny_data["train"])) == 96
    assert check_dataset(uri, CCRK_LANGUAGES).rows == 96
    kwargs = dict(languages=CCRK_LANGUAGES, k=10, tokenizer=CaptionTokenizer(tiny_data["tokenizer"], 24),
                  image_transform=ImageTransform(64, train=False), shuffle_files=False)
    remote = collect(one_to_k_dataset(uri, **kwargs))
    local = collect(one_to_k_dataset(str(tiny_data["train"]), **kwargs))
    assert sorted(remote) == sorted(local) and len(local) == 96
    for image_id, (pixels, ids) in local.items():
        np.testing.assert_array_equal(remote[image_id][0], pixels)
        np.testing.assert_array_equal(remote[image_id][1], ids)


def jpeg_bytes(colour=(200, 30, 30), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format=fmt)
    return buf.getvalue()


def test_bad_rows_are_skipped_and_counted_by_reason(ray_local, tmp_path, tiny_data):
    langs = ("en", "de")
    good = jpeg_bytes()
    rows = [  # (id, image, en, de)
        ("good-1", good, ["a red square"], ["ein rotes Quadrat"]),
        ("corrupt", b"\x00\x01not an image", ["x"], ["y"]),
        ("truncated", good[: len(good) // 2], ["x"], ["y"]),
        ("gif", jpeg_bytes(fmt="GIF"), ["x"], ["y"]),
        ("empty-caption", good, ["   "], ["y"]),
        ("missing-de", good, ["x"], []),
        ("missing-de-null", good, ["x"], None),
        ("good-2", jpeg_bytes((0, 0, 255)), ["a blue square"], ["ein blaues Quadrat"]),
        ("empty-image", b"", ["x"], ["y"]),
    ]
    table = pa.table({"image_id": [r[0] for r in rows], "image": [r[1] for r in rows],
                      "captions_en": [r[2] for r in rows], "captions_de": [r[3] for r in rows]},
                     schema=schema.arrow_schema(langs).remove(4).remove(4))
    (tmp_path / "bad").mkdir()
    pq.write_table(table, tmp_path / "bad" / "part-00000.parquet")
    actor = stats_actor(create=True)
    before = ray_local.get(actor.snapshot.remote())
    ds = one_to_k_dataset(str(tmp_path / "bad"), languages=langs, k=2,
                          tokenizer=CaptionTokenizer(tiny_data["tokenizer"], 16),
                          image_transform=ImageTransform(32, train=False), shuffle_files=False)
    got = collect(ds)
    assert sorted(got) == ["good-1", "good-2"]
    import time

    deadline = time.time() + 120    # the data actor reports asynchronously (a guard: it breaks as soon as they arrive)
    while time.time() < deadline:
        snap = ray_local.get(actor.snapshot.remote())
        if snap["rows_read"] - before["rows_read"] >= len(rows):
            break
        time.sleep(0.2)
    delta = {k: v - before["skipped"].get(k, 0) for k, v in snap["skipped"].items()}
    assert snap["rows_read"] - before["rows_read"] == len(rows)
    assert {k: v for k, v in delta.items() if v} == {"corrupt_image": 3, "unsupported_image_format": 1,
                                                     "empty_caption": 1, "missing_language": 2}
    assert set(snap["examples"]["corrupt_image"]) >= {"corrupt", "truncated", "empty-image"}


def test_raise_policy_names_the_row_and_field(ray_local, tmp_path, tiny_data):
    langs = ("en",)
    table = pa.table({"image_id": ["ok", "broken"], "image": [jpeg_bytes(), b"garbage"],
                      "captions_en": [["a"], ["b"]]})
    (tmp_path / "r").mkdir()
    pq.write_table(table, tmp_path / "r" / "part-00000.parquet")
    ds = one_to_k_dataset(str(tmp_path / "r"), languages=langs, k=1, on_bad_row="raise",
                          tokenizer=CaptionTokenizer(tiny_data["tokenizer"], 16),
                          image_transform=ImageTransform(32, train=False), shuffle_files=False)
    with pytest.raises(Exception, match=r"row 'broken': field 'image' is not a decodable image"):
        collect(ds)


def test_schema_problems_are_named_before_training(tmp_path, tiny_data):
    (tmp_path / "s").mkdir()
    pq.write_table(pa.table({"image_id": ["a"], "image": [b"x"], "captions_en": [["hi"]]}),
                   tmp_path / "s" / "part-00000.parquet")
    pq.write_table(pa.table({"image_id": ["b"], "image": ["not binary"], "captions_en": [["hi"]]}),
                   tmp_path / "s" / "part-00001.parquet")
    with pytest.raises(schema.SchemaError, match=r"part-00001.parquet: column 'image' has type string"):
        check_dataset(str(tmp_path / "s"), ["en"])
    with pytest.raises(schema.SchemaError, match=r"part-00000.parquet: missing column 'captions_de'"):
        check_dataset(str(tmp_path / "s"), ["en", "de"])
    with pytest.raises(FileNotFoundError, match="no data at"):
        check_dataset(str(tmp_path / "nowhere"), ["en"])


def test_unreadable_files_are_reported_and_left_out_or_raise(tmp_path, tiny_data):
    import shutil

    d = tmp_path / "u"
    shutil.copytree(tiny_data["test"], d)
    (d / "part-00009.parquet").write_bytes(b"PAR1 this is not parquet")
    check = check_dataset(str(d), ["en"])
    assert check.rows == 40 and len(check.files) == 1
    assert [f.endswith("part-00009.parquet") for f, _ in check.unreadable] == [True]
    with pytest.raises(schema.SchemaError, match="part-00009.parquet: unreadable parquet file"):
        check_dataset(str(d), ["en"], on_bad_file="raise")
