"""Convert real image–caption data sets into the ccrk-ray parquet schema (``ccrk_ray.data.schema``).

One output row per image: ``image_id``, ``image`` (the image file's bytes exactly as stored),
one ``captions_<lang>`` list per language, ``split`` and ``source``. Input formats:

``ccrk``      CCRK/CCLM pre-training JSON lines: a base64 image (``image``/``binary``/``img``) and a
              caption object keyed by language (``{"caption": {"en": "..", "de": [".."]}}``, or a
              list of such objects), plus ``image_id``/``id`` when present (else the line number).
``iglue``     IGLUE xFlickr&CO and flickr30k ``*_ann.jsonl``: per-language JSON lines
              ``{"sentences": [..], "id": .., "img_path": ..}``, merged by id across languages;
              images read from image folders by the basename of ``img_path``.
``multi30k``  Multi30K task1: aligned per-language text files (``{split}.{lang}[.gz]``, the
              Portuguese ``pt`` extension too) and the split's image list; line i = image i.
``coco``      COCO Karpathy-style JSON (train: one entry per caption; val/test: a caption list per
              image) in one language (also the official ``{"images", "annotations"}`` layout).
``wit``       IGLUE WIT retrieval JSON lines, one caption per line, grouped by image; rows with
              base64 pixels (``image_content`` as IGLUE/CCLM ship it, or ``b64_bytes``) are
              converted, rows with only an ``image_url`` are skipped as ``missing_image``. Nothing
              is ever downloaded.

Every converter streams its images (annotations, which are small text, may be held), writes shards
through ``ShardWriter`` (atomic renames, ``_SUCCESS.json``, idempotent re-runs) and checks each row
with ``ccrk_ray.data.rows``: bad rows are skipped and counted by reason, never silently dropped.

Pure Python + pyarrow + Pillow + tqdm: no Ray, no torch.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import gzip
import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ccrk_ray.core.config import ConfigError
from ccrk_ray.data.schema import IMAGE, IMAGE_ID, ROW_GROUP_ROWS, SOURCE, SPLIT, arrow_schema, caption_column
from ccrk_ray.data.rows import SkipCounter, captions_problem, image_problem
from ccrk_ray.core.languages import CCRK_LANGUAGES, validate_languages
from ccrk_ray.core.log import get_logger, progress

log = get_logger(__name__)

__all__ = [
    "FORMATS",
    "SUCCESS_FILE",
    "ConvertResult",
    "ShardWriter",
    "convert_ccrk",
    "convert_iglue",
    "convert_multi30k",
    "multi30k_files",
    "convert_coco",
    "convert_wit",
]

FORMATS = ("ccrk", "iglue", "multi30k", "coco", "wit", "xtd10", "xtd200", "flickr30k-200", "xm3600")
SUCCESS_FILE = "_SUCCESS.json"
_SHARD_RE = re.compile(r"part-(\d{5})\.parquet")
# Everything a ShardWriter may leave behind; nothing else in the folder is ever touched.
_OWN_RE = re.compile(r"part-\d{5}\.parquet|\.part-\d{5}\.parquet\.tmp|_SUCCESS\.json|\._SUCCESS\.json\.tmp")
_MB = 1024 * 1024

# Field names accepted per format (first present wins).
CCRK_IMAGE_FIELDS = ("image", "binary", "img")
CCRK_CAPTION_FIELDS = ("caption", "captions")
CCRK_ID_FIELDS = ("image_id", "id")
WIT_IMAGE_FIELDS = ("image_content", "b64_bytes")
WIT_CAPTION_FIELD = "caption_reference_description"


# ---------------------------------------------------------------------------------------------
# Results and the shard writer
# ---------------------------------------------------------------------------------------------


@dataclass
class ConvertResult:
    """What one conversion produced. ``already_done``: an identical earlier run was found and
    nothing was written (the counts are that run's, read from its ``_SUCCESS.json``)."""

    rows_written: int
    skipped: SkipCounter
    shards: list[Path]
    out_dir: Path
    already_done: bool = False
    ignored_languages: dict[str, int] = field(default_factory=dict)

    def summary(self, name: str = "convert") -> str:
        n = len(self.shards)
        rows = self.rows_written
        line = (f"{name}: {rows} row{'s' * (rows != 1)} written to {n} shard{'s' * (n != 1)} in {self.out_dir}; "
                f"{self.skipped.summary()}")
        if self.ignored_languages:
            line += "; captions in languages not converted: " + ", ".join(
                f"{lang}: {k}" for lang, k in sorted(self.ignored_languages.items()))
        return line


def _check_languages(languages: Iterable[str], what: str = "languages") -> tuple[str, ...]:
    try:
        return validate_languages(languages, known=None)
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def _as_caption_list(value: Any) -> list | None:
    """A language's captions as a list (None / [] = no caption in that language)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, bytearray)):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]          # a number, a dict ...: caption_problem calls it non_string_caption


def _encoding_problem(captions: Sequence[Any]) -> str | None:
    """str captions holding lone surrogates (undecodable bytes read with surrogateescape, or a
    ``\\udXXX`` JSON escape) are not UTF-8 text: parquet cannot store them."""
    for c in captions:
        if isinstance(c, str):
            try:
                c.encode("utf-8")
            except UnicodeEncodeError:
                return "invalid_utf8"
    return None


class ShardWriter:
    """Stream rows into ``out_dir/part-00000.parquet``, ``part-00001.parquet`` … (schema
    ``arrow_schema(languages)``), holding one shard in memory at a time.

    Use as a context manager. A shard is written to ``.part-NNNNN.parquet.tmp`` in the same folder
    and renamed with ``os.replace`` once complete, so ``*.parquet`` never matches a half-written
    file. A shard closes at ``rows_per_shard`` rows, or — when ``target_shard_mb`` is given, which
    then replaces the row limit — once its image and caption bytes reach about that many MB.

    On a clean exit ``_SUCCESS.json`` records the rows written, the rows skipped by reason (with
    example ids), the shards and the arguments. On entry: if ``_SUCCESS.json`` holds the same
    arguments and its shards are all there, nothing is done (``already_done``; ``result`` is the
    earlier run's); otherwise this writer's own files of an earlier run (``part-*.parquet``, temp
    files, ``_SUCCESS.json``) are removed and the conversion starts over. Other files are left alone.
    On an exception the temp file is removed and no ``_SUCCESS.json`` is written. ``arguments``
    should identify the input (the converters pass their input paths, sizes and mtimes and their
    options); the writer adds its own settings. Without it only the writer's settings are compared.

    ``write`` checks each row (duplicate id, missing image, captions, languages, image decode) and
    skips bad ones into ``skipped`` (a ``SkipCounter``). A row needs a caption in at least one
    language, and in every language of ``required_languages``. Captions in languages not in
    ``languages`` are dropped (counted in ``ignored_languages`` for the rows written).
    """

    def __init__(self, out_dir: str | os.PathLike, languages: Sequence[str], *, rows_per_shard: int = 1000,
                 target_shard_mb: float | None = None, split: str | None = None, source: str | None = None,
                 required_languages: Sequence[str] = (), arguments: Mapping[str, Any] | None = None,
                 name: str = "convert"):
        self.out_dir = Path(out_dir)
        self.languages = _check_languages(languages)
        if isinstance(rows_per_shard, bool) or not isinstance(rows_per_shard, int) or rows_per_shard < 1:
            raise ConfigError(f"rows per shard must be an integer >= 1, got {rows_per_shard!r}")
        if target_shard_mb is not None:
            ok = isinstance(target_shard_mb, (int, float)) and not isinstance(target_shard_mb, bool)
            if not ok or not target_shard_mb > 0:
                raise ConfigError(f"shard size in MB must be a number > 0, got {target_shard_mb!r}")
        for label, value in (("split", split), ("source", source)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{label} must be a non-empty string, got {value!r}")
        required = tuple(required_languages or ())
        missing = [lang for lang in required if lang not in self.languages]
        if missing:
            raise ConfigError(f"required language(s) {', '.join(missing)} not among the converted languages "
                              f"{', '.join(self.languages)}")
        self.rows_per_shard = None if target_shard_mb is not None else rows_per_shard
        self.target_bytes = None if target_shard_mb is None else int(float(target_shard_mb) * _MB)
        self.split, self.source, self.required_languages, self.name = split, source, required, name
        self.schema = arrow_schema(self.languages)
        self._lang_set = frozenset(self.languages)
        self.arguments = _jsonable({
            "converter": name, "arguments": dict(arguments or {}),
            "writer": {"languages": list(self.languages), "rows_per_shard": self.rows_per_shard,
                       "target_shard_mb": target_shard_mb, "split": split, "source": source,
                       "required_languages": list(required)}})
        self.skipped = SkipCounter()
        self.ignored_languages: Counter[str] = Counter()
        self.rows_written = 0
        self.shards: list[Path] = []
        self._shard_info: list[dict] = []
        self.already_done = False
        self.result: ConvertResult | None = None
        self._seen: set[bytes] = set()
        self._tmp: Path | None = None
        self._entered = False
        self._reset_buffer()

    # -- context ------------------------------------------------------------------------------

    def __enter__(self) -> "ShardWriter":
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ConfigError(f"output {self.out_dir} exists and is not a directory")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._entered = True
        earlier = self._read_success()
        if earlier is not None and self._matches(earlier):
            self.already_done = True
            self.result = self._result_from(earlier)
            n = len(self.result.shards)
            log.info(f"{self.name}: {self.out_dir} already holds this conversion ({self.result.rows_written} rows in "
                     f"{n} shard{'s' * (n != 1)}, see {SUCCESS_FILE}); nothing to do")
            return self
        own = sorted(p for p in self.out_dir.iterdir() if _OWN_RE.fullmatch(p.name) and p.is_file())
        if own:
            why = ("its arguments differ" if earlier is not None else "it did not finish (no " + SUCCESS_FILE + ")")
            log.info(f"{self.name}: removing {len(own)} file(s) of an earlier run in {self.out_dir} ({why}); "
                     "starting over")
            for p in own:
                p.unlink()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.already_done:
            return False
        if exc_type is not None:
            self._remove_tmp()
            self._reset_buffer()
            return False
        self._flush(force=not self.shards)   # an empty conversion still gets one (empty) shard
        record = {
            "arguments": self.arguments,
            "rows_written": self.rows_written,
            "rows_skipped": self.skipped.total,
            "skipped": self.skipped.as_dict(),
            "skipped_examples": {r: list(ids) for r, ids in self.skipped.example_ids.items()},
            "ignored_languages": dict(self.ignored_languages),
            "shards": self._shard_info,
            "languages": list(self.languages),
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        tmp = self.out_dir / f".{SUCCESS_FILE}.tmp"
        tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, self.out_dir / SUCCESS_FILE)
        self.result = ConvertResult(self.rows_written, self.skipped, list(self.shards), self.out_dir,
                                    ignored_languages=dict(self.ignored_languages))
        log.info(self.result.summary(self.name))
        return False

    # -- rows ---------------------------------------------------------------------------------

    def skip(self, reason: str, image_id: Any) -> None:
        """Count a row the converter itself rejected (e.g. ``missing_image``)."""
        self.skipped.add(reason, image_id)

    def write(self, image_id: Any, image_bytes: bytes | None, captions: Mapping[str, Any]) -> bool:
        """Add one row; False (and counted in ``skipped``) when the row is bad.

        ``image_bytes`` None = the image is absent (``missing_image``). ``captions`` maps language →
        a caption or a list of captions (str, or UTF-8 bytes, which are decoded).
        """
        if not self._entered or self.already_done:
            raise RuntimeError("ShardWriter.write needs an open writer (use it as a context manager; "
                               "nothing may be written when already_done)")
        image_id = str(image_id)
        try:
            key = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
        except UnicodeEncodeError:
            self.skipped.add("invalid_utf8", image_id.encode("utf-8", "backslashreplace").decode("ascii"))
            return False
        if key in self._seen:
            self.skipped.add("duplicate_id", image_id)
            return False
        self._seen.add(key)
        if image_bytes is None:
            self.skipped.add("missing_image", image_id)
            return False
        row: dict[str, list[str]] = {}
        ignored: dict[str, int] = {}
        for lang, value in captions.items():
            caps = _as_caption_list(value)
            if not caps:
                continue
            if lang not in self._lang_set:
                ignored[lang] = ignored.get(lang, 0) + len(caps)
                continue
            reason = captions_problem(caps) or _encoding_problem(caps)
            if reason:
                self.skipped.add(reason, image_id)
                return False
            row[lang] = [bytes(c).decode("utf-8") if isinstance(c, (bytes, bytearray)) else c for c in caps]
        if not row or any(lang not in row for lang in self.required_languages):
            self.skipped.add("missing_language", image_id)
            return False
        image_bytes = bytes(image_bytes)
        reason = image_problem(image_bytes)
        if reason:
            self.skipped.add(reason, image_id)
            return False
        self.ignored_languages.update(ignored)
        buf = self._buf
        buf[IMAGE_ID].append(image_id)
        buf[IMAGE].append(image_bytes)
        for lang in self.languages:
            buf[caption_column(lang)].append(row.get(lang))
        self._buf_rows += 1
        self._buf_bytes += len(image_bytes) + len(image_id) + sum(len(c) for caps in row.values() for c in caps)
        self.rows_written += 1
        if ((self.rows_per_shard is not None and self._buf_rows >= self.rows_per_shard)
                or (self.target_bytes is not None and self._buf_bytes >= self.target_bytes)):
            self._flush()
        return True

    # -- internals ----------------------------------------------------------------------------

    def _reset_buffer(self) -> None:
        self._buf: dict[str, list] = {IMAGE_ID: [], IMAGE: []}
        self._buf.update({caption_column(lang): [] for lang in self.languages})
        self._buf_rows = 0
        self._buf_bytes = 0

    def _flush(self, force: bool = False) -> None:
        if self._buf_rows == 0 and not force:
            return
        n = self._buf_rows
        cols = dict(self._buf)
        cols[SPLIT] = [self.split] * n
        cols[SOURCE] = [self.source] * n
        table = pa.Table.from_pydict(cols, schema=self.schema)
        self._reset_buffer()
        index = len(self.shards)
        final = self.out_dir / f"part-{index:05d}.parquet"
        self._tmp = self.out_dir / f".part-{index:05d}.parquet.tmp"
        pq.write_table(table, self._tmp, compression="snappy", use_dictionary=[SPLIT, SOURCE],
                       row_group_size=ROW_GROUP_ROWS)
        del table
        with open(self._tmp, "rb") as f:    # durable before it becomes visible
            os.fsync(f.fileno())
        os.replace(self._tmp, final)
        self._tmp = None
        self.shards.append(final)
        self._shard_info.append({"name": final.name, "rows": n, "bytes": final.stat().st_size})

    def _remove_tmp(self) -> None:
        if self._tmp is not None:
            try:
                self._tmp.unlink()
            except FileNotFoundError:
                pass
            self._tmp = None

    def _read_success(self) -> dict | None:
        path = self.out_dir / SUCCESS_FILE
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return record if isinstance(record, dict) else {}

    def _matches(self, record: dict) -> bool:
        if record.get("arguments") != self.arguments:
            return False
        shards = record.get("shards")
        if not isinstance(shards, list):
            return False
        if not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in shards):
            return False
        on_disk = {p.name: p for p in self.out_dir.iterdir() if _SHARD_RE.fullmatch(p.name)}
        if {s["name"] for s in shards} != set(on_disk) or len(shards) != len(on_disk):
            return False
        return all(on_disk[s["name"]].stat().st_size == s.get("bytes") for s in shards)

    def _result_from(self, record: dict) -> ConvertResult:
        skipped = SkipCounter()
        for reason, n in (record.get("skipped") or {}).items():
            skipped.counts[reason] = n
        skipped.example_ids = {r: list(ids) for r, ids in (record.get("skipped_examples") or {}).items()}
        shards = [self.out_dir / s["name"] for s in record["shards"]]
        return ConvertResult(int(record.get("rows_written", 0)), skipped, shards, self.out_dir,
                             already_done=True, ignored_languages=dict(record.get("ignored_languages") or {}))


# ---------------------------------------------------------------------------------------------
# Input helpers
# ---------------------------------------------------------------------------------------------


def _progress(iterable: Iterable, total: int | None, desc: str) -> Iterable:
    return progress(iterable, total=total, desc=desc, unit="row")


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist" if not p.exists() else f"{what} {p} is not a file")
    return p.resolve()


def _existing_dirs(paths: str | os.PathLike | Sequence[str | os.PathLike] | None, what: str) -> list[Path]:
    if paths is None:
        return []
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out = []
    for item in items:
        p = Path(item).expanduser()
        if not p.is_dir():
            raise ConfigError(f"{what} {p} does not exist" if not p.exists() else f"{what} {p} is not a folder")
        out.append(p.resolve())
    if not out:
        raise ConfigError(f"no {what} given")
    return out


def _file_list(paths: str | os.PathLike | Sequence[str | os.PathLike], what: str) -> list[Path]:
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise ConfigError(f"no {what} given")
    return [_existing_file(p, what) for p in items]


def _lang_files(mapping: Mapping[str, Any], what: str) -> dict[str, list[Path]]:
    if not isinstance(mapping, Mapping) or not mapping:
        raise ConfigError(f"{what}: expected a mapping language -> file(s), got {mapping!r}")
    langs = _check_languages(list(mapping), what)
    return {lang: _file_list(mapping[lang], f"{what} ({lang})") for lang in langs}


def _fingerprint(paths: Iterable[Path]) -> list[list]:
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _strip_newline(line: bytes) -> bytes:
    if line.endswith(b"\n"):
        line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
    return line


def _parse_json_line(raw: bytes, path: Path, lineno: int) -> Any:
    # surrogateescape keeps undecodable bytes (they surface as invalid_utf8, not as a crash)
    try:
        return json.loads(raw.decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None


def _json_lines(path: Path, with_offsets: bool = False) -> Iterator[tuple]:
    """(lineno, record) or (lineno, offset, record) for each non-blank line of a JSON-lines file."""
    with _open_binary(path) as f:
        lineno = 0
        while True:
            offset = f.tell() if with_offsets else 0
            line = f.readline()
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            record = _parse_json_line(line, path, lineno)
            yield (lineno, offset, record) if with_offsets else (lineno, record)


def _count_lines(path: Path) -> int:
    n, last = 0, b"\n"
    with _open_binary(path) as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def _decode_b64(value: Any) -> Any:
    """Bytes of a base64 image field; b"" when it does not decode (image_problem → corrupt_image),
    the value itself when it is not a string (image_problem → corrupt_image too)."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii", "replace")
    if not isinstance(value, str):
        return value
    if value.startswith("data:") and "," in value[:100]:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value)
    except (binascii.Error, ValueError):
        return b""


