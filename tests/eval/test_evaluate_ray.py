"""``ccrk evaluate`` end to end on a tiny saved model (with an ITM head) and the tiny test split:
ranks from the eval actors equal the in-process computation, and every output is written."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import RAY, tiny_text_config

pytestmark = RAY

LANGS = ["en", "de", "ja"]


@pytest.fixture(scope="module")
def saved_model(tiny_data, tmp_path_factory):
    import torch

    from ccrk_ray.model import CCRKModel, ModelConfig
    from ccrk_ray.data.tokenizer import CaptionTokenizer

    tok = CaptionTokenizer(tiny_data["tokenizer"], 16)
    text = dict(tiny_text_config(tok.vocab_size, max_length=16), num_hidden_layers=2)
    torch.manual_seed(0)
    model = CCRKModel(ModelConfig(vision_name="resnet10t", text_config=text, text_pretrained=False, fusion_layers=1,
                                  embed_dim=16))
    out = tmp_path_factory.mktemp("model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "preprocess.json").write_text(json.dumps({"image_size": 32, "max_length": 16, "languages": LANGS}))
    return out


def test_evaluate_itc_on_actors_writes_every_output(saved_model, tiny_data, tmp_path, ray_local):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ccrk_ray.data.transforms import load_split
    from ccrk_ray.eval.ranks import load_ranks
    from ccrk_ray.eval.report import clip_benchmark_filename, report_from_ranks
    from ccrk_ray.eval.retrieval import encode_split, rank_sharded
    from ccrk_ray.metrics import mean_rank_variance
    from ccrk_ray.eval.evaluate import run_evaluate
    from ccrk_ray.model import CCRKModel
    from ccrk_ray.data.tokenizer import CaptionTokenizer

    out = tmp_path / "eval"
    report = run_evaluate(str(saved_model), str(tiny_data["test"]), str(out), actors=2, k_test=5, itc_only=True,
                          tensorboard=str(tmp_path / "tb"), save_ranks=True, dataset_name="tiny")
    assert report["num_images"] == 40 and list(report["languages"]) == LANGS and report["k_test"] is None
    # the same numbers as ranking the in-process embeddings in one process (the same tie policy)
    batch = load_split(str(tiny_data["test"]), LANGS, CaptionTokenizer(saved_model, 16), 32)
    feats = encode_split(CCRKModel.from_pretrained(saved_model), batch)
    dense = report_from_ranks(rank_sharded(feats["image_emb"], feats["captions"]))
    assert report["languages"] == dense["languages"] and report["mrv"] == dense["mrv"]
    assert report["mrv"]["t2i"] > 0                               # an untrained model: languages disagree
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["languages"] == report["languages"]
    assert len(on_disk["language_rank_correlation"]["t2i"]) == 3
    assert sorted(on_disk["outputs"]["plots"]) == ["rank_correlation.png", "rank_spread_hist.png",
                                                   "recall_per_language.png"]
    for name in on_disk["outputs"]["plots"]:
        with Image.open(out / name) as im:
            assert im.format == "PNG"
    assert "![recall_per_language](recall_per_language.png)" in (out / "report.md").read_text()
    results = {p.name: json.loads(p.read_text()) for p in (out / "clip_benchmark").iterdir()}
    assert sorted(r["language"] for r in results.values()) == sorted(LANGS)
    assert all(name == clip_benchmark_filename(r) and name.startswith("tiny_") for name, r in results.items())
    (de,) = [r for r in results.values() if r["language"] == "de"]
    assert de["metrics"]["text_retrieval_recall@5"] == pytest.approx(report["languages"]["de"]["i2t"]["R@5"] / 100)
    assert de["model"] == "ccrk-resnet10t" and de["task"] == "zeroshot_retrieval" and de["pretrained"] == str(saved_model)
    assert de["metrics"]["image_retrieval_MRV"] == report["mrv"]["t2i"] and report["language_aliases"] == {}
    ids, langs, t2i, i2t = load_ranks(out / "ranks.parquet")
    assert langs == LANGS and list(ids) == sorted(batch["image_id"])
    assert mean_rank_variance(t2i) == pytest.approx(report["mrv"]["t2i"])
    assert mean_rank_variance(i2t) == pytest.approx(report["mrv"]["i2t"])
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    assert acc.Scalars("eval/ja/i2t_R@10")[0].value == pytest.approx(report["languages"]["ja"]["i2t"]["R@10"])
    assert "eval/rank_correlation" in acc.Tags()["images"]


def test_evaluate_two_stage_on_actors_equals_in_process(saved_model, tiny_data, tmp_path, ray_local):
    from ccrk_ray.data.transforms import load_split
    from ccrk_ray.eval.report import report_from_ranks
    from ccrk_ray.eval.retrieval import evaluate_in_process
    from ccrk_ray.eval.evaluate import run_evaluate
    from ccrk_ray.model import CCRKModel
    from ccrk_ray.data.tokenizer import CaptionTokenizer

    report = run_evaluate(str(saved_model), str(tiny_data["test"]), str(tmp_path / "two"), actors=2, k_test=8)
    batch = load_split(str(tiny_data["test"]), LANGS, CaptionTokenizer(saved_model, 16), 32)
    model = CCRKModel.from_pretrained(saved_model)
    ref = report_from_ranks(evaluate_in_process(model, batch, k_test=8))
    itc = report_from_ranks(evaluate_in_process(model, batch, k_test=None))
    assert report["k_test"] == 8 and report["actors"] == 2
    assert report["languages"] == ref["languages"] and report["mrv"] == ref["mrv"]
    assert report["languages"] != itc["languages"]                 # the ITM stage re-ranked
    with pytest.raises(ValueError, match="--actors must be >= 1, got 0"):
        run_evaluate(str(saved_model), str(tiny_data["test"]), str(tmp_path / "x"), actors=0)
    assert np.isfinite(report["mrv"]["i2t"])


def test_rows_are_decoded_inside_the_embedders_or_ahead_of_them_alike_and_bad_rows_are_counted(
        saved_model, tiny_data, tmp_path, ray_local):
    """On CPUs each embedding actor decodes its own rows; on GPUs a CPU actor ahead of them does.
    Both give the same embeddings of the same rows. A batch whose rows are all bad (the first 4,
    at 4 rows a batch) is an empty batch to the embedder; the bad rows are left out and counted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ccrk_ray.data.ingest import CountingEvalTransform, eval_rows
    from ccrk_ray.data.tokenizer import CaptionTokenizer
    from ccrk_ray.data.transforms import ImageTransform, caption_slots
    from ccrk_ray.eval.actors import embed_dataset
    from ccrk_ray.eval.evaluate import run_evaluate

    table = pq.read_table(tiny_data["test"])
    bad = [0, 1, 2, 3, 17]
    images = table.column("image").to_pylist()
    for i in bad:
        images[i] = b"not an image"
    (tmp_path / "bad").mkdir()
    data = tmp_path / "bad" / "part-0.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary())), data)
    ids = table.column("image_id").to_pylist()

    transform = CountingEvalTransform(tokenizer=CaptionTokenizer(saved_model, 16), languages=tuple(LANGS),
                                      slots=caption_slots(str(data), LANGS)[0], on_bad_row="skip",
                                      image_transform=ImageTransform(32, train=False))
    inside, ahead = (embed_dataset(eval_rows(str(data), languages=LANGS), saved_model, LANGS, transform=transform,
                                   batch_size=4, transform_actor=where) for where in (False, True))
    assert list(inside[0]) == list(ahead[0]) == sorted(i for n, i in enumerate(ids) if n not in bad)
    np.testing.assert_allclose(inside[1], ahead[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inside[2].emb, ahead[2].emb, rtol=1e-5, atol=1e-6)
    assert list(inside[2].owner) == list(ahead[2].owner) and len(inside[2].owner) > 0
    report = run_evaluate(str(saved_model), str(data), str(tmp_path / "e"), actors=1, itc_only=True, batch_size=4)
    assert report["rows"] == 40 and report["rows_not_evaluated"] == len(bad) and report["num_images"] == 35


def test_ccrk_evaluate_with_its_default_flags_finishes_on_its_own_cluster(saved_model, tiny_data, tmp_path):
    """As a user runs it: its own local cluster on this machine's CPUs, one embedding actor and
    one ranking actor, two-stage by default for a model with an ITM head. This command once hung
    forever: its two actor pools held every CPU of the cluster it started, and Ray Data's file
    listing never ran. ``--folds`` (COCO's 1K protocol) adds no actor: the folds are ranked on
    the same one."""
    from ccrk_ray.data.tokenizer import CaptionTokenizer
    from ccrk_ray.data.transforms import load_split
    from ccrk_ray.eval.report import report_from_ranks
    from ccrk_ray.eval.retrieval import evaluate_in_process
    from ccrk_ray.model import CCRKModel
    from tests.commands import ccrk, noise

    res = ccrk("evaluate", "--checkpoint", saved_model, "--data", tiny_data["test"], "--out", tmp_path / "e",
               "--folds", 4, timeout=300)
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["num_images"] == 40 and report["k_test"] == 128 and list(report["languages"]) == LANGS
    # and the four folds of the split, each a 10-image gallery of its own, on the same eval actors
    folds = report["folds"]
    assert folds["count"] == 4 and folds["sizes"] == [10] * 4 and folds["num_images"] == 40
    assert all(folds["languages"][lang]["t2i"]["chance@1"] == pytest.approx(10.0) for lang in LANGS)
    # two-stage at the paper's depth, capped at each language's gallery: what one process computes
    batch = load_split(str(tiny_data["test"]), LANGS, CaptionTokenizer(saved_model, 16), 32)
    model = CCRKModel.from_pretrained(saved_model)
    assert report["languages"] == report_from_ranks(evaluate_in_process(model, batch, k_test=40))["languages"]
    assert noise(res) == [], "\n".join(noise(res))
    assert res.stdout.strip().splitlines()[-1].startswith("MRV")


def test_any_language_code_is_evaluated_and_clip_benchmarks_jp_means_ja(saved_model, tiny_data, tmp_path):
    """Checked before any cluster starts: 'jp' reads the ja captions, 'ko' is a code like any other
    (the split has no ko captions: named as missing, not as an unknown code)."""
    from ccrk_ray.core.config import ConfigError
    from ccrk_ray.core.languages import canonical_languages
    from ccrk_ray.eval.evaluate import run_evaluate

    assert canonical_languages(["jp", "en", "jpn_Jpan"]) == (("ja", "en", "jpn_Jpan"), {"jp": "ja"})
    with pytest.raises(ConfigError, match=r"has no caption column for ko \(it has"):
        run_evaluate(str(saved_model), str(tiny_data["test"]), str(tmp_path / "e"), languages=["jp", "ko"])
    with pytest.raises(ConfigError, match="not a language code"):
        run_evaluate(str(saved_model), str(tiny_data["test"]), str(tmp_path / "e"), languages=["j p"])


KIT = Path(__file__).resolve().parents[2].parent / "shared" / "data"
IGLUE = KIT / "iglue" / "datasets"


def kit_split(tmp_path: Path, n: int = 48) -> tuple[Path, dict[str, dict[str, list[str]]]]:
    """The first ``n`` Flickr30K test images of the real IGLUE files: 5 English captions each
    (flickr30k test_ann), German from xFlickr&CO for all, Japanese for every other image only;
    stand-in JPEGs. Returns the converted split and {lang: {image id: captions}} read directly."""
    from PIL import Image

    from ccrk_ray.data.converters import convert_iglue

    if not KIT.is_dir():
        pytest.skip(f"real data kit {KIT} not found (it sits next to the repository in CI)")

    def lines(path):
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    en = lines(IGLUE / "flickr30k" / "annotations" / "test_ann.jsonl")[:n]
    ids = [str(r["id"]) for r in en]
    by_id = {lang: {str(r["id"]): r for r in lines(IGLUE / "xFlickrCO" / "annotations" / lang / "test.jsonl")}
             for lang in ("de", "ja")}
    records = {"en": en, "de": [by_id["de"][i] for i in ids], "ja": [by_id["ja"][i] for i in ids[::2]]}
    ann = {}
    for lang, recs in records.items():
        ann[lang] = tmp_path / f"{lang}.jsonl"
        ann[lang].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in ids:
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images / f"{i}.jpg")
    convert_iglue(ann, images, tmp_path / "split")
    return tmp_path / "split", {lang: {str(r["id"]): r["sentences"] for r in recs} for lang, recs in records.items()}


