"""Row-level checks shared by the converters and the training pipeline, and skip counting.

A bad row is skipped and counted by reason (with a few example ids), never silently dropped:

    corrupt_image               bytes that do not decode (truncated, garbage, empty)
    unsupported_image_format    decodes, but not JPEG/PNG/WebP
    empty_caption               a caption that is empty or only whitespace
    non_string_caption          a caption that is not a string (e.g. a number, null)
    invalid_utf8                caption bytes that are not valid UTF-8
    missing_language            fewer captions' languages than the row needs
    duplicate_id                an image id already seen
    missing_image               (converters) the image file named by the annotation is absent
    missing_features            (NRCCR) an item without a feature vector / frames in the BigFile
    bad_features                (NRCCR) features that are not finite numbers
    missing_view_caption        (NRCCR, per caption) a caption absent from one of the other views
    not_in_split                (NRCCR, per caption) a caption of an item outside the split's id list
    no_captions                 (NRCCR) an item of the split's id list without any caption
"""

from __future__ import annotations

import io
from collections import Counter
from typing import Any, Iterable

from PIL import Image

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP")
REASONS = ("corrupt_image", "unsupported_image_format", "empty_caption", "non_string_caption", "invalid_utf8",
           "missing_language", "duplicate_id", "missing_image", "missing_features", "bad_features",
           "missing_view_caption", "not_in_split", "no_captions")


def image_problem(data: Any) -> str | None:
    """None for decodable JPEG/PNG/WebP bytes, else the skip reason."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        return "corrupt_image"
    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            fmt = img.format
            img.load()          # a full decode catches truncation that verify() lets through
    except Exception:
        return "corrupt_image"
    return None if fmt in SUPPORTED_FORMATS else "unsupported_image_format"


def caption_problem(caption: Any) -> str | None:
    """None for a usable caption (a non-blank str, or UTF-8 bytes of one), else the skip reason."""
    if isinstance(caption, (bytes, bytearray)):
        try:
            caption = bytes(caption).decode("utf-8")
        except UnicodeDecodeError:
            return "invalid_utf8"
    if not isinstance(caption, str):
        return "non_string_caption"
    if not caption.strip():
        return "empty_caption"
    return None


def captions_problem(captions: Iterable[Any] | None) -> str | None:
    """The first problem among a language's captions (None or empty list = no captions: not a problem
    here; whether the language is required is the caller's ``missing_language`` check)."""
    for c in () if captions is None else captions:   # (a numpy array has no truth value)
        reason = caption_problem(c)
        if reason:
            return reason
    return None


class SkipCounter:
    """Counts of skipped rows by reason, with up to ``examples`` ids per reason."""

    def __init__(self, examples: int = 5):
        self.counts: Counter[str] = Counter()
        self.example_ids: dict[str, list[str]] = {}
        self.examples = examples

    def add(self, reason: str, row_id: Any) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self.counts[reason] += 1
        ids = self.example_ids.setdefault(reason, [])
        if len(ids) < self.examples:
            ids.append(str(row_id))

    def add_counts(self, counts: dict[str, int], examples: dict[str, list[str]]) -> None:
        """Fold in counts and example ids gathered elsewhere (another data actor)."""
        self.counts.update(counts)
        for reason, ids in examples.items():
            mine = self.example_ids.setdefault(reason, [])
            mine.extend(ids[: max(0, self.examples - len(mine))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "0 rows skipped"
        parts = [f"{reason}: {n} (e.g. {', '.join(self.example_ids.get(reason, []))})"
                 for reason, n in sorted(self.counts.items())]
        return f"{self.total} rows skipped — " + "; ".join(parts)

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)
