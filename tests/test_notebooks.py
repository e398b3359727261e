"""The notebooks in notebooks/ executed headless (nbclient, a kernel on this venv's python) at tiny
size, and their outputs checked against the files they wrote and against numbers recomputed here.

Re-execute the notebooks at their own (default) parameters and save them with outputs:
``.venv/bin/python -m tests.test_notebooks``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import sys
import tempfile
import time
from html import escape as html_escape
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "ccrk-ray-venv"
LANGS = ["en", "de", "zh", "ja"]
TRAIN, TEST, EPOCHS, BATCH = 96, 40, 2, 16
from tests.conftest import RAY

pytestmark = RAY


# --- running a notebook -------------------------------------------------------------------------

def inject_parameters(nb, parameters: dict) -> None:
    """Papermill's convention without papermill: a cell tagged ``injected-parameters`` right after
    the cell tagged ``parameters`` assigns the overrides (as Python literals)."""
    import nbformat

    index = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if len(index) != 1:
        raise ValueError(f"a notebook needs exactly one cell tagged 'parameters', found {len(index)}")
    known = set()
    for line in nb.cells[index[0]].source.splitlines():
        name = line.split("=")[0].strip()
        if "=" in line and not line.startswith((" ", "#")):
            known.update(n.strip() for n in name.split(","))
    unknown = sorted(set(parameters) - known)
    if unknown:
        raise ValueError(f"not parameters of this notebook: {', '.join(unknown)}")
    cell = nbformat.v4.new_code_cell("# Injected parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in parameters.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index[0] + 1, cell)


def kernel_manager(spec_dir: Path):
    """A kernel on this interpreter (the venv's), whatever kernels Jupyter knows elsewhere."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    spec = spec_dir / KERNEL
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python (ccrk-ray venv)", "language": "python"}))
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_dir)]))