def _find_image(roots: Sequence[Path], rel: str | None, fallback_names: Sequence[str] = ()) -> Path | None:
    """The first existing file among root/rel, root/basename(rel), root/<fallback name>."""
    names: list[str] = []
    if rel:
        rel = str(rel).replace("\\", "/")
        names += [rel.lstrip("/"), rel.rsplit("/", 1)[-1]]
    names += list(fallback_names)
    for root in roots:
        for name in dict.fromkeys(n for n in names if n and ".." not in Path(n).parts):
            p = root / name
            if p.is_file():
                return p
    return None


def _writer(out_dir, languages, name: str, arguments: dict, writer_opts: dict) -> ShardWriter:
    opts = dict(writer_opts)
    unknown = set(opts) - {"rows_per_shard", "target_shard_mb", "split", "source", "required_languages"}
    if unknown:
        raise TypeError(f"convert_{name}: unexpected keyword argument(s) {', '.join(sorted(unknown))}")
    opts.setdefault("source", name)
    if opts.get("rows_per_shard") is None:
        opts.pop("rows_per_shard", None)
    return ShardWriter(out_dir, languages, arguments=arguments, name=f"convert {name}", **opts)


# ---------------------------------------------------------------------------------------------
# ccrk: CCRK/CCLM pre-training JSON lines with base64 images
# ---------------------------------------------------------------------------------------------


