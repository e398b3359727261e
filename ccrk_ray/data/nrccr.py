"""NRCCR's on-disk layout, read safely (no Ray, no torch): the first piece of ``ccrk convert nrccr``.

- **TextData** caption files: one ``<cap_id> <text>`` per line, ``cap_id = <item>#<tag>#<k>`` with
  tags ``enc`` (the English source), ``enc2xx`` (its machine translation into xx), ``enc2xx2enc``
  (the back-translation), ``xx`` (a native target-language caption) and ``xx2enc`` (that caption
  translated into English). ``read_captions`` returns {(item, k): text} per file, naming the file
  and line of anything malformed; ``align_views`` joins the views of one split on (item, k).
- **FeatureData** BigFiles: ``feature.bin`` (float32, N×D, row-major), ``id.txt`` (N whitespace-
  separated ids), ``shape.txt`` (``N D``); ``read_bigfile`` memory-maps the matrix after checking
  that the three agree. ``video2frames.txt`` (a Python dict literal, item → frame ids) is parsed
  with ``ast.literal_eval`` (the reference ``eval``s it) and checked.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from ccrk_ray.core.config import DataError

TAG = re.compile(r"enc|enc2[a-z]{2,3}|enc2[a-z]{2,3}2enc|[a-z]{2,3}|[a-z]{2,3}2enc")


def parse_cap_id(cap_id: str) -> tuple[str, str, int]:
    """``<item>#<tag>#<k>`` → (item, tag, k); ValueError naming what is wrong."""
    parts = cap_id.rsplit("#", 2)
    if len(parts) != 3 or not parts[0]:
        raise ValueError(f"caption id {cap_id!r} is not <item>#<tag>#<k>")
    item, tag, k = parts
    if not TAG.fullmatch(tag):
        raise ValueError(f"caption id {cap_id!r} has tag {tag!r}, not enc, enc2xx, enc2xx2enc, xx or xx2enc")
    if not k.isdigit():
        raise ValueError(f"caption id {cap_id!r} has index {k!r}, not a whole number")
    return item, tag, int(k)


def read_captions(path: str | Path) -> tuple[str, dict[tuple[str, int], str]]:
    """(the file's tag, {(item, k): text}) of a TextData caption file. Every line must be
    ``<cap_id> <text>`` with one tag throughout and no (item, k) twice: DataError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"caption file {path} does not exist")
    out: dict[tuple[str, int], str] = {}
    file_tag = None
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                cap_id, _, text = line.strip().partition(" ")
                try:
                    item, tag, k = parse_cap_id(cap_id)
                except ValueError as exc:
                    raise DataError(f"{path}:{lineno}: {exc}") from None
                if not text.strip():
                    raise DataError(f"{path}:{lineno}: caption {cap_id} has no text")
                if file_tag is None:
                    file_tag = tag
                elif tag != file_tag:
                    raise DataError(f"{path}:{lineno}: tag {tag!r} in a file of {file_tag!r} captions")
                if (item, k) in out:
                    raise DataError(f"{path}:{lineno}: caption {item}#{tag}#{k} appears twice")
                out[(item, k)] = text.strip()
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if file_tag is None:
        raise DataError(f"{path}: no captions")
    return file_tag, out


def align_views(files: Mapping[str, str | Path]) -> tuple[list[tuple[str, int]], dict[str, dict[tuple[str, int], str]],
                                                          dict[str, int]]:
    """Join one split's views ({view name: caption file}, the first the source) on (item, k):
    (keys in the source's order, {view: {key: text}}, {view: captions it lacks}). A key of another
    view that the source lacks is a broken alignment (DataError naming both files); a source
    caption missing from a view is counted, so the caller can skip it and say how many."""
    if not files:
        raise DataError("no caption files given")
    views = {name: read_captions(path)[1] for name, path in files.items()}
    source_name = next(iter(views))
    source = views[source_name]
    for name, caps in views.items():
        extra = [key for key in caps if key not in source]
        if extra:
            item, k = extra[0]
            raise DataError(f"{files[name]} has {len(extra)} caption(s) the source {files[source_name]} lacks, "
                            f"the first {item}#…#{k}: the files are not aligned by (item, k)")
    missing = {name: sum(key not in caps for key in source) for name, caps in views.items()}
    return list(source), views, missing


def read_bigfile(folder: str | Path) -> tuple[list[str], np.ndarray]:
    """(ids, N×D float32 memory map) of a BigFile folder, after checking ``shape.txt`` against
    ``id.txt`` and the size of ``feature.bin`` (DataError naming the file and both numbers)."""
    folder = Path(folder)
    paths = {name: folder / name for name in ("shape.txt", "id.txt", "feature.bin")}
    for name, p in paths.items():
        if not p.is_file():
            raise DataError(f"BigFile {folder}: {name} does not exist")
    fields = paths["shape.txt"].read_text().split()
    if len(fields) != 2 or not all(f.isdigit() for f in fields):
        raise DataError(f"{paths['shape.txt']}: expected 'N D', got {' '.join(fields)!r}")
    n, d = map(int, fields)
    ids = paths["id.txt"].read_bytes().decode("latin-1").split()
    if len(ids) != n:
        raise DataError(f"{paths['id.txt']} holds {len(ids)} ids but {paths['shape.txt']} says {n}")
    if len(set(ids)) != n:
        raise DataError(f"{paths['id.txt']} holds the same id more than once")
    size = paths["feature.bin"].stat().st_size
    if size != n * d * 4:
        raise DataError(f"{paths['feature.bin']} has {size} bytes; shape.txt's {n}×{d} float32 needs {n * d * 4}")
    feats = np.memmap(paths["feature.bin"], dtype=np.float32, mode="r", shape=(n, d)) if n else np.zeros((0, d), np.float32)
    return ids, feats


def write_bigfile(folder: str | Path, ids: list[str], features: np.ndarray) -> Path:
    """A BigFile folder from ids and an N×D matrix (tests, and features computed here)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    features = np.ascontiguousarray(features, dtype=np.float32)
    if features.ndim != 2 or len(ids) != len(features):
        raise ValueError(f"{len(ids)} ids for features of shape {features.shape}")
    (folder / "shape.txt").write_text(f"{features.shape[0]} {features.shape[1]}\n")
    (folder / "id.txt").write_text(" ".join(ids) + "\n")
    features.tofile(folder / "feature.bin")
    return folder


def read_video2frames(path: str | Path, frame_ids: set[str] | None = None) -> dict[str, list[str]]:
    """item → its frame ids from ``video2frames.txt``, parsed as a literal (never executed). With
    ``frame_ids`` (a BigFile's ids), every frame must be among them (DataError naming the first
    missing one)."""
    path = Path(path)
    try:
        value = ast.literal_eval(path.read_text(encoding="utf-8"))
    except (ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: not a dict literal of item -> frame ids ({exc.__class__.__name__})") from None
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, (list, tuple)) and all(isinstance(f, str) for f in v)
            for k, v in value.items()):
        raise DataError(f"{path}: expected {{item: [frame id, ...]}}")
    out = {k: list(v) for k, v in value.items()}
    if frame_ids is not None:
        for item, frames in out.items():
            absent = [f for f in frames if f not in frame_ids]
            if absent:
                raise DataError(f"{path}: frame {absent[0]!r} of {item!r} is not in the features' id.txt "
                                f"({len(absent)} of its {len(frames)} frames missing)")
    return out
