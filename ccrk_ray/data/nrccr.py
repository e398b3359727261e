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

``convert_nrccr`` writes one split as parquet, one row per item (``NRCCR_COLUMNS``):
``image_id``; the caption views as aligned lists ``text_<view>`` (entry i of every view is the
same caption k, ``caption_k``); and the item itself as ``features`` (T×D: T frames of a video, or
one row for a precomputed image feature) or ``image`` (the image file's bytes, for a model with
its own image tower); ``language`` (the target language), ``split``. Bad items and captions are
skipped and counted by reason (``ccrk_ray.data.rows``), never silently dropped.
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ccrk_ray.core import storage
from ccrk_ray.core.config import ConfigError, DataError
from ccrk_ray.data.rows import SkipCounter, captions_problem, image_problem
from ccrk_ray.data.schema import IMAGE, IMAGE_ID, ROW_GROUP_ROWS, SPLIT, SchemaError
from ccrk_ray.data.transforms import BadRowError, ImageTransform, caption_index, decode_image

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


# The caption views NRCCR reads, by the tag their files carry (xx = the target language).
VIEWS = ("source", "translation", "back_translation", "native", "native_en")
VIEW_TAGS = {"source": "enc", "translation": "enc2{xx}", "back_translation": "enc2{xx}2enc", "native": "{xx}",
             "native_en": "{xx}2enc"}
FEATURES = "features"
CAPTION_K = "caption_k"
LANGUAGE = "language"
SUMMARY_FILE = "_SUCCESS.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def text_column(view: str) -> str:
    return f"text_{view}"


def nrccr_schema(views: Sequence[str], item: str) -> pa.Schema:
    """Columns of an NRCCR split: ``item`` is ``features`` (list of T lists of D float32) or ``image``."""
    fields = [pa.field(IMAGE_ID, pa.string(), nullable=False)]
    fields.append(pa.field(FEATURES, pa.list_(pa.list_(pa.float32())), nullable=False) if item == FEATURES
                  else pa.field(IMAGE, pa.binary(), nullable=False))
    fields += [pa.field(text_column(v), pa.list_(pa.string()), nullable=False) for v in views]
    fields += [pa.field(CAPTION_K, pa.list_(pa.int32()), nullable=False), pa.field(LANGUAGE, pa.string()),
               pa.field(SPLIT, pa.string())]
    return pa.schema(fields)


def views_in(schema: pa.Schema) -> list[str]:
    return [v for v in VIEWS if text_column(v) in schema.names]


def even_indices(n: int, max_frames: int) -> np.ndarray:
    """Indices of at most ``max_frames`` of ``n`` frames, evenly spaced from first to last."""
    if n <= max_frames:
        return np.arange(n)
    return np.linspace(0, n - 1, max_frames).round().astype(int)


def even_frames(frames: list[str], max_frames: int) -> list[str]:
    """At most ``max_frames`` of a video's frames, evenly spaced from first to last."""
    return [frames[i] for i in even_indices(len(frames), max_frames)]


def _check_tag(view: str, tag: str, path: Path, language: str) -> None:
    want = VIEW_TAGS[view].format(xx=language)
    if tag != want:
        raise ConfigError(f"{path}: its captions are tagged {tag!r}, the {view} view of language {language!r} "
                          f"is {want!r}")