def _ccrk_captions(value: Any) -> dict[str, list] | None:
    """{lang: [captions]} from ``{"en": "..", "de": [..]}`` or a list of such objects; None when the
    value carries no language (a bare string, a number …)."""
    objs = value if isinstance(value, list) else [value]
    if not objs or not all(isinstance(o, dict) for o in objs):
        return None
    out: dict[str, list] = {}
    for obj in objs:
        for lang, caps in obj.items():
            lst = _as_caption_list(caps)
            if lst is None and caps is None:
                lst = [None]                  # an explicit null caption is a bad caption, not "absent"
            out.setdefault(str(lang), []).extend(lst or [])
    return out


def convert_ccrk(paths: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                 languages: Sequence[str] = CCRK_LANGUAGES, image_field: str | None = None,
                 caption_field: str | None = None, id_field: str | None = None, **writer_opts) -> ConvertResult:
    """CCRK/CCLM pre-training JSON lines → parquet shards.

    Each line: a base64 image in ``image_field`` (default: the first of ``image``, ``binary``,
    ``img``), captions in ``caption_field`` (default ``caption`` or ``captions``) keyed by language
    (a string or a list of strings per language, or a list of such objects), and an id in
    ``id_field`` (default ``image_id`` or ``id``; without one, the line number — ``<file name>:<line>``
    when several files are given). ``languages``: the caption columns written (captions in other
    languages are dropped and counted). ``writer_opts``: see ``ShardWriter``.
    """
    files = _file_list(paths, "ccrk input file")
    langs = _check_languages(languages)
    args = {"inputs": [str(p) for p in files], "image_field": image_field, "caption_field": caption_field,
            "id_field": id_field, "input_files": _fingerprint(files)}
    with _writer(out_dir, langs, "ccrk", args, writer_opts) as w:
        if w.already_done:
            return w.result
        for path in files:
            for lineno, rec in _progress(_json_lines(path), None, f"ccrk {path.name}"):
                row_id = f"{lineno}" if len(files) == 1 else f"{path.name}:{lineno}"
                if not isinstance(rec, dict):
                    raise ConfigError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                if id_field is not None:
                    if rec.get(id_field) is not None:
                        row_id = rec[id_field]
                else:
                    row_id = next((rec[k] for k in CCRK_ID_FIELDS if rec.get(k) is not None), row_id)
                ifield = image_field or next((k for k in CCRK_IMAGE_FIELDS if k in rec), None)
                image = rec.get(ifield) if ifield else None
                image = None if image is None else _decode_b64(image)
                cfield = caption_field or next((k for k in CCRK_CAPTION_FIELDS if k in rec), None)
                caps = _ccrk_captions(rec.get(cfield)) if cfield else None
                w.write(row_id, image, caps or {})
    return w.result


