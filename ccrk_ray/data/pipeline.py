"""The Ray Data side of the data path: read parquet, apply the pure batch transform in actors.

Only wiring lives here; the per-row work is ``ccrk_ray.data.transforms``.
"""

from __future__ import annotations

from typing import Sequence

import pyarrow.parquet as pq
import ray

from ccrk_ray.data import schema
from ccrk_ray.data.transforms import ImageTransform, OneToKBatchTransform
from ccrk_ray.tokenizer import CaptionTokenizer


def count_rows(path: str) -> int:
    """Rows in a local parquet file or directory, from the footers only (no data read)."""
    return sum(fragment.metadata.num_rows for fragment in pq.ParquetDataset(path).fragments)


def read_captions(uri: str, languages: Sequence[str], shuffle_files: bool = True, **read_kwargs) -> ray.data.Dataset:
    """Read only the id, image and the wanted languages' caption columns (file order shuffled)."""
    columns = [schema.IMAGE_ID, schema.IMAGE] + [schema.caption_column(lang) for lang in languages]
    return ray.data.read_parquet(uri, columns=columns, shuffle="files" if shuffle_files else None, **read_kwargs)


def one_to_k_dataset(uri: str, *, languages: Sequence[str], k: int, tokenizer: CaptionTokenizer,
                     image_transform: ImageTransform, batch_size: int = 64, num_actors: int = 1,
                     cpus_per_actor: float = 1.0, shuffle_files: bool = True, with_ids: bool = True,
                     **read_kwargs) -> ray.data.Dataset:
    """A dataset of 1-to-K batches (see OneToKBatchTransform) streamed from ``uri``.

    ``with_ids=False`` leaves out the string ``image_id`` column: only tensors (for training).
    """
    ds = read_captions(uri, languages, shuffle_files=shuffle_files, **read_kwargs)
    return ds.map_batches(
        OneToKBatchTransform,
        fn_constructor_kwargs=dict(tokenizer=tokenizer, languages=tuple(languages), k=k,
                                   image_transform=image_transform, with_ids=with_ids),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors),
        num_cpus=cpus_per_actor,
    )
