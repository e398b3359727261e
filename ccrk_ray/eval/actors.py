"""Ray side of evaluation: embedding actors over the test split; ranking stays pure."""

from __future__ import annotations

import numpy as np
import ray.data

from ccrk_ray.eval.retrieval import Embedder


def embed_dataset(ds: ray.data.Dataset, model_dir: str, *, num_actors: int = 1, batch_size: int = 128,
                  cpus_per_actor: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image_ids, image_emb N×d, text_emb N×K×d) for a dataset of 1-to-K batches, in id order."""
    out = ds.map_batches(Embedder, fn_constructor_kwargs=dict(model_dir=str(model_dir), threads=int(cpus_per_actor) or 1),
                         batch_size=batch_size, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors),
                         num_cpus=cpus_per_actor)
    ids, img, txt = [], [], []
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        ids.append(batch["image_id"])
        img.append(batch["image_emb"])
        txt.append(batch["text_emb"])
    ids_arr = np.concatenate(ids)
    order = np.argsort(ids_arr, kind="stable")
    return ids_arr[order], np.concatenate(img)[order], np.concatenate(txt)[order]