# ---------------------------------------------------------------------------------------------
# iglue: xFlickr&CO / flickr30k per-language JSON lines + an image folder
# ---------------------------------------------------------------------------------------------


def convert_iglue(annotations: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]],
                  image_root: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  **writer_opts) -> ConvertResult:
    """IGLUE xFlickr&CO (``annotations/{lang}/{split}.jsonl``) or flickr30k ``*_ann.jsonl`` → shards.

    ``annotations``: language → annotation file(s). Lines ``{"sentences": [...], "id": ...,
    "img_path": ...}`` (``caption``/``captions`` and ``image``/``image_id`` are accepted too) are
    merged by ``str(id)`` across languages: one row per image, in order of first appearance, with
    a ``captions_<lang>`` column per language (null where a language lacks the image). The same id
    twice within one language is a ``duplicate_id`` (the first is kept). Images: the first of
    ``root/img_path``, ``root/basename(img_path)`` (or ``root/<id>.jpg`` without an img_path) over
    the folder(s) ``image_root``; absent → ``missing_image``. Only annotations are held in memory.
    """
    ann = _lang_files(annotations, "iglue annotations")
    roots = _existing_dirs(image_root, "image folder")
    all_files = [p for files in ann.values() for p in files]
    args = {"annotations": {lang: [str(p) for p in files] for lang, files in ann.items()},
            "image_root": [str(r) for r in roots], "input_files": _fingerprint(all_files)}
    with _writer(out_dir, list(ann), "iglue", args, writer_opts) as w:
        if w.already_done:
            return w.result
        entries: dict[str, list] = {}           # id -> [img_path, {lang: captions}]
        for lang, files in ann.items():
            for path in files:
                for lineno, rec in _json_lines(path):
                    if not isinstance(rec, dict):
                        raise ConfigError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                    img_path = rec.get("img_path", rec.get("image"))
                    raw_id = rec.get("id", rec.get("image_id"))
                    if raw_id is None:
                        if not img_path:
                            raise ConfigError(f"{path}:{lineno}: neither an id nor an img_path")
                        raw_id = Path(str(img_path)).stem
                    iid = str(raw_id)
                    caps = next((rec[k] for k in ("sentences", "captions", "caption") if k in rec), None)
                    entry = entries.setdefault(iid, [img_path, {}])
                    if lang in entry[1]:
                        w.skip("duplicate_id", iid)
                        continue
                    entry[1][lang] = caps
        for iid, (img_path, caps) in _progress(entries.items(), len(entries), "iglue"):
            exts = () if img_path else tuple(f"{iid}{e}" for e in ("", ".jpg", ".jpeg", ".png", ".webp"))
            found = _find_image(roots, str(img_path) if img_path else None, exts)
            w.write(iid, found.read_bytes() if found else None, caps)
    return w.result


