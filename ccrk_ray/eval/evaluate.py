"""``ccrk evaluate``: a saved model on a parquet split (local or ``s3://``), per-language recall,
MRV and the rest of the report.

Every caption counts (``ccrk_ray.metrics.retrieval_metrics``): each caption of a language is a
text→image query over the images that language has captions for, and each of those images an
image→text query over all of them. Embedding runs on Ray Data actors
(``ccrk_ray.eval.actors.embed_dataset``); ranking runs on ``--actors N`` eval actors, started
while the split is embedded where the cluster has room (``rank_pool_ahead``), that each take
ranges of one language's queries and score them against its whole gallery in chunks
(``rank_on_actors``), so no process holds a score matrix. Two-stage (``--k-test K`` without
``--itc-only``): each query's top K by ITC are re-scored with the ITM head on the same actors; the
ITM features (image tokens, caption hidden states) stay in the object store as the embedding
actors wrote them (``ItmFeatures``), and the eval actors read the ones each pair needs: the driver
holds only the embeddings, for local and ``s3://`` splits alike.

Writes into ``--out``: ``report.json``, ``report.md``, PNG plots (``ccrk_ray.eval.plots``),
``clip_benchmark/<dataset>_<pretrained>_<model>_<lang>_zeroshot_retrieval.json`` (CLIP_benchmark's
naming and result shape) and,
with ``--save-ranks``, ``ranks.parquet`` (``ccrk_ray.eval.ranks``); with ``--tensorboard DIR``
the scalars and plots also go to TensorBoard.
"""

from __future__ import annotations

import json
import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq

from ccrk_ray.core import storage
from ccrk_ray.core.config import ConfigError, DataError, first_line
from ccrk_ray.core.languages import canonical_languages, validate_languages
from ccrk_ray.core.log import get_logger
from ccrk_ray.core.precision import PRECISIONS
from ccrk_ray.core.runtime import DATA_TASK_CPUS, local_cpus, ray_session
from ccrk_ray.data import schema
from ccrk_ray.data.ingest import CountingEvalTransform, eval_rows
from ccrk_ray.data.tokenizer import CaptionTokenizer
from ccrk_ray.data.transforms import ImageTransform, caption_slots
from ccrk_ray.eval.actors import (BlockRescorer, RankPool, cluster_gpus, embed_dataset, free_cpus,
                                  rank_galleries_on_actors)
from ccrk_ray.eval.plots import log_tensorboard, make_figures, write_plots
from ccrk_ray.eval.ranks import RankSet
from ccrk_ray.eval.ranks import save_ranks as write_ranks
from ccrk_ray.eval.report import (DIRECTIONS, average_reports, clip_benchmark_filename, clip_benchmark_results,
                                  format_table, language_rank_correlation, report_from_ranks)
from ccrk_ray.model.openclip import PREFIX, OpenClipModel, OpenClipSpec, OpenClipTokenizer, is_openclip
from ccrk_ray.model.saved import Preprocess, model_config, resolve_model_dir

log = get_logger(__name__)
DEFAULT_K_TEST = 128      # the paper's re-ranking depth (X-VLM / CCLM's k_test)
RANKS_FILE = "ranks.parquet"
ROW_CHECK_ACTORS = 1      # on GPUs, the Ray Data actor that decodes and checks rows ahead of the embedders


def evaluate_need(actors: int, gpus: bool = True) -> int:
    """CPUs an evaluation holds at once: ``actors`` embedding actors, the row-check actor (on GPUs),
    ``actors`` eval actors (started while the split is embedded: ``rank_pool_ahead``) and a CPU
    for Ray Data's list and read tasks."""
    return 2 * actors + (ROW_CHECK_ACTORS if gpus else 0) + DATA_TASK_CPUS


def evaluate_cpus(actors: int) -> int:
    """A local cluster for ``ccrk evaluate`` (or a run that evaluates at its end with ``actors``):
    room for everything an evaluation holds at once, GPUs or not."""
    return local_cpus(evaluate_need(actors), tasks=0)


def run_cpus(held: float) -> int:
    """A local cluster for a run that holds ``held`` CPUs while it trains and then evaluates its
    test sets (``evaluate_test_sets``: one embedding and one eval actor): room for each in turn."""
    return max(local_cpus(held), evaluate_cpus(1))


