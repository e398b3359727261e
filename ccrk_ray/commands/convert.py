"""``ccrk convert FORMAT --out DIR ...``: a real image–caption data set into ccrk-ray parquet
shards (``ccrk_ray.data.converters`` documents each format)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from ccrk_ray.core import storage
from ccrk_ray.core.config import ConfigError
from ccrk_ray.core.languages import CCRK_LANGUAGES
from ccrk_ray.core.log import get_logger
from ccrk_ray.data.converters import (BENCHMARK_LAYOUTS, FORMATS, benchmark_files, convert_ccrk, convert_coco,
                                      convert_iglue, convert_multi30k, convert_wit, convert_xm3600, multi30k_files)
from ccrk_ray.data.nrccr import VIEW_TAGS, VIEWS, convert_nrccr

log = get_logger(__name__)


def _lang_file_arg(text: str) -> tuple[str, str]:
    lang, sep, path = text.partition("=")
    if not sep or not lang or not path:
        raise argparse.ArgumentTypeError(f"expected LANG=FILE, got {text!r}")
    return lang.strip(), path


def _lang_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR",
                   help="local output folder (new, empty, or an earlier conversion's); to put the shards in object "
                        "storage, upload the folder afterwards (e.g. aws s3 sync DIR s3://bucket/prefix)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--rows-per-shard", type=_positive_int, default=None, metavar="N",
                      help="rows per shard (default 1000)")
    size.add_argument("--shard-mb", type=_positive_float, default=None, metavar="MB",
                      help="approximate shard size in MB (instead of a row count)")
    p.add_argument("--split", default=None, metavar="S", help="value of the split column (e.g. train, val, test)")
    p.add_argument("--source", default=None, metavar="NAME",
                   help="value of the source column (default: the format name)")
    p.add_argument("--require-languages", type=_lang_list, default=(), metavar="LANGS",
                   help="comma-separated languages every row must have (others are skipped as missing_language)")


def add_arguments(convert: argparse.ArgumentParser) -> None:
    """One sub-command per format."""
    convert.description = ("Convert an image–caption data set into ccrk-ray parquet shards (one row per image). "
                           "Reads and writes local files; upload the output folder to object storage afterwards.")
    fmt = convert.add_subparsers(dest="format", required=True, metavar="FORMAT", parser_class=type(convert))

    p = fmt.add_parser("ccrk", help="CCRK/CCLM pre-training JSON lines with base64 images")
    p.add_argument("--input", action="append", required=True, metavar="FILE", help="JSON-lines file (repeatable)")
    p.add_argument("--languages", type=_lang_list, default=CCRK_LANGUAGES, metavar="LANGS",
                   help=f"comma-separated caption languages to keep (default: {','.join(CCRK_LANGUAGES)})")
    p.add_argument("--image-field", default=None, metavar="FIELD", help="default: image, binary or img")
    p.add_argument("--caption-field", default=None, metavar="FIELD", help="default: caption or captions")
    p.add_argument("--id-field", default=None, metavar="FIELD",
                   help="default: image_id or id, else the line number")
    _add_common(p)

    p = fmt.add_parser("iglue", help="IGLUE xFlickr&CO / flickr30k JSON lines + image folder(s)")
    p.add_argument("--ann", action="append", type=_lang_file_arg, default=[], metavar="LANG=FILE",
                   help="annotation file of one language (repeatable)")
    p.add_argument("--ann-dir", default=None, metavar="DIR",
                   help="xFlickrCO annotations folder: reads DIR/{lang}/{--name}.jsonl for each --languages")
    p.add_argument("--name", default="test", help="file name in --ann-dir (default: %(default)s)")
    p.add_argument("--languages", type=_lang_list, default=None, metavar="LANGS",
                   help="comma-separated, with --ann-dir")
    p.add_argument("--images", action="append", required=True, metavar="DIR", help="image folder (repeatable)")
    _add_common(p)

    p = fmt.add_parser("multi30k", help="Multi30K aligned caption files + image list + image folder(s)")
    p.add_argument("--captions", action="append", type=_lang_file_arg, default=[], metavar="LANG=FILE",
                   help="caption file of one language, e.g. pt=framed-multi30k-pt/.../val.pt.gz (repeatable; a "
                        "language given again adds a caption per image: task2's en=raw/test_2016.1.en.gz ... "
                        "en=raw/test_2016.5.en.gz)")
    p.add_argument("--image-list", default=None, metavar="FILE", help="image_splits/{split}.txt")
    p.add_argument("--task1", default=None, metavar="DIR",
                   help="multi30k data/task1 folder: reads raw/{--name}.{lang}.gz and image_splits/{--name}.txt")
    p.add_argument("--name", default=None, help="Multi30K split name with --task1, e.g. val, test_2016_flickr")
    p.add_argument("--languages", type=_lang_list, default=None, metavar="LANGS", help="comma-separated, with --task1")
    p.add_argument("--images", action="append", required=True, metavar="DIR", help="image folder (repeatable)")
    _add_common(p)

    for name, (listing, pattern, _) in BENCHMARK_LAYOUTS.items():
        p = fmt.add_parser(name, help=f"{name} as CLIP_benchmark lays it out: {listing}, {pattern.format('<lang>')} "
                                      "per language, images/")
        p.add_argument("--root", required=True, metavar="DIR",
                       help=f"the {name} folder (images in DIR/images unless --images)")
        p.add_argument("--languages", type=_lang_list, required=True, metavar="LANGS",
                       help="comma-separated codes as its files name them" + (
                           " (jp or ja: Japanese, stored as ja)" if name == "xtd10" else
                           " (FLORES-200: eng_Latn, jpn_Jpan, ...; kept as they are)"))
        p.add_argument("--images", action="append", default=None, metavar="DIR", help="image folder (repeatable)")
        _add_common(p)

    p = fmt.add_parser("xm3600", help="Crossmodal-3600 captions.jsonl (every caption of every language) + images")
    p.add_argument("--captions", required=True, metavar="FILE", help="captions.jsonl")
    p.add_argument("--images", action="append", required=True, metavar="DIR", help="folder of <image/key>.jpg")
    p.add_argument("--languages", type=_lang_list, required=True, metavar="LANGS", help="comma-separated, e.g. en,de,ja")
    _add_common(p)

    p = fmt.add_parser("coco", help="COCO Karpathy-style JSON (one language) + image folder(s)")
    p.add_argument("--json", action="append", required=True, metavar="FILE", help="annotation JSON (repeatable)")
    p.add_argument("--lang", required=True, metavar="LANG", help="language of the captions (en, ja, zh ...)")
    p.add_argument("--images", action="append", required=True, metavar="DIR",
                   help="image folder holding the entries' image paths (repeatable)")
    _add_common(p)

    p = fmt.add_parser("wit", help="IGLUE WIT JSON lines (base64 pixels; URL-only rows are skipped)")
    p.add_argument("--ann", action="append", type=_lang_file_arg, required=True, metavar="LANG=FILE",
                   help="annotation file of one language (repeatable)")
    p.add_argument("--image-field", default=None, metavar="FIELD", help="default: image_content or b64_bytes")
    _add_common(p)

    tags = ", ".join(f"{v}={t.format(xx='xx')}" for v, t in VIEW_TAGS.items())
    p = fmt.add_parser("nrccr", help="NRCCR's TextData caption views + FeatureData BigFile (or images), one split",
                       description="One split of NRCCR's layout into parquet: one row per item, the caption views "
                                   "aligned by (item, k), the item as features (T×D) or image bytes.")
    p.add_argument("--view", action="append", type=_lang_file_arg, required=True, metavar="VIEW=FILE",
                   help=f"a caption view and its TextData file (repeatable; the first is the key view). Views and "
                        f"the tags their caption ids carry: {tags}")
    p.add_argument("--language", required=True, metavar="XX", help="the target language (the xx of the tags)")
    p.add_argument("--split", required=True, metavar="S", help="value of the split column (train, val, test)")
    item = p.add_mutually_exclusive_group(required=True)
    item.add_argument("--features", metavar="DIR", help="FeatureData BigFile folder (feature.bin, id.txt, shape.txt)")
    item.add_argument("--images", metavar="DIR", help="folder of <item>.jpg/.png images (a model with an image tower)")
    p.add_argument("--video2frames", default=None, metavar="FILE",
                   help="video2frames.txt: the features are frames, grouped per video")
    p.add_argument("--max-frames", type=_positive_int, default=64, metavar="N",
                   help="frames kept per video, evenly spaced (default: %(default)s)")
    p.add_argument("--ids", default=None, metavar="FILE", help="the split's item id list (default: the key view's items)")
    p.add_argument("--rows-per-shard", type=_positive_int, default=1000, metavar="N", help="(default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR", help="local output folder")


def _grouped(pairs: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for lang, path in pairs:
        out.setdefault(lang, []).append(path)
    return out


def main(args: argparse.Namespace) -> int:
    """Run the conversion ``args`` describes. 0 when rows were written (or an identical earlier
    conversion was found), 1 when the conversion produced no rows. Bad input raises ConfigError
    with a one-line message. Inputs and output are local files: converting reads many small
    image files and writes shards atomically by renaming, which object storage does not offer, so
    a URI is refused before anything is read."""
    for name, value in vars(args).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            v = v[1] if isinstance(v, tuple) and len(v) == 2 else v     # LANG=FILE pairs
            if isinstance(v, str) and storage.is_remote(v):
                raise ConfigError(f"--{name.replace('_', '-')} {v}: ccrk convert reads and writes local files; "
                                  "convert to a local folder, then upload it (aws s3 sync DIR s3://...)")
    if args.format == "nrccr":
        return _nrccr(args)
    opts = {"rows_per_shard": args.rows_per_shard, "target_shard_mb": args.shard_mb, "split": args.split,
            "required_languages": tuple(args.require_languages or ())}
    if args.source is not None:
        opts["source"] = args.source
    fmt = args.format
    if fmt == "ccrk":
        result = convert_ccrk(args.input, args.out, languages=args.languages, image_field=args.image_field,
                              caption_field=args.caption_field, id_field=args.id_field, **opts)
    elif fmt == "iglue":
        ann = _grouped(args.ann)
        if args.ann_dir is not None:
            if not args.languages:
                raise ConfigError("iglue --ann-dir needs --languages")
            for lang in args.languages:
                ann.setdefault(lang, []).append(str(Path(args.ann_dir) / lang / f"{args.name}.jsonl"))
        if not ann:
            raise ConfigError("iglue needs --ann LANG=FILE or --ann-dir DIR --languages ...")
        result = convert_iglue(ann, args.images, args.out, **opts)
    elif fmt == "multi30k":
        captions: dict[str, list[str | Path]] = {}
        image_list = args.image_list
        if args.task1 is not None:
            if not args.name or not args.languages:
                raise ConfigError("multi30k --task1 needs --name (e.g. val) and --languages")
            caps, listed = multi30k_files(args.task1, args.name, args.languages)
            captions.update({lang: [path] for lang, path in caps.items()})
            image_list = image_list or listed
        for lang, path in args.captions:
            captions.setdefault(lang, []).append(path)
        if not captions or image_list is None:
            raise ConfigError("multi30k needs --captions LANG=FILE ... and --image-list FILE "
                              "(or --task1 DIR --name SPLIT --languages ...)")
        result = convert_multi30k(captions, image_list, args.images, args.out, **opts)
    elif fmt in BENCHMARK_LAYOUTS:
        captions, image_list = benchmark_files(fmt, args.root, args.languages)
        images = args.images or [str(Path(args.root) / "images")]
        result = convert_multi30k(captions, image_list, images, args.out, name=fmt, **opts)
    elif fmt == "xm3600":
        result = convert_xm3600(args.captions, args.images, args.out, languages=args.languages, **opts)
    elif fmt == "coco":
        result = convert_coco(args.json, args.images, args.out, lang=args.lang, **opts)
    elif fmt == "wit":
        result = convert_wit(_grouped(args.ann), args.out, image_field=args.image_field, **opts)
    else:  # pragma: no cover - argparse restricts the choices
        raise ConfigError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if result.rows_written == 0:
        log.error("convert %s: no rows written (see the skip reasons above)", fmt)
        return 1
    return 0


def _nrccr(args: argparse.Namespace) -> int:
    views: dict[str, str] = {}
    for view, path in args.view:
        if view not in VIEWS:
            raise ConfigError(f"--view {view}={path}: unknown view (known: {', '.join(VIEWS)})")
        if view in views:
            raise ConfigError(f"--view {view} given twice")
        views[view] = path
    summary = convert_nrccr(views, args.out, language=args.language, split=args.split, features=args.features,
                            video2frames=args.video2frames, images=args.images, ids=args.ids,
                            max_frames=args.max_frames, rows_per_shard=args.rows_per_shard)
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(summary["skipped"].items())) or "nothing"
    log.info("convert nrccr: %d items (%d captions) written to %d shard(s) in %s; skipped %s",
             summary["rows_written"], summary["captions_written"], len(summary["shards"]), args.out, skipped)
    if summary["rows_written"] == 0:
        log.error("convert nrccr: no rows written (see the skip counts above)")
        return 1
    return 0