# ---------------------------------------------------------------------------------------------
# multi30k: aligned text files + the split's image list
# ---------------------------------------------------------------------------------------------


def multi30k_files(task1_dir: str | os.PathLike, split: str, languages: Sequence[str]
                   ) -> tuple[dict[str, Path], Path]:
    """The caption files ``raw/{split}.{lang}.gz`` (or plain) and ``image_splits/{split}.txt`` of a
    Multi30K ``data/task1`` folder (also a framed-multi30k ``task1`` folder for ``pt``)."""
    root = Path(task1_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"multi30k task1 folder {root} does not exist")
    captions = {}
    for lang in _check_languages(languages):
        gz, plain = root / "raw" / f"{split}.{lang}.gz", root / "raw" / f"{split}.{lang}"
        captions[lang] = gz if gz.is_file() else plain if plain.is_file() else gz
        if not captions[lang].is_file():
            raise ConfigError(f"multi30k caption file {gz} (or {plain.name}) does not exist")
    image_list = root / "image_splits" / f"{split}.txt"
    if not image_list.is_file():
        raise ConfigError(f"multi30k image list {image_list} does not exist")
    return captions, image_list


def convert_multi30k(captions: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]],
                     image_list: str | os.PathLike,
                     image_root: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                     *, name: str = "multi30k", **writer_opts) -> ConvertResult:
    """Multi30K → shards. ``captions``: language → one text file (``.gz`` or plain; task1's
    ``raw/val.en.gz``, framed-multi30k's ``raw/val.pt.gz``) or several aligned files, one caption of
    each image in each (task2's ``raw/test_2016.{1..5}.en.gz``: 5 captions); ``image_list``: the split's
    ``image_splits/{split}.txt``. Line i of every file belongs to image i; all files must have as
    many lines as the image list (ConfigError naming the file and both counts, before anything is
    written). Lines are taken as bytes minus the line ending and decoded as UTF-8 (bad bytes →
    ``invalid_utf8``, empty lines → ``empty_caption``). ``image_id`` = the image file name without
    extension (test_2017_mscoco's ``name.jpg#123`` → ``name``), the image = ``root/name.jpg``.
    XTD10, XTD200 and Flickr30k-200 have the same shape (``benchmark_files``); ``name`` is the
    format recorded in ``_SUCCESS.json``.
    """
    if not isinstance(captions, Mapping) or not captions:
        raise ConfigError(f"multi30k captions: expected a mapping language -> file, got {captions!r}")
    langs = _check_languages(list(captions), "multi30k captions")
    files = {lang: [_existing_file(p, f"multi30k caption file ({lang})")
                    for p in ([captions[lang]] if isinstance(captions[lang], (str, os.PathLike)) else captions[lang])]
             for lang in langs}
    names_path = _existing_file(image_list, "multi30k image list")
    roots = _existing_dirs(image_root, "image folder")
    n = _count_lines(names_path)
    for lang, paths in files.items():
        for path in paths:
            k = _count_lines(path)
            if k != n:
                raise ConfigError(f"multi30k caption file {path} ({lang}) has {k} lines but the image list "
                                  f"{names_path} has {n}: the files must align line by line")
    flat = [(lang, p) for lang, paths in files.items() for p in paths]
    args = {"captions": {lang: [str(p) for p in paths] if len(paths) > 1 else str(paths[0])
                         for lang, paths in files.items()},
            "image_list": str(names_path), "image_root": [str(r) for r in roots],
            "input_files": _fingerprint([names_path, *(p for _, p in flat)])}
    with _writer(out_dir, langs, name, args, writer_opts) as w:
        if w.already_done:
            return w.result
        handles = [_open_binary(names_path)] + [_open_binary(p) for _, p in flat]
        try:
            for i, lines in _progress(enumerate(zip(*handles)), n, name):
                name = _strip_newline(lines[0]).decode("utf-8", "replace").strip()
                file_name = name.split("#", 1)[0]
                iid = Path(file_name).stem if file_name else f"{names_path.name}:{i + 1}"
                found = _find_image(roots, file_name) if file_name else None
                caps: dict[str, list[bytes]] = {}
                for (lang, _), line in zip(flat, lines[1:]):
                    caps.setdefault(lang, []).append(_strip_newline(line))
                w.write(iid, found.read_bytes() if found else None, caps)
        finally:
            for h in handles:
                h.close()
    return w.result