@contextmanager
def rank_pool_ahead(actors: int, itm_model_dir: str | None = None) -> Iterator[RankPool | None]:
    """``actors`` eval actors started before the embedding when the cluster has CPUs free for
    them beside it, so their start-up (and two-stage's ITM model load, ``itm_model_dir``)
    overlaps the embedding (measured: a tiny two-stage ``ccrk evaluate`` 34.7 s → 29.5 s); stopped
    on exit. None where there is no room: they start after it, as the embedding must never wait
    for CPUs they hold."""
    if free_cpus() < evaluate_need(actors, gpus=cluster_gpus() > 0):
        yield None
        return
    with RankPool(actors, itm_model_dir=itm_model_dir) as pool:
        yield pool


# Split folder names that say which split, not which data set
SPLIT_NAMES = re.compile(r"(test|val|valid|validation|dev|train)([_-]\w+)?")


def dataset_name_of(data: str) -> str:
    """CLIP_benchmark's dataset field from a data URI: the last path part without ``.parquet``, with
    its parent's name in front when it only names a split (``data/xflickrco/test`` → ``xflickrco_test``)."""
    parts = [p for p in data.rstrip("/").split("/") if p]
    name = parts[-1][:-len(".parquet")] if parts[-1].endswith(".parquet") else parts[-1]
    if SPLIT_NAMES.fullmatch(name) and len(parts) > 1 and not parts[-2].endswith(":"):
        return f"{parts[-2]}_{name}"
    return name


@dataclass
class Subject:
    """The model an evaluation embeds with, and how its inputs are prepared."""
    model: Any                       # what the embedding actors load: a saved model's path or an OpenClipSpec
    path: Path | None                # the saved CCRK model (None: an open_clip model)
    tokenizer: Any                   # CaptionTokenizer or OpenClipTokenizer
    image_transform: ImageTransform
    languages: tuple[str, ...]       # its training languages (the default), when known
    has_itm: bool
    name: str                        # CLIP_benchmark's "model"
    pretrained: str                  # CLIP_benchmark's "pretrained"


def evaluation_subject(model: str, pretrained: str | None = None, image_size: int | None = None,
                       max_length: int | None = None, tokenizer: str | None = None) -> Subject:
    """A saved CCRK model (directory or training checkpoint) or ``openclip:ARCH`` with ``pretrained``,
    checked and ready to embed with (ConfigError naming the problem)."""
    if is_openclip(model):
        spec = OpenClipSpec.parse(model, pretrained)
        if image_size or max_length or tokenizer:
            raise ConfigError("--image-size, --max-length and --tokenizer are the open_clip model's own")
        encoders = OpenClipModel(spec)       # fails here, before Ray, on an unknown arch or weights
        return Subject(spec, None, OpenClipTokenizer(spec, encoders.context_length),
                       ImageTransform(encoders.image_size, train=False, resize=encoders.resize_mode), (),
                       False, spec.label, spec.pretrained or "random")
    if pretrained is not None:
        raise ConfigError("--pretrained goes with --model openclip:ARCH; a saved model carries its weights")
    path = resolve_model_dir(model, flag="--model", family="ccrk")
    pre = Preprocess.read(path)
    image_size = image_size or pre.image_size
    max_length = max_length or pre.max_length
    if not image_size or not max_length:
        raise ConfigError("--image-size and --max-length are needed: the model directory has no preprocess.json")
    return Subject(path, path, CaptionTokenizer(tokenizer or path, max_length, pre.pre_caption),
                   ImageTransform(image_size, train=False), pre.languages,
                   bool(model_config(path).get("fusion_layers")), _model_name(path), str(model))


