"""Ranks per instance and language on disk (parquet), and MRV over the rank files of several runs.

A rank file has one row per (image, language): ``image_id`` (string), ``language`` (string),
``t2i_rank`` and ``i2t_rank`` (int64, 0-based: 0 = the correct item ranked first). Its schema
metadata ``ccrk`` holds JSON about the run (model, data, k_test).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ccrk_ray.metrics import mean_rank_variance

DIRECTIONS = ("t2i", "i2t")


def save_ranks(path: str | Path, image_ids: Sequence, languages: Sequence[str], t2i: np.ndarray, i2t: np.ndarray,
               meta: dict[str, Any] | None = None) -> Path:
    n, k = np.shape(t2i)
    if np.shape(i2t) != (n, k) or len(image_ids) != n or len(languages) != k:
        raise ValueError(f"ranks {np.shape(t2i)}/{np.shape(i2t)} do not match {len(image_ids)} images × "
                         f"{len(languages)} languages")
    table = pa.table({"image_id": pa.array(np.repeat(np.asarray(image_ids, dtype=str), k), pa.string()),
                      "language": pa.array(np.tile(np.asarray(languages, dtype=str), n), pa.string()),
                      "t2i_rank": pa.array(np.asarray(t2i, dtype=np.int64).ravel()),
                      "i2t_rank": pa.array(np.asarray(i2t, dtype=np.int64).ravel())})
    table = table.replace_schema_metadata({"ccrk": json.dumps(meta or {})})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def load_ranks(path: str | Path, languages: Sequence[str] | None = None
               ) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """(image_ids sorted, languages, t2i N×K, i2t N×K) of a rank file, optionally only ``languages``."""
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
    mats = {d: np.full((len(uniq), len(want)), -1, dtype=np.int64) for d in DIRECTIONS}
    row = np.searchsorted(uniq, ids)
    for j, lang in enumerate(want):
        sel = langs == lang
        if len(np.unique(row[sel])) != sel.sum():
            raise ValueError(f"{path}: an image has more than one {lang} rank row")
        for d in DIRECTIONS:
            mats[d][row[sel], j] = table.column(f"{d}_rank").to_numpy()[sel]
    if (mats["t2i"] < 0).any():
        raise ValueError(f"{path}: not every image has a rank in every language of {', '.join(want)}")
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