# ---------------------------------------------------------------------------------------------
# XTD10, XTD200, Flickr30k-200: an image list and one aligned caption file per language, in the
# layouts CLIP_benchmark's loaders read (clip_benchmark/datasets/{xtd10,xtd200,flickr30k_200}.py)
# ---------------------------------------------------------------------------------------------

# name: (image list, caption file per language code, folders under the root holding caption files)
BENCHMARK_LAYOUTS = {
    # adobe-research/Cross-lingual-Test-Dataset-XTD10: XTD10/ (MIC/ for de and fr, STAIR/ for jp)
    "xtd10": ("test_image_names.txt", "test_1kcaptions_{}.txt", ("", "XTD10", "MIC", "STAIR")),
    # visheratin/nllb-clip data/xtd200 and data/flickr30k-200: FLORES-200 codes (eng_Latn, ...)
    "xtd200": ("test_image_names.txt", "{}.txt", ("",)),
    "flickr30k-200": ("filenames.txt", "{}.txt", ("",)),
}
# XTD10's file code for a language whose ccrk-ray code differs (CLIP_benchmark's "jp")
XTD10_FILE_CODES = {"ja": "jp"}


def benchmark_files(name: str, root: str | os.PathLike, languages: Sequence[str]) -> tuple[dict[str, Path], Path]:
    """(caption file per language, image list) of an XTD10 / XTD200 / Flickr30k-200 folder laid
    out as CLIP_benchmark downloads it: the image list and ``{code}`` caption files at the root (or,
    for XTD10, in its XTD10/, MIC/ and STAIR/ folders); images in ``root/images``. XTD10's
    Japanese file is ``test_1kcaptions_jp.txt``: ``ja`` (or ``jp``) reads it, stored as ``ja``."""
    if name not in BENCHMARK_LAYOUTS:
        raise ConfigError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARK_LAYOUTS)}")
    listing, pattern, folders = BENCHMARK_LAYOUTS[name]
    base = Path(root).expanduser()
    if not base.is_dir():
        raise ConfigError(f"{name} folder {base} does not exist")

    def find(file_name: str) -> Path | None:
        return next((base / d / file_name for d in folders if (base / d / file_name).is_file()), None)

    image_list = find(listing)
    if image_list is None:
        raise ConfigError(f"{name}: no {listing} in {base} ({', '.join(str(base / d) for d in folders if d)})")
    captions = {}
    for lang in _check_languages(languages, f"{name} languages"):
        canonical = "ja" if lang == "jp" else lang
        code = XTD10_FILE_CODES.get(canonical, canonical) if name == "xtd10" else lang
        path = find(pattern.format(code))
        if path is None:
            raise ConfigError(f"{name}: no caption file {pattern.format(code)} for {lang} under {base}")
        captions[canonical] = path
    return captions, image_list