def convert_nrccr(views: Mapping[str, str | os.PathLike], out_dir: str | os.PathLike, *, language: str,
                  split: str, features: str | os.PathLike | None = None, video2frames: str | os.PathLike | None = None,
                  images: str | os.PathLike | None = None, ids: str | os.PathLike | None = None,
                  max_frames: int = 64, rows_per_shard: int = 1000) -> dict:
    """One split of NRCCR's layout → ``out_dir/part-NNNNN.parquet`` + ``_SUCCESS.json`` (counts).

    ``views``: view name (``VIEWS``) → its TextData caption file; the first view given is the key
    (``source`` for training, ``native`` for a test split); every file's tag must be its view's for
    ``language``. The item per row comes from ``features`` (a BigFile folder: image features by
    item id, or frame features with ``video2frames``; a video keeps at most ``max_frames`` frames,
    evenly spaced) or from ``images`` (a folder of ``<item>.jpg``/``.png``/…). ``ids``: the split's
    id list (whitespace separated; order kept), else the key view's items in file order.
    Returns the summary written to ``_SUCCESS.json``.
    """
    unknown = [v for v in views if v not in VIEWS]
    if unknown or not views:
        raise ConfigError(f"NRCCR views must be among {', '.join(VIEWS)}, got {', '.join(map(str, views)) or 'none'}")
    if (features is None) == (images is None):
        raise ConfigError("give the items as features (a BigFile folder) or as images (a folder), one of the two")
    if video2frames is not None and features is None:
        raise ConfigError("video2frames needs the frame features (a BigFile folder)")
    if not isinstance(max_frames, int) or max_frames < 1 or rows_per_shard < 1:
        raise ConfigError("max_frames and rows_per_shard must be integers >= 1")
    paths = {v: Path(p) for v, p in views.items()}
    keys, texts, _ = align_views(paths)
    for view, path in paths.items():
        _check_tag(view, read_captions(path)[0], path, language)
    skipped = SkipCounter()
    by_item: dict[str, list[int]] = {}
    for key in keys:
        if all(key in texts[v] for v in paths):
            by_item.setdefault(key[0], []).append(key[1])
        else:
            skipped.add("missing_view_caption", f"{key[0]}#{key[1]}")
    if ids is not None:
        order = Path(ids).read_text(encoding="utf-8").split()
        wanted = set(order)
        for item, ks in by_item.items():
            for k in ks if item not in wanted else ():
                skipped.add("not_in_split", f"{item}#{k}")
    else:
        order = list(dict.fromkeys(item for item, _ in keys))
    feats = frames = None
    id_row: dict[str, int] = {}
    if features is not None:
        feat_ids, feats = read_bigfile(features)
        id_row = {fid: i for i, fid in enumerate(feat_ids)}
        if video2frames is not None:
            frames = read_video2frames(video2frames, set(feat_ids))
    image_dir = Path(images) if images is not None else None
    if image_dir is not None and not image_dir.is_dir():
        raise ConfigError(f"image folder {image_dir} does not exist")
    view_names = list(paths)
    schema = nrccr_schema(view_names, FEATURES if feats is not None else IMAGE)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("part-*.parquet")) + list(out.glob(SUMMARY_FILE)):
        old.unlink()
    rows: list[dict] = []
    shards: list[str] = []
    written = 0

    def flush():
        if rows:
            name = f"part-{len(shards):05d}.parquet"
            table = pa.Table.from_pylist(rows, schema=schema)
            pq.write_table(table, out / f".{name}.tmp", row_group_size=ROW_GROUP_ROWS)
            os.replace(out / f".{name}.tmp", out / name)
            shards.append(name)
            rows.clear()

    seen = set()
    captions = 0
    for item in order:
        if item in seen:
            skipped.add("duplicate_id", item)
            continue
        seen.add(item)
        ks = sorted(by_item.get(item, ()))
        if not ks:
            skipped.add("no_captions", item)
            continue
        row = {IMAGE_ID: item, CAPTION_K: ks, LANGUAGE: language, SPLIT: split}
        for view in view_names:
            row[text_column(view)] = [texts[view][(item, k)] for k in ks]
        if feats is not None:
            names = even_frames(frames[item], max_frames) if frames is not None and item in frames else (
                None if frames is not None else [item])
            if not names or any(n not in id_row for n in names):
                skipped.add("missing_features", item)
                continue
            matrix = np.asarray(feats[[id_row[n] for n in names]], dtype=np.float32)
            if not np.isfinite(matrix).all():
                skipped.add("bad_features", item)
                continue
            row[FEATURES] = matrix.tolist()
        else:
            found = next((image_dir / f"{item}{ext}" for ext in IMAGE_SUFFIXES if (image_dir / f"{item}{ext}").is_file()),
                         None)
            if found is None:
                skipped.add("missing_image", item)
                continue
            data = found.read_bytes()
            problem = image_problem(data)
            if problem:
                skipped.add(problem, item)
                continue
            row[IMAGE] = data
        rows.append(row)
        written += 1
        captions += len(ks)
        if len(rows) >= rows_per_shard:
            flush()
    flush()
    summary = {"converter": "nrccr", "rows_written": written, "captions_written": captions, "skipped": skipped.as_dict(),
               "skipped_examples": skipped.example_ids, "shards": shards, "language": language, "split": split,
               "views": view_names, "item": schema.names[1]}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


TRAIN_VIEWS = ("source", "translation", "back_translation")
QUERY_VIEWS = ("native", "native_en")


