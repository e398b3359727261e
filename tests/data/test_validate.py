import io
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ccrk_ray.data.validate import validate
from tests.conftest import upload_dir


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def write(path, ids, images, en, de):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image_id": ids, "image": images, "captions_en": en, "captions_de": de}), path)


def test_row_problems_name_file_row_id_and_field(tmp_path):
    good = jpeg()
    write(tmp_path / "d" / "part-00000.parquet", ["a", "b"], [good, good], [["x"], ["y"]], [["x"], ["y"]])
    write(tmp_path / "d" / "part-00001.parquet", ["c", "a", "e"], [good, good, b"junk"],
          [["x"], ["x"], ["ok"]], [[""], ["x"], []])
    result = validate(str(tmp_path / "d"), min_languages=2)
    assert (result.files, result.rows) == (2, 5) and not result.ok
    assert result.counts.as_dict() == {"empty_caption": 1, "missing_language": 1, "duplicate_id": 1,
                                       "corrupt_image": 1}
    text = [str(p) for p in result.problems]
    shard = str(tmp_path / "d" / "part-00001.parquet")
    assert f"{shard} row 0 (image_id 'c'): field 'captions_de': empty_caption" in text
    assert f"{shard} row 1 (image_id 'a'): field 'image_id': duplicate_id" in text
    assert f"{shard} row 2 (image_id 'e'): field 'image': corrupt_image" in text


def test_clean_data_and_s3(tmp_path, tiny_data, s3_server):
    assert validate(str(tiny_data["train"])).ok
    endpoint, bucket = s3_server
    upload_dir(endpoint, bucket, tiny_data["test"], "validate/test")
    result = validate(f"s3://{bucket}/validate/test", languages=["en", "zh"])
    assert result.ok and result.rows == 40


def test_cli_exit_codes_and_schema_errors(tmp_path, tiny_data):
    (tmp_path / "s").mkdir()
    pq.write_table(pa.table({"image_id": ["a"], "image": ["text, not bytes"], "captions_en": [["hi"]]}),
                   tmp_path / "s" / "part-00000.parquet")
    run = lambda *a: subprocess.run([sys.executable, "-m", "ccrk_ray", "validate", *a], capture_output=True,
                                    text=True, timeout=120)
    bad = run(str(tmp_path / "s"))
    assert bad.returncode == 1
    assert "part-00000.parquet: column 'image' has type string, expected binary" in bad.stdout
    assert run(str(tiny_data["test"])).returncode == 0 and "OK" in run(str(tiny_data["test"])).stdout
    missing = run(str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and missing.stderr.startswith("ccrk: error: no data at")
