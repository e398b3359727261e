"""What ranking a test split gives (``RankSet``), rank files on disk, and MRV over several runs.

A ``RankSet`` holds, per language, the three counts of every caption that every metric is reduced
from (``ccrk_ray.metrics.caption_rivals``): one caption per image and language is the special case.

A rank file has one row per (image, language the image has captions in): ``image_id`` (string),
``language`` (string), ``t2i_rank`` (float64: the mean 0-based rank of the image's captions in that
language), ``i2t_rank`` (float64: the image's best 0-based rank), ``num_captions`` (int64). 0 =
the correct item ranked first. Its schema metadata ``ccrk`` holds JSON about the run (model, data,
k_test).
"""

from __future__ import annotations

import json
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ccrk_ray.metrics import item_ranks_from_rivals, mean_rank_variance, metrics_from_rivals

DIRECTIONS = ("t2i", "i2t")


@dataclass
class LanguageRanks:
    """One language's captions: ``owner`` (the gallery index of each caption's image) and the
    counts of ``ccrk_ray.metrics.caption_rivals`` (``t2i``, ``i2t``, ``own``), all of length M.
    The language's gallery is the images it has captions for."""

    owner: np.ndarray
    t2i: np.ndarray
    i2t: np.ndarray
    own: np.ndarray

    def __post_init__(self):
        self.owner, self.t2i, self.i2t, self.own = (np.asarray(a, dtype=np.int64)
                                                    for a in (self.owner, self.t2i, self.i2t, self.own))

    @property
    def num_captions(self) -> int:
        return len(self.owner)

    @property
    def images(self) -> np.ndarray:
        """Gallery indices of the images evaluated in this language (sorted)."""
        return np.unique(self.owner)

    def metrics(self) -> dict:
        return metrics_from_rivals(self.t2i, self.i2t, self.own, self.owner)


@dataclass
class RankSet:
    """Ranks of a test split of ``num_images`` images, per language (in evaluation order)."""

    num_images: int
    languages: dict[str, LanguageRanks] = field(default_factory=dict)

    @classmethod
    def from_matrices(cls, t2i: np.ndarray, i2t: np.ndarray, languages: Sequence[str]) -> "RankSet":
        """One caption per image and language: N×K 0-based rank matrices (column k = languages[k])."""
        t2i, i2t = np.asarray(t2i), np.asarray(i2t)
        if t2i.ndim != 2 or i2t.shape != t2i.shape or len(languages) != t2i.shape[1]:
            raise ValueError(f"rank matrices {t2i.shape}/{i2t.shape} do not match {len(languages)} languages")
        n = t2i.shape[0]
        zero = np.zeros(n, dtype=np.int64)
        return cls(n, {lang: LanguageRanks(np.arange(n), t2i[:, j], i2t[:, j], zero)
                       for j, lang in enumerate(languages)})

    def matrices(self) -> tuple[np.ndarray, np.ndarray]:
        """(t2i, i2t) N×L float per-image ranks, 0-based: an image's mean caption rank and its best
        rank; NaN where it has no caption in that language. MRV, plots and rank files use these."""
        cols = [item_ranks_from_rivals(r.t2i, r.i2t, r.own, r.owner, self.num_images) for r in self.languages.values()]
        return np.stack([c[0] for c in cols], axis=1), np.stack([c[1] for c in cols], axis=1)

    def caption_counts(self) -> np.ndarray:
        """N×L number of captions of each image in each language."""
        return np.stack([np.bincount(r.owner, minlength=self.num_images) for r in self.languages.values()], axis=1)


