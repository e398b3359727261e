"""The one parquet schema of ccrk-ray image–caption data.

Columns (one row = one image):

``image_id``            string, required, unique within a data set.
``image``               binary, required: the encoded image file as stored (JPEG/PNG/WebP),
                        never decoded pixels.
``captions_<lang>``     list<string>, one column per language (e.g. ``captions_en``); one or more
                        captions of the image in that language. Null or an empty list = no
                        caption in that language for this row.
``split``               string, optional (train/val/test).
``source``              string, optional (where the row came from).
Other columns (e.g. ``scene`` in the synthetic data) are allowed and ignored by training.

Per-language columns let a reader load only the languages it trains on (column projection).

Row groups: training reads whole row groups and shuffles at the level of slices of them
(``ccrk_ray.data.plan``), so writers here use row groups of ``ROW_GROUP_ROWS`` rows; files with
bigger row groups work, with coarser shuffling and more bytes read per slice.
"""

from __future__ import annotations

from typing import Sequence

import pyarrow as pa

from ccrk_ray.core.config import DataError

IMAGE_ID = "image_id"
IMAGE = "image"
SPLIT = "split"
SOURCE = "source"
CAPTION_PREFIX = "captions_"
ROW_GROUP_ROWS = 256


def caption_column(lang: str) -> str:
    return f"{CAPTION_PREFIX}{lang}"


def languages_in(schema: pa.Schema) -> list[str]:
    """Languages that have a caption column in ``schema``, in column order."""
    return [n[len(CAPTION_PREFIX):] for n in schema.names if n.startswith(CAPTION_PREFIX)]


def arrow_schema(languages: Sequence[str], extra: Sequence[pa.Field] = ()) -> pa.Schema:
    fields = [pa.field(IMAGE_ID, pa.string(), nullable=False), pa.field(IMAGE, pa.binary(), nullable=False)]
    fields += [pa.field(caption_column(lang), pa.list_(pa.string())) for lang in languages]
    fields += [pa.field(SPLIT, pa.string()), pa.field(SOURCE, pa.string())]
    fields += list(extra)
    return pa.schema(fields)


class SchemaError(DataError):
    """Data whose columns do not follow the ccrk-ray schema."""


def check_schema(schema: pa.Schema, languages: Sequence[str], where: str) -> None:
    """Raise SchemaError naming ``where`` (a file or prefix) and the column at fault."""
    expected = {IMAGE_ID: pa.string(), IMAGE: (pa.binary(), pa.large_binary())}
    for lang in languages:
        expected[caption_column(lang)] = (pa.list_(pa.string()), pa.large_list(pa.string()),
                                          pa.list_(pa.large_string()))
    for name, types in expected.items():
        types = types if isinstance(types, tuple) else (types,)
        if name not in schema.names:
            raise SchemaError(f"{where}: missing column {name!r} (columns: {', '.join(schema.names)})")
        got = schema.field(name).type
        if got not in types and not (name == IMAGE_ID and got == pa.large_string()):
            raise SchemaError(f"{where}: column {name!r} has type {got}, expected {types[0]}")
