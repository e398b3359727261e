"""Bad input to the command line: one line on stderr naming the problem, exit code 2, no traceback."""

import subprocess
import sys

import pytest

from ccrk_ray.cli import main


def ccrk(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ccrk_ray", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


@pytest.mark.parametrize("args,needle", [
    (["--languages", "en,xx"], "unknown language code(s) 'xx'"),
    (["--languages", "en,en"], "more than once: en"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    (["--omit-prob", "1.5"], "--omit-prob must be in [0.0, 1.0], got 1.5"),
    (["--workers", "2,1"], "--workers must be MIN,MAX with 1 <= MIN <= MAX, got 2,1"),
    (["--workers", "a,b"], "expected MIN,MAX or N (integers)"),
    (["--captions-per-image", "11"], "--captions-per-image must be in [1, 10], got 11"),
    (["--train-images", "10"], "--train-images 10 is less than one batch per worker"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--precision", "fp8"], "--precision must be one of fp32, amp_bf16, bf16, amp, amp_fp16, fp16, got 'fp8'"),
    (["--vision-kwargs", "[1]"], "expected a JSON object"),
    (["--vision-model", "resnet_nonesuch"], "--vision-model 'resnet_nonesuch' is not a timm model"),
    (["--vision-kwargs", "{oops"], "not valid JSON"),
])
def test_bad_flags(tmp_path, capsys, args, needle):
    """In-process: the same ``main`` the console script runs (``test_bad_flag_as_a_user_sees_it``
    runs one case as a subprocess)."""
    assert main(["demo", "--out", str(tmp_path / "out"), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_bad_flag_as_a_user_sees_it(tmp_path):
    res = ccrk("demo", "--out", str(tmp_path / "out"), "--epochs", "0")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == ["ccrk: error: --epochs must be >= 1, got 0"]
    assert not (tmp_path / "out").exists()


def test_output_directory_with_unrelated_files_is_refused(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    res = ccrk("demo", "--out", str(tmp_path))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"ccrk: error: output directory {tmp_path} is not empty and not a ccrk demo output (holds thesis.tex)"]
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_a_file_as_output_directory_and_a_missing_command(tmp_path):
    (tmp_path / "f").write_text("x")
    res = ccrk("demo", "--out", str(tmp_path / "f"))
    assert res.returncode == 2 and "exists and is not a directory" in res.stderr
    res = ccrk()
    assert res.returncode == 2 and "required" in res.stderr and "Traceback" not in res.stderr


def test_help_lists_the_demo():
    res = ccrk("--help")
    assert res.returncode == 0 and "demo" in res.stdout


def test_evaluate_bad_checkpoint_is_one_line(tmp_path):
    res = ccrk("evaluate", "--checkpoint", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "o"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"ccrk: error: --model {tmp_path} is not a saved model "
                                               "or a training checkpoint (no config.json)"]


def test_evaluate_bad_actor_count_is_one_line(tmp_path):
    res = ccrk("evaluate", "--checkpoint", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
               "--actors", "0")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["ccrk: error: --actors must be >= 1, got 0"]


def test_mrv_over_rank_files_of_two_runs(tmp_path):
    import json

    import numpy as np

    from ccrk_ray.eval.ranks import RankSet, save_ranks
    from ccrk_ray.metrics import mean_rank_variance

    rng = np.random.default_rng(0)
    ids = [f"i{n}" for n in range(12)]
    a_t2i, a_i2t = rng.integers(0, 12, (12, 2)), rng.integers(0, 12, (12, 2))
    b_t2i, b_i2t = rng.integers(0, 12, (12, 1)), rng.integers(0, 12, (12, 1))
    save_ranks(tmp_path / "a.parquet", ids, RankSet.from_matrices(a_t2i, a_i2t, ["en", "de"]))
    save_ranks(tmp_path / "b.parquet", ids, RankSet.from_matrices(b_t2i, b_i2t, ["fr"]))
    res = ccrk("mrv", f"{tmp_path}/a.parquet:de", f"{tmp_path}/b.parquet", "--out", str(tmp_path / "mrv.json"))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["languages"] == ["de", "fr"] and out["num_images"] == 12
    expected = mean_rank_variance(np.concatenate([a_t2i[:, 1:], b_t2i], axis=1))
    assert out["mrv"]["t2i"] == expected
    assert json.loads((tmp_path / "mrv.json").read_text()) == out
    res = ccrk("mrv", str(tmp_path / "a.parquet"), str(tmp_path / "missing.parquet"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"ccrk: error: rank file {tmp_path}/missing.parquet does not exist"]


def test_convert_then_validate_as_a_user_runs_them(tmp_path):
    """``ccrk convert`` (CCRK JSON lines with base64 images) and ``ccrk validate`` of its output, as
    subprocesses: exit 0, every row written and checked."""
    import base64
    import io
    import json

    from PIL import Image

    def jpeg(seed: int) -> str:
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (seed * 40 % 256, 90, 200)).save(buf, format="JPEG")
        return base64.b64encode(buf.getvalue()).decode()

    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps({"image_id": f"img{i}", "image": jpeg(i),
                                       "caption": {"en": f"picture {i}", "de": f"Bild {i}"}}) + "\n"
                           for i in range(6)))
    res = ccrk("convert", "ccrk", "--input", str(src), "--languages", "en,de", "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    assert "6 rows" in res.stdout, res.stdout
    res = ccrk("validate", str(tmp_path / "out"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "6 rows checked" in res.stdout and res.stdout.strip().endswith("OK")