def test_every_caption_of_real_multi_caption_files_is_a_query(saved_model, tmp_path, ray_local):
    from ccrk_ray.data.tokenizer import CaptionTokenizer
    from ccrk_ray.data.transforms import caption_slots, load_split
    from ccrk_ray.eval.evaluate import run_evaluate
    from ccrk_ray.eval.report import report_from_ranks
    from ccrk_ray.eval.retrieval import encode_split, evaluate_in_process
    from ccrk_ray.metrics import retrieval_metrics
    from ccrk_ray.model import CCRKModel

    data, expected = kit_split(tmp_path)
    assert {len(c) for c in expected["en"].values()} == {5}
    slots, counts = caption_slots(str(data), LANGS)
    assert slots == 7 and counts == {"en": 240, "de": 48, "ja": 24}
    # every caption arrives, each with its own image; the images without ja are kept in en and de
    tok = CaptionTokenizer(saved_model, 16)
    split = load_split(str(data), LANGS, tok, 32)
    ids = list(split["image_id"])
    for j, lang in enumerate(LANGS):
        part = slice(split["offsets"][j], split["offsets"][j + 1])
        owners = [ids[o] for o in split["owner"][part]]
        assert sorted(owners) == sorted(i for i, caps in expected[lang].items() for _ in caps)
        want_ids, _ = tok([c for i in ids for c in expected[lang].get(i, [])])
        np.testing.assert_array_equal(split["input_ids"][part], want_ids)       # the texts, in image order
    report = run_evaluate(str(saved_model), str(data), str(tmp_path / "e"), actors=2, itc_only=True, save_ranks=True)
    assert report["num_images"] == 48 and report["num_captions"] == counts
    en, ja = report["languages"]["en"], report["languages"]["ja"]
    assert (en["t2i"]["num_queries"], en["t2i"]["num_candidates"]) == (240, 48)
    assert (en["i2t"]["num_queries"], en["i2t"]["num_candidates"]) == (48, 240)
    assert (ja["t2i"]["num_queries"], ja["t2i"]["num_candidates"], ja["i2t"]["num_queries"]) == (24, 24, 24)
    # the definition, on the same model's embeddings, language by language over its own images
    feats = encode_split(CCRKModel.from_pretrained(saved_model), split)
    img, caps = feats["image_emb"].astype(np.float64), feats["captions"]
    for j, lang in enumerate(LANGS):
        part = caps.language(j)
        gallery, owner = np.unique(caps.owner[part], return_inverse=True)
        want = retrieval_metrics(caps.emb[part].astype(np.float64) @ img[gallery].T, owner)
        got = report["languages"][lang]
        for d in ("t2i", "i2t"):
            assert {k: got[d][k] for k in want[d]} == pytest.approx(want[d], abs=1e-12), (lang, d)
    # two-stage on the actors equals two-stage in one process
    two = run_evaluate(str(saved_model), str(data), str(tmp_path / "two"), actors=2, k_test=8)
    ref = report_from_ranks(evaluate_in_process(CCRKModel.from_pretrained(saved_model), split, k_test=8))
    assert two["languages"] == ref["languages"] and two["mrv"] == ref["mrv"]
    assert two["languages"] != report["languages"]