# ---------------------------------------------------------------------------------------------
# Crossmodal-3600: captions.jsonl (one line per image, every language's captions) + images
# ---------------------------------------------------------------------------------------------


def convert_xm3600(captions_file: str | os.PathLike, image_root: str | os.PathLike | Sequence[str | os.PathLike],
                   out_dir: str | os.PathLike, *, languages: Sequence[str], **writer_opts) -> ConvertResult:
    """Crossmodal-3600 → shards: ``captions.jsonl`` lines ``{"image/key": K, "<lang>": {"caption":
    [...]}, ...}`` (the file CLIP_benchmark's loader reads), images ``<root>/<K>.jpg``. Every caption
    of each language is kept (CLIP_benchmark keeps the first only; every caption counts here).
    ``image_id`` = the key. A line that is not JSON is an error naming file and line; a line
    without a key, or a language without captions, is counted by the writer's skip reasons."""
    path = _existing_file(captions_file, "crossmodal-3600 captions file")
    roots = _existing_dirs(image_root, "image folder")
    langs = _check_languages(languages, "crossmodal-3600 languages")
    args = {"captions": str(path), "image_root": [str(r) for r in roots], "languages": list(langs),
            "input_files": _fingerprint([path])}
    with _writer(out_dir, langs, "xm3600", args, writer_opts) as w:
        if w.already_done:
            return w.result
        for lineno, entry in _progress(_json_lines(path), _count_lines(path), "xm3600"):
            key = entry.get("image/key") if isinstance(entry, dict) else None
            iid = str(key) if key not in (None, "") else f"{path.name}:{lineno}"
            caps = {lang: _as_caption_list((entry.get(lang) or {}).get("caption"))
                    if isinstance(entry, dict) and isinstance(entry.get(lang), dict) else None for lang in langs}
            found = _find_image(roots, f"{key}.jpg") if key not in (None, "") else None
            w.write(iid, found.read_bytes() if found else None, {k: v for k, v in caps.items() if v})
    return w.result


# ---------------------------------------------------------------------------------------------
# coco: Karpathy-style JSON (one language per conversion)
# ---------------------------------------------------------------------------------------------


