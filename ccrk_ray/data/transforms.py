"""Per-row work on image–caption rows as plain functions (no Ray): decode, augment, normalise,
choose the K languages of a row, tokenise. ``ccrk_ray.data.ingest`` wires these into Ray Data; any
other driver (a DataLoader, the evaluator) calls the same functions.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from ccrk_ray.core import storage
from ccrk_ray.data import schema
from ccrk_ray.data.rows import SUPPORTED_FORMATS, SkipCounter, captions_problem
from ccrk_ray.data.tokenizer import CaptionTokenizer

class BadRowError(ValueError):
    """A row that cannot be used, with the row's id and the field at fault in the message, and the
    skip reason (``ccrk_ray.data.rows.REASONS``) in ``.reason``."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def decode_image(data: bytes, image_id: str = "?") -> Image.Image:
    """Decode encoded JPEG/PNG/WebP bytes to an RGB PIL image."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # PIL raises several types for corrupt data
        raise BadRowError(f"row {image_id!r}: field {schema.IMAGE!r} is not a decodable image ({exc})",
                          "corrupt_image") from None
    if img.format not in SUPPORTED_FORMATS:
        raise BadRowError(f"row {image_id!r}: field {schema.IMAGE!r} is {img.format}, not one of "
                          f"{', '.join(SUPPORTED_FORMATS)}", "unsupported_image_format")
    return img.convert("RGB")


INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


@dataclass(frozen=True)
class ImageTransform:
    """Resize (eval) or random-resized-crop + optional flip (train) to CHW uint8.

    Pixels stay uint8 through the data path (4x less to move than float32); the model normalises
    them with its vision encoder's own mean/std (``CCRKModel.encode_image``).

    ``hflip_prob`` defaults to 0: flipping swaps "left" and "right" in the picture but not in the
    caption, which teaches the model the wrong thing on data whose captions say where things are.
    ``interpolation`` is the training crop's resampling; ``randaugment`` (ops, magnitude) applies
    torchvision's RandAugment after crop and flip, seeded from the same generator. ``resize``
    (evaluation): ``squash`` to the square (bicubic), or ``shortest``: the shorter side to the size,
    then the centre square (torchvision's Resize + CenterCrop, bicubic: open_clip's preprocessing).
    """

    image_size: int = 64
    train: bool = False
    scale: tuple[float, float] = (0.8, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.0
    interpolation: str = "bilinear"
    randaugment: tuple[int, int] | None = None
    resize: str = "squash"

    def __post_init__(self):
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 <= self.hflip_prob <= 1:
            raise ValueError(f"hflip_prob must be in [0, 1], got {self.hflip_prob}")
        if self.resize not in ("squash", "shortest"):
            raise ValueError(f"resize must be squash or shortest, got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.randaugment is not None and (len(self.randaugment) != 2 or self.randaugment[0] < 1
                                             or not 0 <= self.randaugment[1] <= 30):
            raise ValueError(f"randaugment must be [ops >= 1, magnitude in 0..30], got {list(self.randaugment)}")

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """The random-resized-crop box (left, top, right, bottom), as torchvision samples it."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left = int(rng.integers(0, width - w + 1))
                top = int(rng.integers(0, height - h + 1))
                return left, top, left + w, top + h
        return 0, 0, width, height

    def rand_augment(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        # optional: torch and torchvision load only in data actors of runs that ask for it (torch
        # alone adds seconds to every data actor's start and ~470 MB to its memory)
        import torch
        from torchvision.transforms import RandAugment

        ops, magnitude = self.randaugment
        with torch.random.fork_rng(devices=[]):        # RandAugment draws from torch's generator
            torch.manual_seed(int(rng.integers(2 ** 62)))
            return RandAugment(num_ops=int(ops), magnitude=int(magnitude))(img)

    def shortest_centre_crop(self, img: Image.Image) -> Image.Image:
        # torchvision's own functions, so that the pixels equal open_clip's preprocessing
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        img = TF.resize(img, self.image_size, interpolation=InterpolationMode.BICUBIC)
        return TF.center_crop(img, [self.image_size, self.image_size])

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        size = (self.image_size, self.image_size)
        if self.train:
            rng = rng if rng is not None else np.random.default_rng()
            img = img.resize(size, INTERPOLATIONS[self.interpolation], box=self.crop_box(img.width, img.height, rng))
            if self.hflip_prob and rng.random() < self.hflip_prob:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            if self.randaugment is not None:
                img = self.rand_augment(img, rng)
        elif self.resize == "shortest":
            img = self.shortest_centre_crop(img)
        elif img.size != size:
            img = img.resize(size, Image.BICUBIC)
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def image_key(image_id) -> int:
    """A stable signed 64-bit key of an image id (tensors cannot carry strings)."""
    return int.from_bytes(hashlib.blake2b(str(image_id).encode(), digest_size=8).digest(), "little", signed=True)


def choose_captions(row: Mapping[str, Any], languages: Sequence[str], k: int,
                    rng: np.random.Generator | None, index: int | None = None) -> list[str]:
    """The K captions of one row, in the order of ``languages`` (image-major layout per row).

    With K = len(languages) every language is used; with K smaller, K languages are drawn at
    random among those the row has. A language with several captions contributes one, drawn at
    random (the first when ``rng`` is None), or its ``index``-th (modulo its count) when given.
    A row with fewer than K of the languages is a bad row (BadRowError naming the row and the
    missing language columns).
    """
    available = []
    for lang in languages:
        caps = row.get(schema.caption_column(lang))
        if caps is not None and len(caps) > 0:
            available.append((lang, caps))
    if len(available) < k:
        missing = [lang for lang in languages if lang not in {a for a, _ in available}]
        raise BadRowError(f"row {row.get(schema.IMAGE_ID)!r}: needs captions in {k} languages, missing "
                          + ", ".join(schema.caption_column(m) for m in missing), "missing_language")
    for lang, caps in available:
        reason = captions_problem(caps)
        if reason:
            raise BadRowError(f"row {row.get(schema.IMAGE_ID)!r}: field {schema.caption_column(lang)!r} has a bad "
                              f"caption ({reason})", reason)
    if k < len(available):
        idx = sorted(rng.choice(len(available), size=k, replace=False)) if rng is not None else range(k)
        available = [available[i] for i in idx]
    if index is not None:
        return [str(caps[index % len(caps)]) for _, caps in available]
    return [str(caps[int(rng.integers(len(caps)))] if rng is not None else caps[0]) for _, caps in available]


def caption_index(epoch: int, key: int, cycle: int) -> int:
    """Which caption a row shows in pass ``cycle`` of an epoch with several passes: a per-(epoch,
    row) offset plus the pass, so that ``passes`` consecutive passes show a row with that many
    captions each of them once, in an order that changes every epoch."""
    digest = hashlib.blake2b(f"{epoch}:{key}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") + int(cycle)


class OneToKBatchTransform:
    """Rows (a dict of column arrays) → a 1-to-K training/eval batch of numpy arrays.

    Output: ``pixel_values`` N×3×H×W uint8, ``input_ids`` and ``attention_mask`` N×K×L int64
    (the K captions of each image in ``languages`` order), and unless ``with_ids=False`` (tensors
    only, as training wants) ``image_id`` N strings; with ``image_keys=True`` also ``image_key`` N int64
    (``image_key(image_id)``: equal ids, equal keys — fine-tuning treats them as one image). Input columns whose names start with ``_``
    (bookkeeping such as ``ccrk_ray.data.plan``'s ``_pos``) pass through for the rows kept.
    """

    def __init__(self, tokenizer: CaptionTokenizer, languages: Sequence[str], k: int,
                 image_transform: ImageTransform, seed: int | None = None, with_ids: bool = True,
                 on_bad_row: str = "raise", image_keys: bool = False, caption_passes: int = 1):
        """``caption_passes`` > 1 (training rows of a plan with several passes per epoch, carrying
        ``_cycle``, ``_epoch`` and ``_key``): rows show their captions in turn (``caption_index``);
        otherwise a language's caption is drawn at random."""
        if not 1 <= k <= len(languages):
            raise ValueError(f"captions_per_image K={k} must be between 1 and the {len(languages)} languages")
        self.tokenize = tokenizer
        if on_bad_row not in ("raise", "skip"):
            raise ValueError(f"on_bad_row must be 'raise' or 'skip', got {on_bad_row!r}")
        self.languages, self.k, self.with_ids, self.on_bad_row = tuple(languages), k, with_ids, on_bad_row
        self.image_keys, self.caption_passes = image_keys, caption_passes
        self.skipped = SkipCounter()    # cumulative over this transform's life
        self.rows_seen = 0
        self.image_transform = image_transform
        # Train: fresh randomness per batch; eval: deterministic (first caption, all K in order).
        self.rng = np.random.default_rng(seed) if image_transform.train else None

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch[schema.IMAGE_ID]
        cap_cols = [c for c in batch if c.startswith(schema.CAPTION_PREFIX)]
        rows = [{schema.IMAGE_ID: ids[i], **{c: batch[c][i] for c in cap_cols}} for i in range(len(ids))]
        images = batch[schema.IMAGE]
        self.rows_seen += len(rows)
        decoded, captions = [], []
        kept_ids, kept = [], []
        cycles = batch.get("_cycle")
        for i, row in enumerate(rows):
            index = None
            if cycles is not None and self.caption_passes > 1:
                index = caption_index(int(batch["_epoch"][i]), int(batch["_key"][i]), int(cycles[i]))
            try:
                img = decode_image(images[i], ids[i])
                caps = choose_captions(row, self.languages, self.k, self.rng, index)
            except BadRowError as exc:
                if self.on_bad_row == "raise":
                    raise
                self.skipped.add(exc.reason, ids[i])
                continue
            decoded.append(img)
            captions += caps
            kept_ids.append(ids[i])
            kept.append(i)
        n, ids = len(decoded), kept_ids
        size = self.image_transform.image_size
        pixels = (np.stack([self.image_transform(img, self.rng) for img in decoded])
                  if n else np.zeros((0, 3, size, size), dtype=np.uint8))
        if captions:
            input_ids, mask = self.tokenize(captions)
        else:
            input_ids = mask = np.zeros((0, self.tokenize.max_length), dtype=np.int64)
        shape = (n, self.k, input_ids.shape[-1])
        out = {"pixel_values": pixels, "input_ids": input_ids.reshape(shape), "attention_mask": mask.reshape(shape)}
        if self.with_ids:
            out[schema.IMAGE_ID] = np.asarray(ids, dtype=object)
        if self.image_keys:
            out["image_key"] = np.asarray([image_key(i) for i in ids], dtype=np.int64)
        for col in batch:       # bookkeeping columns (e.g. the plan's _pos/_key) follow their rows
            if col.startswith("_"):
                out[col] = np.asarray(batch[col])[np.asarray(kept, dtype=np.int64)]
        return out


class EvalCaptionsTransform:
    """Rows → an evaluation batch where every caption counts: ``pixel_values`` N×3×H×W uint8,
    ``input_ids`` / ``attention_mask`` N×S×L (all of a row's captions in ``languages``, language by
    language, in ``slots`` S places), ``caption_language`` N×S (the language's index, −1 for an
    empty slot) and ``image_id``. ``slots`` must hold the most captions any row has
    (``caption_slots``). A row with no caption in any of the languages, a bad image or a bad
    caption raises BadRowError naming the row (``on_bad_row="skip"``: skipped and counted)."""

    def __init__(self, tokenizer: CaptionTokenizer, languages: Sequence[str], image_transform: ImageTransform,
                 slots: int, on_bad_row: str = "raise"):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if on_bad_row not in ("raise", "skip"):
            raise ValueError(f"on_bad_row must be 'raise' or 'skip', got {on_bad_row!r}")
        self.tokenize, self.languages, self.image_transform = tokenizer, tuple(languages), image_transform
        self.slots, self.on_bad_row = slots, on_bad_row
        self.skipped = SkipCounter()
        self.rows_seen = 0

    def row_captions(self, row: Mapping[str, Any]) -> list[tuple[int, str]]:
        """(language index, caption) of every caption of a row in ``languages``."""
        out = []
        for j, lang in enumerate(self.languages):
            caps = row.get(schema.caption_column(lang))
            reason = captions_problem(caps)
            if reason:
                raise BadRowError(f"row {row.get(schema.IMAGE_ID)!r}: field {schema.caption_column(lang)!r} has a bad "
                                  f"caption ({reason})", reason)
            out += [(j, c.decode("utf-8") if isinstance(c, bytes) else str(c)) for c in (() if caps is None else caps)]
        if not out:
            raise BadRowError(f"row {row.get(schema.IMAGE_ID)!r}: no caption in any of "
                              + ", ".join(schema.caption_column(lang) for lang in self.languages), "missing_language")
        if len(out) > self.slots:
            raise ValueError(f"row {row.get(schema.IMAGE_ID)!r} has {len(out)} captions, more than the {self.slots} "
                             "slots (see caption_slots)")
        return out

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch[schema.IMAGE_ID]
        cap_cols = [c for c in batch if c.startswith(schema.CAPTION_PREFIX)]
        self.rows_seen += len(ids)
        pixels, kept_ids, texts, where = [], [], [], []
        for i in range(len(ids)):
            row = {schema.IMAGE_ID: ids[i], **{c: batch[c][i] for c in cap_cols}}
            try:
                img = decode_image(batch[schema.IMAGE][i], ids[i])
                caps = self.row_captions(row)
            except BadRowError as exc:
                if self.on_bad_row == "raise":
                    raise
                self.skipped.add(exc.reason, ids[i])
                continue
            n = len(kept_ids)
            where += [(n, slot, j) for slot, (j, _) in enumerate(caps)]
            texts += [c for _, c in caps]
            pixels.append(self.image_transform(img))
            kept_ids.append(ids[i])
        n, size, length = len(kept_ids), self.image_transform.image_size, self.tokenize.max_length
        input_ids = np.zeros((n, self.slots, length), dtype=np.int64)
        mask = np.zeros((n, self.slots, length), dtype=np.int64)
        slot_lang = np.full((n, self.slots), -1, dtype=np.int64)
        if texts:
            tok_ids, tok_mask = self.tokenize(texts)
            rows, slots, langs = (np.asarray(x) for x in zip(*where))
            input_ids[rows, slots, :tok_ids.shape[1]] = tok_ids
            mask[rows, slots, :tok_mask.shape[1]] = tok_mask
            slot_lang[rows, slots] = langs
        return {"pixel_values": np.stack(pixels) if n else np.zeros((0, 3, size, size), dtype=np.uint8),
                "input_ids": input_ids, "attention_mask": mask, "caption_language": slot_lang,
                schema.IMAGE_ID: np.asarray(kept_ids, dtype=object)}


def caption_slots(uri: str, languages: Sequence[str], endpoint_url: str | None = None) -> tuple[int, dict[str, int]]:
    """(the most captions one row has in ``languages``, total captions per language) of a split,
    read from its caption columns alone."""
    fs, files = storage.list_parquet(uri, endpoint_url)
    table = pq.read_table(files, filesystem=fs, columns=[schema.caption_column(lang) for lang in languages])
    return _caption_counts(table, languages)


def _caption_counts(table, languages: Sequence[str]) -> tuple[int, dict[str, int]]:
    import pyarrow.compute as pc

    lengths = [pc.fill_null(pc.list_value_length(table.column(schema.caption_column(lang))), 0)
               .to_numpy(zero_copy_only=False) for lang in languages]
    per_row = np.sum(lengths, axis=0) if len(table) else np.zeros(0)
    return int(per_row.max()) if len(per_row) else 0, {lang: int(n.sum()) for lang, n in zip(languages, lengths)}


def flatten_slots(batch: Mapping[str, np.ndarray], languages: Sequence[str]) -> dict[str, Any]:
    """An ``EvalCaptionsTransform`` batch → a loaded split: ``image_id``, ``pixel_values`` N, and every
    caption once, language by language (image order, then slot order): ``input_ids`` and
    ``attention_mask`` M×L, ``owner`` M (its image's row), ``offsets`` (L+1) and ``languages``."""
    slot_lang = np.asarray(batch["caption_language"])
    rows, slots, offsets = [], [], [0]
    for j in range(len(languages)):
        r, s = np.nonzero(slot_lang == j)
        rows.append(r)
        slots.append(s)
        offsets.append(offsets[-1] + len(r))
    rows, slots = np.concatenate(rows), np.concatenate(slots)
    return {schema.IMAGE_ID: batch[schema.IMAGE_ID], "pixel_values": batch["pixel_values"],
            "input_ids": np.asarray(batch["input_ids"])[rows, slots],
            "attention_mask": np.asarray(batch["attention_mask"])[rows, slots],
            "owner": rows.astype(np.int64), "offsets": np.asarray(offsets, dtype=np.int64),
            "languages": tuple(languages)}


def load_split(uri: str, languages: Sequence[str], tokenizer: CaptionTokenizer, image_size: int | ImageTransform,
               endpoint_url: str | None = None, on_bad_row: str = "raise") -> dict[str, Any]:
    """A whole (validation-sized) split — local or ``s3://`` — in image_id order with every caption
    in ``languages`` (``flatten_slots``'s layout): validation during training, ``ccrk compare`` and
    two-stage evaluation. An image without captions in a language is evaluated in its others; a
    row without any, or with a bad image or caption, raises BadRowError naming the row
    (``on_bad_row="skip"``: skipped, and counted by reason in ``skipped``)."""
    fs, files = storage.list_parquet(uri, endpoint_url)
    columns = [schema.IMAGE_ID, schema.IMAGE] + [schema.caption_column(lang) for lang in languages]
    table = pq.read_table(files, filesystem=fs, columns=columns).sort_by(schema.IMAGE_ID)
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    transform = image_size if isinstance(image_size, ImageTransform) else ImageTransform(image_size, train=False)
    slots, _ = _caption_counts(table, languages)
    rows = EvalCaptionsTransform(tokenizer, languages, transform, max(1, slots), on_bad_row=on_bad_row)
    return {**flatten_slots(rows(batch), languages), "skipped": dict(rows.skipped.counts)}


def split_from_batch(batch: Mapping[str, np.ndarray], languages: Sequence[str]) -> dict[str, Any]:
    """A 1-to-K batch (one caption per image and language, N×K×L) in ``load_split``'s layout."""
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    n, k, length = ids.shape
    if len(languages) != k:
        raise ValueError(f"a batch of {k} captions per image for {len(languages)} languages")
    return {schema.IMAGE_ID: np.asarray(batch.get(schema.IMAGE_ID, np.arange(n).astype(str)), dtype=object),
            "pixel_values": batch["pixel_values"],
            "input_ids": ids.transpose(1, 0, 2).reshape(k * n, length),
            "attention_mask": mask.transpose(1, 0, 2).reshape(k * n, length),
            "owner": np.tile(np.arange(n, dtype=np.int64), k), "offsets": np.arange(k + 1, dtype=np.int64) * n,
            "languages": tuple(languages)}