def run_notebook(path: Path, parameters: dict | None = None, timeout: int = 900):
    """Execute ``path`` (cwd = its folder) and return the executed notebook; a failing cell raises
    ``nbclient.exceptions.CellExecutionError`` with the cell's traceback."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    if parameters:
        inject_parameters(nb, parameters)
    env_keep = os.environ.pop("RAY_ADDRESS", None)      # the notebook starts its own local cluster
    try:
        with tempfile.TemporaryDirectory() as spec_dir:
            client = NotebookClient(nb, km=kernel_manager(Path(spec_dir)), timeout=timeout, startup_timeout=120,
                                    record_timing=True, resources={"metadata": {"path": str(path.parent)}})
            client.execute()
    finally:
        if env_keep is not None:
            os.environ["RAY_ADDRESS"] = env_keep
    return nb


def tagged(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def json_line(cell) -> dict:
    """The last stdout line of the cell that is a JSON object."""
    lines = [ln for ln in stream_text(cell).splitlines() if ln.startswith("{")]
    assert lines, f"no JSON line in the output of:\n{cell.source[:300]}"
    return json.loads(lines[-1])


def pngs(cell) -> list[tuple[int, int]]:
    """(width, height) of every PNG the cell displayed, each decoded with PIL."""
    from PIL import Image

    sizes = []
    for o in cell.outputs:
        data = o.get("data", {})
        if "image/png" in data:
            with Image.open(io.BytesIO(base64.b64decode(data["image/png"]))) as img:
                img.load()
                sizes.append(img.size)
    return sizes


def table_index(cell) -> list[str]:
    """Row labels of the DataFrame a cell displayed (its text/plain form: header line, then rows)."""
    results = [o for o in cell.outputs if o.output_type == "execute_result"]
    assert results, "the cell displayed no table"
    text = results[-1]["data"]["text/plain"]
    return [line.split()[0] for line in text.splitlines()[1:] if line.strip()]


# --- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("nb") / "quickstart"
    t0 = time.perf_counter()
    nb = run_notebook(NOTEBOOKS / "quickstart.ipynb", dict(
        OUT=str(out), LANGUAGES=LANGS, TRAIN_IMAGES=TRAIN, TEST_IMAGES=TEST, IMAGE_SIZE=32, MAX_LENGTH=24,
        VOCAB_SIZE=600, TEXT_WIDTH=32, TEXT_LAYERS=1, EMBED_DIM=32, EPOCHS=EPOCHS, BATCH_SIZE=BATCH,
        WORKERS=[1, 1], NUM_CPUS=4))
    print(f"quickstart.ipynb ran in {time.perf_counter() - t0:.0f} s")
    return nb, out


@pytest.fixture(scope="module")
def mrv(quickstart, tmp_path_factory):
    _, run = quickstart
    out = tmp_path_factory.mktemp("nb") / "mrv"
    t0 = time.perf_counter()
    nb = run_notebook(NOTEBOOKS / "mrv_analysis.ipynb", dict(RUN=str(run), OUT=str(out), DIRECTION="i2t",
                                                              NUM_CPUS=4, TOP=5))
    print(f"mrv_analysis.ipynb ran in {time.perf_counter() - t0:.0f} s")
    return nb, out, run



def html_table(cell) -> tuple[list[str], dict[str, list[str]]]:
    """(column labels, {row label: cell texts}) of the DataFrame a cell displayed last."""
    results = [o for o in cell.outputs if o.output_type == "execute_result" and "text/html" in o["data"]]
    assert results, "the cell displayed no table"
    html = results[-1]["data"]["text/html"]
    head = re.search(r"<thead>.*?<tr[^>]*>(.*?)</tr>", html, re.S).group(1)
    columns = re.findall(r"<th>(.*?)</th>", head)[1:]
    body = re.search(r"<tbody>(.*?)</tbody>", html, re.S).group(1)
    rows = {}
    for tr in re.findall(r"<tr>(.*?)</tr>", body, re.S):
        rows[re.search(r"<th>(.*?)</th>", tr).group(1)] = re.findall(r"<td>(.*?)</td>", tr, re.S)
    return columns, rows


def ranks_by_language(path: Path, direction: str) -> tuple[list[str], list[str], np.ndarray]:
    """(image ids sorted, languages in file order, N×K ranks) read with pyarrow alone."""
    table = pq.read_table(path).to_pydict()
    langs = list(dict.fromkeys(table["language"]))
    ids = sorted(set(table["image_id"]))
    out = np.full((len(ids), len(langs)), -1)
    row = {i: n for n, i in enumerate(ids)}
    for image_id, lang, rank in zip(table["image_id"], table["language"], table[f"{direction}_rank"]):
        out[row[image_id], langs.index(lang)] = rank
    assert (out >= 0).all()
    return ids, langs, out


# --- quickstart.ipynb -----------------------------------------------------------------------------

def test_quickstart_numbers_equal_the_report_it_wrote(quickstart):
    nb, out = quickstart
    summary = json_line(tagged(nb, "summary"))
    report = json.loads((out / "eval" / "report.json").read_text())
    assert summary["languages"] == LANGS == list(report["languages"])
    assert summary["num_images"] == TEST == report["num_images"]
    for direction in ("t2i", "i2t"):
        ids, langs, ranks = ranks_by_language(out / "eval" / "ranks.parquet", direction)
        assert langs == LANGS and len(ids) == TEST
        for j, lang in enumerate(LANGS):
            for k in (1, 5, 10):
                mine = 100.0 * float(np.mean(ranks[:, j] < k))
                assert summary["recall"][lang][direction][f"R@{k}"] == report["languages"][lang][direction][f"R@{k}"]
                assert report["languages"][lang][direction][f"R@{k}"] == pytest.approx(mine, abs=1e-9)
            assert report["languages"][lang][direction]["chance@10"] == pytest.approx(100.0 * 10 / TEST)
        mrv = float(np.mean(np.std(ranks.astype(float), axis=1)))
        assert summary["mrv"][direction] == pytest.approx(report["mrv"][direction], abs=1e-12)
        assert report["mrv"][direction] == pytest.approx(mrv, abs=1e-9)


def test_quickstart_table_shows_the_report_per_language(quickstart):
    nb, out = quickstart
    report = json.loads((out / "eval" / "report.json").read_text())
    columns, rows = html_table(tagged(nb, "results-table"))
    assert list(rows) == LANGS
    for lang, cells in rows.items():
        shown = dict(zip(columns, cells))
        for direction in ("t2i", "i2t"):
            for k in (1, 5, 10):
                assert float(shown[f"{direction} R@{k}"]) == pytest.approx(
                    report["languages"][lang][direction][f"R@{k}"], abs=0.051)
        assert float(shown["chance R@10"]) == pytest.approx(100.0 * 10 / TEST, abs=0.051)


def test_quickstart_trained_on_ray_and_plotted_its_losses(quickstart):
    nb, out = quickstart
    summary = json_line(tagged(nb, "summary"))
    result = json.loads((out / "pretrain" / "train_result.json").read_text())["metrics"]
    assert summary["train"]["epochs"] == EPOCHS == result["epoch"]
    assert summary["train"]["steps"] == EPOCHS * (TRAIN // BATCH) == result["step"]   # 1 worker, global batch BATCH
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "pretrain" / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("epoch/loss")]
    assert summary["train"]["epoch_loss"] == pytest.approx(losses, abs=1e-6) and len(losses) == EPOCHS
    assert result["loss"] == pytest.approx(losses[-1], rel=1e-5)
    assert len(pngs(tagged(nb, "loss-curve"))) == 1


def test_quickstart_made_the_data_and_showed_samples(quickstart):
    nb, out = quickstart
    for split, n in (("train", TRAIN), ("test", TEST)):
        table = pq.read_table(out / "data" / split)
        assert table.num_rows == n
        assert [c for c in table.column_names if c.startswith("captions_")] == [f"captions_{lang}" for lang in LANGS]
        assert "scene" in table.column_names
    (width, height), *rest = pngs(tagged(nb, "samples"))
    assert not rest and width > 2 * height > 0                  # one row of sample images
    columns, rows = html_table(tagged(nb, "samples"))
    assert list(rows) == LANGS
    test = pq.read_table(out / "data" / "test").to_pydict()
    assert columns == test["image_id"][:2]
    first = {lang: test[f"captions_{lang}"][0][0] for lang in LANGS}
    assert {lang: cells[0] for lang, cells in rows.items()} == {
        lang: html_escape(text, quote=False) for lang, text in first.items()}
    preprocess = json.loads((out / "pretrain" / "model" / "preprocess.json").read_text())
    assert preprocess == {"image_size": 32, "max_length": 24, "languages": LANGS, "pre_caption": None}


def test_quickstart_displayed_the_evaluation_plots(quickstart):
    nb, out = quickstart
    report = json.loads((out / "eval" / "report.json").read_text())
    names = sorted(report["outputs"]["plots"])
    assert names == ["rank_correlation.png", "rank_spread_hist.png", "recall_per_language.png"]
    cell = tagged(nb, "plots")
    assert stream_text(cell).split() == report["outputs"]["plots"]
    from PIL import Image

    shown = pngs(cell)
    assert len(shown) == 3
    for name, size in zip(report["outputs"]["plots"], shown):
        with Image.open(out / "eval" / name) as img:
            assert img.size == size and min(size) > 200          # the file on disk, displayed as is
    assert json_line(tagged(nb, "summary"))["plots"] == report["outputs"]["plots"]


def test_quickstart_refuses_an_out_dir_it_did_not_write(tmp_path):
    from nbclient.exceptions import CellExecutionError

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CellExecutionError, match="holds files this notebook did not write"):
        run_notebook(NOTEBOOKS / "quickstart.ipynb", dict(OUT=str(tmp_path)), timeout=120)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="not parameters of this notebook: EPOCH"):
        inject_parameters(__import__("nbformat").read(NOTEBOOKS / "quickstart.ipynb", as_version=4), {"EPOCH": 1})


# --- mrv_analysis.ipynb ---------------------------------------------------------------------------

def test_mrv_numbers_equal_the_rank_file_and_report(mrv):
    nb, out, _ = mrv
    summary = json_line(tagged(nb, "summary"))
    report = json.loads((out / "eval" / "report.json").read_text())
    ids, langs, ranks = ranks_by_language(out / "eval" / "ranks.parquet", "i2t")
    assert summary["direction"] == "i2t" and summary["languages"] == langs == LANGS
    assert summary["num_images"] == TEST == len(ids)
    spread = np.std(ranks.astype(float), axis=1)
    assert summary["mrv"] == pytest.approx(float(spread.mean()), abs=1e-9)
    assert summary["mrv"] == pytest.approx(report["mrv"]["i2t"], abs=1e-9) and summary["mrv_report"] == report["mrv"]["i2t"]
    assert summary["mrv"] > 0
    assert summary["agree_share"] == pytest.approx(float(np.mean(spread == 0)))
    assert summary["correlation"] == report["language_rank_correlation"]["i2t"]
    deviation = np.abs(ranks - np.median(ranks, axis=1, keepdims=True)).mean(axis=0)
    for j, lang in enumerate(LANGS):
        assert summary["per_language"][lang]["abs_dev"] == pytest.approx(float(deviation[j]), abs=1e-9)
    assert sum(v["odd_one_out"] for v in summary["per_language"].values()) == pytest.approx(1.0)
    columns, rows = html_table(tagged(nb, "per-language"))
    assert sorted(rows) == sorted(LANGS) and "odd one out" in columns


def test_mrv_worst_instances_with_their_captions(mrv):
    nb, out, run = mrv
    summary = json_line(tagged(nb, "summary"))
    ids, _, ranks = ranks_by_language(out / "eval" / "ranks.parquet", "i2t")
    spread = np.std(ranks.astype(float), axis=1)
    expected = sorted(range(len(ids)), key=lambda n: (-spread[n], ids[n]))[:5]
    worst = summary["worst"]
    assert [w["image_id"] for w in worst] == [ids[n] for n in expected]
    test = pq.read_table(run / "data" / "test").to_pydict()
    where = {i: n for n, i in enumerate(test["image_id"])}
    from ccrk_ray.data.synthetic import OPTIONAL_ATTRIBUTES, Scene, caption

    for w, n in zip(worst, expected):
        assert w["spread"] == pytest.approx(float(spread[n]))
        assert w["ranks"] == {lang: int(ranks[n, j]) for j, lang in enumerate(LANGS)}
        row = where[w["image_id"]]
        assert w["captions"] == {lang: test[f"captions_{lang}"][row][0] for lang in LANGS}
        scene = Scene.from_json(test["scene"][row])
        for lang in LANGS:     # the details the notebook says a caption left out regenerate that caption
            mention = set(OPTIONAL_ATTRIBUTES) - set(w["left_out"][lang])
            assert caption(scene, lang, mention) == w["captions"][lang]
    _, rows = html_table(tagged(nb, "worst-table"))
    assert list(rows) == [w["image_id"] for w in worst]
    assert len(pngs(tagged(nb, "worst-captions"))) == 1


def test_mrv_caption_details_and_scene_attributes(mrv):
    nb, out, run = mrv
    summary = json_line(tagged(nb, "summary"))
    from itertools import combinations

    from ccrk_ray.data.synthetic import ATTRIBUTES, OPTIONAL_ATTRIBUTES, Scene, caption

    assert summary["captions"] == summary["mentions_matched"] == TEST * len(LANGS)
    test = pq.read_table(run / "data" / "test").to_pydict()
    ids, _, ranks = ranks_by_language(out / "eval" / "ranks.parquet", "i2t")
    where = {i: n for n, i in enumerate(test["image_id"])}
    subsets = [set(c) for k in range(4) for c in combinations(OPTIONAL_ATTRIBUTES, k)]
    left_out = {a: np.zeros(ranks.shape, dtype=bool) for a in OPTIONAL_ATTRIBUTES}
    for n, image_id in enumerate(ids):
        scene = Scene.from_json(test["scene"][where[image_id]])
        for j, lang in enumerate(LANGS):
            text = test[f"captions_{lang}"][where[image_id]][0]
            (mention,) = [m for m in subsets if caption(scene, lang, m) == text]
            for a in OPTIONAL_ATTRIBUTES:
                left_out[a][n, j] = a not in mention
    for a in OPTIONAL_ATTRIBUTES:
        rate = float(left_out[a].mean())
        assert summary["omit_rate"][a] == pytest.approx(rate)
        assert 0.05 < rate < 0.4                      # generated with omit_prob 0.2
        assert summary["rank_by_omitted"][a]["mentioned"] == pytest.approx(float(ranks[~left_out[a]].mean() + 1))
        assert summary["rank_by_omitted"][a]["omitted"] == pytest.approx(float(ranks[left_out[a]].mean() + 1))
    scenes = [json.loads(s) for s in test["scene"]]
    assert summary["attribute_values"] == {a: sorted({str(s[a]) for s in scenes}) for a in ATTRIBUTES}
    for tag in ("spread", "correlation", "caption-detail", "attributes"):
        assert len(pngs(tagged(nb, tag))) == 1, tag


def test_mrv_notebook_shut_ray_down(mrv):
    nb, _, _ = mrv
    assert stream_text(tagged(nb, "shutdown")).strip() == "Ray running: False"


def cell_seconds(nb) -> list[tuple[float, str]]:
    """(seconds, first source line) of every executed code cell (nbclient's timing metadata)."""
    from datetime import datetime

    out = []
    for c in nb.cells:
        ex = c.metadata.get("execution", {})
        if "shell.execute_reply" in ex and "iopub.execute_input" in ex:
            dt = (datetime.fromisoformat(ex["shell.execute_reply"].replace("Z", "+00:00"))
                  - datetime.fromisoformat(ex["iopub.execute_input"].replace("Z", "+00:00"))).total_seconds()
            out.append((dt, c.source.splitlines()[0] if c.source else ""))
    return out


def save_with_outputs(names: list[str]) -> None:
    """Execute notebooks at their own parameters and write them back with their outputs (timing
    metadata dropped, so a re-run changes only what the run changed)."""
    import nbformat

    for name in names:
        path = NOTEBOOKS / f"{name}.ipynb"
        original = nbformat.read(path, as_version=4)
        t0 = time.perf_counter()
        nb = run_notebook(path)
        for cell in nb.cells:
            cell.metadata.pop("execution", None)
        nb.metadata = original.metadata
        nbformat.write(nb, path)
        print(f"{path.relative_to(ROOT)}: {time.perf_counter() - t0:.0f} s, {path.stat().st_size / 1e6:.2f} MB", flush=True)


if __name__ == "__main__":
    save_with_outputs(sys.argv[1:] or ["quickstart", "mrv_analysis"])