def _coco_entries(path: Path) -> Iterator[tuple[str, Any, Any]]:
    """(image path, image id or None, caption(s)) per entry of a Karpathy-style or official COCO file."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list):
        files = {img.get("id"): img.get("file_name") for img in data["images"] if isinstance(img, dict)}
        for k, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or ann.get("image_id") not in files:
                raise ConfigError(f"{path}: annotation {k} names no image of the file's 'images'")
            yield files[ann["image_id"]], ann["image_id"], ann.get("caption")
        return
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a JSON list of {{image, caption, image_id}} entries "
                          "(or a COCO {images, annotations} object)")
    for k, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"]:
            raise ConfigError(f"{path}: entry {k} has no 'image' path")
        yield entry["image"], entry.get("image_id"), entry.get("caption", entry.get("captions"))


def convert_coco(json_paths: str | os.PathLike | Sequence[str | os.PathLike],
                 image_root: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                 lang: str = "en", **writer_opts) -> ConvertResult:
    """COCO Karpathy-style JSON → shards, one caption column ``captions_<lang>``.

    Train files hold one ``{caption, image, image_id}`` per caption, val/test files one
    ``{image, caption: [...], image_id}`` per image (the ja/zh variants are the same shape; the
    official ``{"images", "annotations"}`` layout, as STAIR Captions ship it, is read too). Entries
    are grouped by ``image`` path in order of first appearance; ``image_id`` = the entry's
    ``image_id`` (as a string), else the image file name without extension. The image is the first
    of ``root/image`` and ``root/basename(image)``. The JSON is parsed whole (text only); images are
    read one at a time.
    """
    files = _file_list(json_paths, "coco annotation file")
    (lang,) = _check_languages([lang], "coco --lang")
    roots = _existing_dirs(image_root, "image folder")
    args = {"json": [str(p) for p in files], "lang": lang, "image_root": [str(r) for r in roots],
            "input_files": _fingerprint(files)}
    with _writer(out_dir, [lang], "coco", args, writer_opts) as w:
        if w.already_done:
            return w.result
        groups: dict[str, list] = {}            # image path -> [image_id, captions]
        for path in files:
            for image, image_id, caps in _coco_entries(path):
                g = groups.setdefault(image, [image_id, []])
                if g[0] is None:
                    g[0] = image_id
                if isinstance(caps, list):
                    g[1].extend(caps)
                else:
                    g[1].append(caps)
        for image, (image_id, caps) in _progress(groups.items(), len(groups), "coco"):
            iid = str(image_id) if image_id is not None else Path(image).stem
            found = _find_image(roots, image)
            w.write(iid, found.read_bytes() if found else None, {lang: caps})
    return w.result


# ---------------------------------------------------------------------------------------------
# wit: IGLUE WIT retrieval JSON lines (one caption per line; pixels only when base64 is present)
# ---------------------------------------------------------------------------------------------


def convert_wit(annotations: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]],
                out_dir: str | os.PathLike, *, image_field: str | None = None,
                caption_field: str = WIT_CAPTION_FIELD, **writer_opts) -> ConvertResult:
    """IGLUE WIT ``{split}_{lang}.jsonl`` → shards. ``annotations``: language → file(s).

    One line per caption (``caption_reference_description``); lines are grouped by ``image_url``
    (across languages too) into one row per image, ``image_id`` = ``wit_ix`` (else the URL). The
    image is base64 in ``image_field`` (default: the first of ``image_content`` — the field of the
    IGLUE WIT files with pixels, as CCLM reads them — and ``b64_bytes``) of any line of that image;
    an image with only a URL is skipped as ``missing_image`` (nothing is downloaded). Two passes:
    the first keeps captions and the byte offset of a line with pixels, the second reads each
    image's line again, so only one image is in memory at a time.
    """
    ann = _lang_files(annotations, "wit annotations")
    all_files = [p for files in ann.values() for p in files]
    fields = (image_field,) if image_field else WIT_IMAGE_FIELDS
    args = {"annotations": {lang: [str(p) for p in files] for lang, files in ann.items()},
            "image_field": image_field, "caption_field": caption_field, "input_files": _fingerprint(all_files)}
    with _writer(out_dir, list(ann), "wit", args, writer_opts) as w:
        if w.already_done:
            return w.result
        entries: dict[str, list] = {}           # image key -> [image_id, {lang: [captions]}, (file, offset, line)]
        for lang, files in ann.items():
            for path in files:
                for lineno, offset, rec in _json_lines(path, with_offsets=True):
                    if not isinstance(rec, dict):
                        raise ConfigError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                    url, wid = rec.get("image_url"), rec.get("wit_ix")
                    key = url or wid
                    if not key:
                        raise ConfigError(f"{path}:{lineno}: neither an image_url nor a wit_ix")
                    e = entries.setdefault(str(key), [wid if wid is not None else url, {}, None])
                    e[1].setdefault(lang, []).append(rec.get(caption_field))
                    if e[2] is None and any(rec.get(f) is not None for f in fields):
                        e[2] = (path, offset, lineno)
        handles: dict[Path, Any] = {}
        try:
            for key, (iid, caps, loc) in _progress(entries.items(), len(entries), "wit"):
                image = None
                if loc is not None:
                    path, offset, lineno = loc
                    f = handles.get(path) or handles.setdefault(path, _open_binary(path))
                    f.seek(offset)
                    rec = _parse_json_line(f.readline(), path, lineno)
                    image = _decode_b64(next((rec[k] for k in fields if rec.get(k) is not None), b""))
                w.write(iid, image, caps)
        finally:
            for h in handles.values():
                h.close()
    return w.result