def run_evaluate(model_dir: str, data: str, out: str, *, languages: Sequence[str] | None = None,
                 k_test: int | None = None, image_size: int | None = None, max_length: int | None = None,
                 tokenizer: str | None = None, actors: int = 1, itc_only: bool = False,
                 tensorboard: str | None = None, save_ranks: bool = False,
                 dataset_name: str | None = None, pretrained: str | None = None, batch_size: int = 128,
                 precision: str = "fp32", folds: int | None = None) -> dict[str, Any]:
    """Everything is checked (model, preprocessing, data schema, languages) before Ray starts;
    inside a running session (fine-tuning's tests) it joins it. ``model_dir``: a saved model, or
    ``openclip:ARCH`` with ``pretrained`` (a tag or weights file). ``batch_size`` and ``precision``
    are the embedding actors' (two-stage's ITM pass runs in fp32). ``folds``: also rank each of
    that many consecutive, equal folds of the split's images (in the split's row order) as a
    gallery of its own and report their average under ``folds`` (COCO's 1K protocol: 5 folds of
    the 5K test set)."""
    t0 = time.perf_counter()
    if actors < 1:
        raise ConfigError(f"--actors must be >= 1, got {actors}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if k_test is not None and k_test < 1:
        raise ConfigError(f"--k-test must be >= 1, got {k_test}")
    if folds is not None and folds < 2:
        raise ConfigError(f"--folds must be >= 2, got {folds}")
    subject = evaluation_subject(model_dir, pretrained, image_size, max_length, tokenizer)
    in_data = data_languages(data)
    # any language code the split has captions for; CLIP_benchmark's codes (jp) name ours (ja)
    langs, aliases = canonical_languages(languages or subject.languages or in_data)
    langs = validate_languages(langs, known=None)
    missing = [lang for lang in langs if lang not in in_data]
    if missing:
        raise ConfigError(f"{data} has no caption column for {', '.join(missing)} (it has {', '.join(in_data)})")
    if k_test is not None and not itc_only and not subject.has_itm:
        raise ConfigError(f"--k-test needs a model with fusion layers (ITM head); {model_dir} is a dual "
                          "encoder: leave --k-test out or pass --itc-only")
    if k_test is None and not itc_only and subject.has_itm:
        # the paper's protocol for a model with an ITM head: re-rank the top 128 (at most each
        # language's gallery)
        k_test = DEFAULT_K_TEST
    two_stage = k_test is not None and not itc_only
    total = storage.count_rows(data)
    if folds is not None and folds > total:
        raise ConfigError(f"--folds {folds} is more than the {total} rows of {data}")
    rescore = None
    with ray_session(evaluate_cpus(actors)), rank_pool_ahead(actors, str(subject.path) if two_stage else None) as pool:
        embedded = embed_split(data, subject.model, langs, subject.tokenizer, subject.image_transform.image_size,
                               actors=actors, image_transform=subject.image_transform, batch_size=batch_size,
                               precision=precision, itm_features=two_stage, total=total)
        ids, image_emb, captions = embedded[:3]
        if two_stage:
            log.info("two-stage ranking of %d images and %d captions: ITC top %d re-ranked by ITM on the eval "
                     "actors", len(ids), len(captions.owner), k_test)
            rescore = BlockRescorer(str(subject.path), embedded[3])
        kwargs = dict(k_test=k_test, rescore=rescore) if two_stage else {}
        # the split and each fold as a gallery of its own, on one set of eval actors
        ranks, *fold_ranks = _rank(data, image_emb, captions, actors,
                                   galleries=[None, *fold_images(data, ids, folds or 0)], pool=pool, **kwargs)
        fold_reports = [report_from_ranks(r) for r in fold_ranks]
    report = finish_report(ranks)
    if fold_reports:
        report["folds"] = {"count": len(fold_reports), "sizes": [r["num_images"] for r in fold_reports],
                           **average_reports(fold_reports)}
    if len(ids) < total:        # skipped rows (no caption in these languages, bad image or caption)
        log.warning("%d of %d rows of %s had no usable caption in %s or a bad image: not evaluated",
                    total - len(ids), total, data, ", ".join(langs))
    report.update(model=str(subject.path) if subject.path else f"{PREFIX}{subject.model.arch}",
                  pretrained=subject.pretrained, data=data, language_aliases=aliases, precision=precision,
                  k_test=k_test if two_stage else None, actors=actors, rows=total, rows_not_evaluated=total - len(ids),
                  seconds=round(time.perf_counter() - t0, 1))
    write_outputs(Path(out), report, ranks, ids, dataset=dataset_name or dataset_name_of(data),
                  model=subject.name, pretrained=subject.pretrained, tensorboard=tensorboard,
                  save_ranks=save_ranks)
    return report


def data_languages(data: str) -> list[str]:
    """The languages a parquet split has caption columns for (read from its first file's schema)."""
    try:
        fs, files = storage.list_parquet(data)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    try:
        return schema.languages_in(pq.ParquetFile(fs.open_input_file(files[0])).schema_arrow)
    except (OSError, ValueError) as exc:       # pyarrow: not parquet, truncated, unreadable
        raise DataError(f"{files[0]}: not a readable parquet file ({first_line(exc)})") from None


def evaluate_test_sets(tests: str | dict[str, str] | None, model_dir: Path, out: Path, languages: Sequence[str],
                       k_test: int | None, dataset: str = "test", name: str = "test",
                       folds: dict[str, int] | None = None) -> dict[str, Any]:
    """``run_evaluate`` on every test set: one URI for ``languages``, or ``{language: URI}`` when
    each language has its own test images; reports under ``out/<set>``. {set name: report}.
    ``folds``: {language: N}, a set of those languages is also reported as N folds' average. Each
    set's ranks go to ``out/<set>/ranks.parquet`` (for ``ccrk mrv`` across runs).

    ``name="translate_test"``: IGLUE's translate-test sets (each language's test captions machine-
    translated into English, the same images): reported as ``translate_test[_<lang>]``; a single URI
    is evaluated in those of ``languages`` it has captions for (English has none)."""
    if not tests:
        return {}
    if isinstance(tests, str):
        langs = list(languages)
        if name != "test":
            present = data_languages(tests)
            langs = [lang for lang in languages if lang in present]
            if not langs:
                raise ConfigError(f"{tests} has captions in none of {', '.join(languages)}")
        sets = {name: (tests, langs)}
    else:
        sets = {f"{name}_{lang}": (uri, [lang]) for lang, uri in tests.items()}
    reports = {}
    for name, (uri, langs) in sets.items():
        counts = {(folds or {})[lang] for lang in langs if lang in (folds or {})}
        if len(counts) > 1:
            raise ConfigError(f"test set {uri} holds {', '.join(langs)}, with different fold counts {sorted(counts)}")
        log.info("evaluating on %s (%s), languages %s", name, uri, ", ".join(langs))
        reports[name] = run_evaluate(str(model_dir), uri, str(out / name), languages=langs, k_test=k_test,
                                     itc_only=k_test is None, dataset_name=dataset, save_ranks=True,
                                     folds=counts.pop() if counts else None)
    return reports


def fold_images(data: str, ids: np.ndarray, folds: int) -> list[np.ndarray]:
    """``folds`` consecutive folds of the split's images in its row order (files by name, rows in
    file order: the annotation order the converters keep), as sorted indices into ``ids``: n // folds
    rows each, the last also the remainder (the reference's ``re_eval_dataset(fold=...)``). The
    images of rows that were not evaluated are left out of their fold."""
    if not folds:
        return []
    fs, files = storage.list_parquet(data)
    table = pq.read_table(files, filesystem=fs, columns=[schema.IMAGE_ID])
    in_order = np.asarray(table.column(schema.IMAGE_ID).to_pylist(), dtype=object)
    where = {image_id: n for n, image_id in enumerate(in_order)}
    fold_of = np.minimum(np.arange(len(in_order)) // (len(in_order) // folds), folds - 1)
    fold = fold_of[[where[i] for i in ids]]
    return [np.flatnonzero(fold == f) for f in range(folds)]


def rank_split_itc(data: str, model_dir, languages: Sequence[str], tokenizer, image_size: int, *,
                   actors: int = 1, image_transform: ImageTransform | None = None, batch_size: int = 128,
                   precision: str = "fp32") -> tuple[np.ndarray, RankSet]:
    """(image ids, ranks) of a model on a parquet split by ITC, every caption counting: ``embed_split``
    then ranking on eval actors (``rank_on_actors``, the documented tie policy). Ray must be
    running. The demo ranks through here."""
    with rank_pool_ahead(actors) as pool:
        ids, image_emb, captions = embed_split(data, model_dir, languages, tokenizer, image_size, actors=actors,
                                               image_transform=image_transform, batch_size=batch_size,
                                               precision=precision)
        return ids, _rank(data, image_emb, captions, actors, pool=pool)[0]


def embed_split(data: str, model_dir, languages: Sequence[str], tokenizer, image_size: int, *,
                actors: int = 1, image_transform: ImageTransform | None = None, batch_size: int = 128,
                precision: str = "fp32", itm_features: bool = False, total: int | None = None) -> tuple:
    """(image ids, image embeddings, every caption) of a model on a parquet split, embedded on Ray
    actors (``embed_dataset``), and with ``itm_features`` the ``ItmFeatures`` left in the object
    store for two-stage re-scoring. ``total``: the split's rows when the caller counted them. Ray
    must be running."""
    slots, per_language = caption_slots(data, languages)
    empty = [lang for lang, n in per_language.items() if n == 0]
    if empty:
        raise ConfigError(f"{data} has no caption in {', '.join(empty)}")
    transform = CountingEvalTransform(tokenizer=tokenizer, languages=tuple(languages), slots=slots, on_bad_row="skip",
                                      image_transform=image_transform or ImageTransform(image_size, train=False))
    return embed_dataset(eval_rows(data, languages=languages), model_dir, languages, transform=transform,
                         num_actors=actors, total=total or storage.count_rows(data),
                         batch_size=batch_size, precision=precision, itm_features=itm_features)


def _rank(data: str, image_emb, captions, actors: int, galleries=(None,), **kwargs) -> list[RankSet]:
    """The ranks in each of ``galleries`` (``rank_galleries_on_actors``)."""
    try:
        return rank_galleries_on_actors(image_emb, captions, galleries, num_actors=actors, **kwargs)
    except ValueError as exc:       # bad embeddings (e.g. NaN from a diverged model), named
        raise ConfigError(f"cannot rank {data}: {exc}") from None


def finish_report(ranks: RankSet) -> dict[str, Any]:
    """``report_from_ranks`` plus the languages' rank correlation (JSON-safe: NaN → null)."""
    report = report_from_ranks(ranks)
    report["language_rank_correlation"] = {
        d: [[None if math.isnan(v) else round(float(v), 4) for v in row] for row in language_rank_correlation(r)]
        for d, r in zip(DIRECTIONS, ranks.matrices())}
    return report


def write_outputs(out_dir: Path, report: dict[str, Any], ranks: RankSet, image_ids, *, dataset: str,
                  model: str, pretrained: str, tensorboard: str | None = None, save_ranks: bool = False) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    t2i, i2t = ranks.matrices()
    figs = make_figures(report, t2i, i2t)
    plots = write_plots(figs, out_dir)
    outputs = {"plots": sorted(p.name for p in plots.values()), "clip_benchmark": []}
    cb_dir = out_dir / "clip_benchmark"
    cb_dir.mkdir(exist_ok=True)
    for result in clip_benchmark_results(report, dataset, model, pretrained):
        name = clip_benchmark_filename(result)
        (cb_dir / name).write_text(json.dumps(result, indent=2))
        outputs["clip_benchmark"].append(f"clip_benchmark/{name}")
    if save_ranks:
        write_ranks(out_dir / RANKS_FILE, image_ids, ranks,
                    meta={"model": report.get("model"), "data": report.get("data"), "k_test": report.get("k_test")})
        outputs["ranks"] = RANKS_FILE
    if tensorboard:
        log_tensorboard(tensorboard, report, t2i, i2t, figs)
        outputs["tensorboard"] = str(tensorboard)
    report["outputs"] = outputs
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    table = format_table(report)
    if "folds" in report:
        table += f"\n\naverage of {report['folds']['count']} folds of {report['folds']['sizes']} images:\n"
        table += format_table(report["folds"])
    images = "".join(f"\n![{name}]({path.name})\n" for name, path in plots.items())
    (out_dir / "report.md").write_text("```\n" + table + "\n```\n" + images)


def _model_name(model_path: Path) -> str:
    try:
        vision = json.loads((model_path / "config.json").read_text()).get("vision_name")
    except (OSError, ValueError):
        vision = None
    return f"ccrk-{vision}" if vision else "ccrk"