def save_ranks(path: str | Path, image_ids: Sequence, ranks: RankSet, meta: dict[str, Any] | None = None) -> Path:
    """One row per (image, language it has captions in), see the module docstring."""
    if len(image_ids) != ranks.num_images:
        raise ValueError(f"{len(image_ids)} image ids for ranks of {ranks.num_images} images")
    languages = list(ranks.languages)
    t2i, i2t = ranks.matrices()
    counts = ranks.caption_counts()
    n, k = t2i.shape
    keep = counts.ravel() > 0
    table = pa.table({"image_id": pa.array(np.repeat(np.asarray(image_ids, dtype=str), k)[keep], pa.string()),
                      "language": pa.array(np.tile(np.asarray(languages, dtype=str), n)[keep], pa.string()),
                      "t2i_rank": pa.array(t2i.ravel()[keep]),
                      "i2t_rank": pa.array(i2t.ravel()[keep]),
                      "num_captions": pa.array(counts.ravel()[keep].astype(np.int64))})
    table = table.replace_schema_metadata({"ccrk": json.dumps(meta or {})})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def load_ranks(path: str | Path, languages: Sequence[str] | None = None
               ) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """(image_ids sorted, languages, t2i N×K, i2t N×K) of a rank file, optionally only ``languages``;
    NaN where an image has no caption in a language."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rank file {path} does not exist")
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise ValueError(f"{path} is not a parquet rank file ({exc})") from None
    missing = {"image_id", "language", "t2i_rank", "i2t_rank"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path} is not a rank file: no column(s) {', '.join(sorted(missing))}")
    ids = np.asarray(table.column("image_id").to_pylist(), dtype=object)
    langs = np.asarray(table.column("language").to_pylist(), dtype=object)
    have = list(dict.fromkeys(langs.tolist()))
    want = list(languages) if languages else have
    absent = [lang for lang in want if lang not in have]
    if absent:
        raise ValueError(f"{path} has no ranks for language(s) {', '.join(absent)} (it has {', '.join(have)})")
    uniq = np.unique(ids)
    mats = {d: np.full((len(uniq), len(want)), np.nan) for d in DIRECTIONS}
    row = np.searchsorted(uniq, ids)
    for j, lang in enumerate(want):
        sel = langs == lang
        if len(np.unique(row[sel])) != sel.sum():
            raise ValueError(f"{path}: an image has more than one {lang} rank row")
        for d in DIRECTIONS:
            mats[d][row[sel], j] = table.column(f"{d}_rank").to_numpy().astype(np.float64)[sel]
    return uniq, want, mats["t2i"], mats["i2t"]


def parse_run_spec(spec: str) -> tuple[str, list[str] | None]:
    """``FILE`` or ``FILE:LANG[,LANG...]`` (take only those languages of that run)."""
    path, sep, tail = spec.rpartition(":")
    if sep and path and tail and "/" not in tail:
        return path, [t.strip() for t in tail.split(",") if t.strip()]
    return spec, None


def mrv_over_runs(specs: Sequence[str]) -> dict[str, Any]:
    """MRV both ways over languages gathered from several runs' rank files, e.g. separately
    fine-tuned per-language models: ``["de.parquet:de", "fr.parquet:fr", ...]``. Each language
    must come from exactly one run and every run must rank the same images."""
    if not specs:
        raise ValueError("no rank files given")
    ids_ref, ref_path = None, None
    columns: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}
    for spec in specs:
        path, langs = parse_run_spec(spec)
        ids, langs, t2i, i2t = load_ranks(path, langs)
        if ids_ref is None:
            ids_ref, ref_path = ids, path
        elif len(ids) != len(ids_ref) or not np.array_equal(ids, ids_ref):
            only_here = len(np.setdiff1d(ids, ids_ref))
            only_there = len(np.setdiff1d(ids_ref, ids))
            raise ValueError(f"{path} ranks other images than {ref_path}: {only_here} image(s) only in {path}, "
                             f"{only_there} only in {ref_path}")
        for j, lang in enumerate(langs):
            if lang in columns:
                raise ValueError(f"language {lang} comes from both {columns[lang][0]} and {path}; "
                                 f"pick one with FILE:LANG")
            columns[lang] = (path, t2i[:, j], i2t[:, j])
    if len(columns) < 2:
        raise ValueError(f"MRV needs ranks in at least 2 languages, got {', '.join(columns) or 'none'}")
    langs = list(columns)
    t2i = np.stack([columns[lang][1] for lang in langs], axis=1)
    i2t = np.stack([columns[lang][2] for lang in langs], axis=1)
    return {"runs": {lang: columns[lang][0] for lang in langs}, "languages": langs, "num_images": int(len(ids_ref)),
            "mrv": {"t2i": mean_rank_variance(t2i), "i2t": mean_rank_variance(i2t)}}