def check_nrccr_schema(schema: pa.Schema, views: Sequence[str], item: str, where: str) -> None:
    """SchemaError naming ``where`` and the column when an NRCCR split lacks what a run reads."""
    for name in [IMAGE_ID, item, *(text_column(v) for v in views)]:
        if name not in schema.names:
            raise SchemaError(f"{where}: missing column {name!r} (columns: {', '.join(schema.names)}); "
                              "NRCCR data comes from `ccrk convert nrccr`")


def item_column(schema: pa.Schema) -> str:
    """``features`` or ``image``: how a split holds its items."""
    return FEATURES if FEATURES in schema.names else IMAGE


class NRCCRBatchTransform:
    """Rows of an NRCCR split → a batch: the item and one caption per row in each of ``views``.

    Items: ``features`` rows (T×D) → ``visual`` B×``max_frames``×D float32 and ``visual_mask``
    B×``max_frames`` (a longer video keeps ``max_frames`` evenly spaced frames); ``image`` rows →
    ``visual`` B×3×H×W uint8 via ``image_transform``. Captions: ``<view>_ids`` / ``<view>_mask`` B×L;
    with ``caption_passes`` > 1 and the plan's ``_cycle`` the row's captions take turns
    (``caption_index``), else a caption is drawn at random (training) or the first (no rng).
    Bad rows (features of another width, non-finite values, views of unequal length, bad captions
    or images) raise ``BadRowError`` or, with ``on_bad_row="skip"``, are skipped and counted.
    Columns starting with ``_`` follow their rows."""

    def __init__(self, tokenizer, views: Sequence[str] = TRAIN_VIEWS, item: str = FEATURES, max_frames: int = 1,
                 feature_dim: int | None = None, image_transform: ImageTransform | None = None,
                 rng_seed: int | None = None, on_bad_row: str = "raise", caption_passes: int = 1):
        if item not in (FEATURES, IMAGE):
            raise ValueError(f"item must be {FEATURES!r} or {IMAGE!r}, got {item!r}")
        if item == IMAGE and image_transform is None:
            raise ValueError("image items need an image_transform")
        if on_bad_row not in ("raise", "skip"):
            raise ValueError(f"on_bad_row must be 'raise' or 'skip', got {on_bad_row!r}")
        self.tokenize, self.views, self.item = tokenizer, tuple(views), item
        self.max_frames, self.feature_dim, self.image_transform = max_frames, feature_dim, image_transform
        self.on_bad_row, self.caption_passes = on_bad_row, caption_passes
        self.rng = np.random.default_rng(rng_seed) if rng_seed is not None else None
        self.skipped = SkipCounter()
        self.rows_seen = 0

    @property
    def columns(self) -> list[str]:
        return [IMAGE_ID, self.item, *(text_column(v) for v in self.views)]

    def visual(self, value, item_id) -> np.ndarray:
        """One row's item: pixels (CHW uint8) or its frames (T×D, T <= ``max_frames``), checked."""
        if self.item == IMAGE:
            return self.image_transform(decode_image(value, item_id), self.rng)
        try:
            frames = np.asarray([np.asarray(f, dtype=np.float32) for f in value], dtype=np.float32)
        except (ValueError, TypeError):
            raise BadRowError(f"row {item_id!r}: field 'features' is not a T×D matrix", "bad_features") from None
        if frames.ndim != 2 or not len(frames) or (self.feature_dim and frames.shape[1] != self.feature_dim):
            raise BadRowError(f"row {item_id!r}: field 'features' has shape {frames.shape}, expected T×"
                              f"{self.feature_dim or 'D'}", "bad_features")
        if not np.isfinite(frames).all():
            raise BadRowError(f"row {item_id!r}: field 'features' holds non-finite values", "bad_features")
        return frames[even_indices(len(frames), self.max_frames)]

    def view_captions(self, batch, i: int, item_id) -> list:
        """Row ``i``'s captions in each of ``views``, checked: usable and aligned (equal counts)."""
        lists = [batch[text_column(v)][i] for v in self.views]
        for v, caps in zip(self.views, lists):
            reason = captions_problem(caps)
            if reason or caps is None or not len(caps):
                raise BadRowError(f"row {item_id!r}: field {text_column(v)!r} has no usable caption "
                                  f"({reason or 'empty'})", reason or "missing_view_caption")
        if len({len(c) for c in lists}) != 1:
            raise BadRowError(f"row {item_id!r}: its views have {[len(c) for c in lists]} captions, not aligned",
                              "missing_view_caption")
        return lists

    def _captions(self, batch, i: int, item_id) -> list[str]:
        """One caption of the row in every view, the same k in each."""
        lists = self.view_captions(batch, i, item_id)
        n = len(lists[0])
        if self.caption_passes > 1 and "_cycle" in batch:
            k = caption_index(int(batch["_epoch"][i]), int(batch["_key"][i]), int(batch["_cycle"][i])) % n
        else:
            k = int(self.rng.integers(n)) if self.rng is not None else 0
        return [str(c[k]) for c in lists]

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch[IMAGE_ID]
        self.rows_seen += len(ids)
        visuals, texts, kept = [], [], []
        for i, item_id in enumerate(ids):
            try:
                vis = self.visual(batch[self.item][i], item_id)
                caps = self._captions(batch, i, item_id)
            except BadRowError as exc:
                if self.on_bad_row == "raise":
                    raise
                self.skipped.add(exc.reason, item_id)
                continue
            visuals.append(vis)
            texts.append(caps)
            kept.append(i)
        out = self.stack(visuals)
        for j, view in enumerate(self.views):
            if texts:
                out[f"{view}_ids"], out[f"{view}_mask"] = self.tokenize([t[j] for t in texts])
            else:
                out[f"{view}_ids"] = out[f"{view}_mask"] = np.zeros((0, self.tokenize.max_length), dtype=np.int64)
        for col in batch:
            if col.startswith("_"):
                out[col] = np.asarray(batch[col])[np.asarray(kept, dtype=np.int64)]
        return out

    def stack(self, visuals: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Items as one array: ``visual`` B×``max_frames``×D with ``visual_mask`` (frames padded),
        or ``visual`` B×3×H×W."""
        if self.item == FEATURES:
            d = self.feature_dim or (visuals[0].shape[1] if visuals else 1)
            visual = np.zeros((len(visuals), self.max_frames, d), dtype=np.float32)
            mask = np.zeros((len(visuals), self.max_frames), dtype=np.int64)
            for j, frames in enumerate(visuals):
                visual[j, :len(frames)], mask[j, :len(frames)] = frames, 1
            return {"visual": visual, "visual_mask": mask}
        size = self.image_transform.image_size
        return {"visual": np.stack(visuals) if visuals else np.zeros((0, 3, size, size), dtype=np.uint8)}


def load_nrccr_split(uri: str, tokenizer, *, views: Sequence[str] = QUERY_VIEWS, max_frames: int = 1,
                     feature_dim: int | None = None, image_transform: ImageTransform | None = None,
                     endpoint_url: str | None = None, on_bad_row: str = "raise") -> dict:
    """A whole (validation / test sized) NRCCR split, local or ``s3://``, in id order: ``visual``
    (+ ``visual_mask``) per item, and every caption of each of ``views`` tokenised (``<view>_ids``,
    ``<view>_mask``, Q×L, the views aligned caption by caption) with ``owner`` (Q: its item's
    index). Bad rows raise, or are skipped and counted (``skipped``)."""
    fs, files = storage.list_parquet(uri, endpoint_url)
    first = pq.ParquetFile(fs.open_input_file(files[0])).schema_arrow
    item = item_column(first)
    for f in files:
        check_nrccr_schema(pq.ParquetFile(fs.open_input_file(f)).schema_arrow, views, item, f)
    rows = NRCCRBatchTransform(tokenizer, views=views, item=item, max_frames=max_frames, feature_dim=feature_dim,
                               image_transform=image_transform, on_bad_row=on_bad_row)
    table = pq.read_table(files, filesystem=fs, columns=rows.columns).sort_by(IMAGE_ID)
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    visuals, kept, texts, owner = [], [], {v: [] for v in views}, []
    for i, item_id in enumerate(batch[IMAGE_ID]):
        try:
            vis = rows.visual(batch[item][i], item_id)
            lists = rows.view_captions(batch, i, item_id)
        except BadRowError as exc:
            if on_bad_row == "raise":
                raise
            rows.skipped.add(exc.reason, item_id)
            continue
        for v, caps in zip(views, lists):
            texts[v] += [str(c) for c in caps]
        owner += [len(kept)] * len(lists[0])
        visuals.append(vis)
        kept.append(str(item_id))
    if not kept:
        raise DataError(f"{uri}: no usable rows ({rows.skipped.summary()})")
    out = {IMAGE_ID: np.asarray(kept, dtype=object), "owner": np.asarray(owner, dtype=np.int64),
           "skipped": dict(rows.skipped.counts), **rows.stack(visuals)}
    for v in views:
        out[f"{v}_ids"], out[f"{v}_mask"] = tokenizer(texts[v])
    return out
