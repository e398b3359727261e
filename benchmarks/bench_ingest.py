"""Ingest throughput: the Ray Data pipeline vs a plain torch DataLoader doing the same
decode / random-resized-crop / K-caption tokenisation on the same parquet, on the same CPU cores,
from local disk and from a local S3 server (moto, 127.0.0.1).

    .venv/bin/python benchmarks/bench_ingest.py [--images 4000] [--cores 2] [--epochs 2] [--no-s3]

Prints samples/s of each and the ratio Ray Data / DataLoader, for the generic pipeline
(``one_to_k_dataset``: Ray's parquet reader, then transform actors) and for the training path
(``stream_dataset``: the seeded epoch plan, each actor reading and transforming whole segments). Both use one transform
implementation (ccrk_ray.data.transforms.OneToKBatchTransform); the DataLoader workers each read
whole parquet files (file-sharded), as a hand-written loader would.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pyarrow.parquet as pq
import torch

from ccrk_ray.data import schema, storage
from ccrk_ray.data.transforms import ImageTransform, OneToKBatchTransform
from ccrk_ray.languages import CCRK_LANGUAGES
from ccrk_ray.tokenizer import CaptionTokenizer

BATCH = 64


class ParquetOneToK(torch.utils.data.IterableDataset):
    def __init__(self, uri, transform):
        self.uri, self.transform = uri, transform

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        fs, files = storage.list_parquet(self.uri)
        if info is not None:
            files = files[info.id::info.num_workers]
        columns = [schema.IMAGE_ID, schema.IMAGE] + [schema.caption_column(lang) for lang in CCRK_LANGUAGES]
        for f in files:
            for rb in pq.ParquetFile(fs.open_input_file(f)).iter_batches(batch_size=BATCH, columns=columns):
                batch = {c: rb.column(c).to_numpy(zero_copy_only=False) for c in rb.schema.names}
                out = self.transform(batch)
                yield {k: torch.as_tensor(v) for k, v in out.items()}


def run_dataloader(uri, transform, cores, epochs) -> float:
    loader = torch.utils.data.DataLoader(ParquetOneToK(uri, transform), batch_size=None, num_workers=cores,
                                         persistent_workers=False, prefetch_factor=2)
    n, t = 0, time.perf_counter()
    for _ in range(epochs):
        for b in loader:
            n += b["pixel_values"].shape[0]
    return n / (time.perf_counter() - t)


def run_ray(uri, tokenizer, cores, epochs, map_batch=BATCH) -> float:
    from ccrk_ray.data.pipeline import one_to_k_dataset

    ds = one_to_k_dataset(uri, languages=CCRK_LANGUAGES, k=len(CCRK_LANGUAGES), tokenizer=tokenizer,
                          image_transform=ImageTransform(64, train=True), batch_size=map_batch, num_actors=cores,
                          cpus_per_actor=1, with_ids=False)
    n, t = 0, time.perf_counter()
    for _ in range(epochs):
        for b in ds.iter_torch_batches(batch_size=BATCH, prefetch_batches=2):
            n += b["pixel_values"].shape[0]
    return n / (time.perf_counter() - t)


def run_stream(uri, tokenizer, cores, epochs) -> float:
    """The training path: one worker's stream of the seeded epoch plan (``stream_dataset``), each
    actor reading and transforming whole segments."""
    from ccrk_ray.data.pipeline import check_dataset, stream_dataset
    from ccrk_ray.data.plan import epoch_segments

    check = check_dataset(uri, CCRK_LANGUAGES)
    n, t = 0, time.perf_counter()
    for epoch in range(epochs):
        ds = stream_dataset(epoch_segments(check.row_groups, epoch, 0, 64), uri=uri, files=check.files, seed=0,
                            epoch=epoch, languages=CCRK_LANGUAGES, k=len(CCRK_LANGUAGES), tokenizer=tokenizer,
                            image_transform=ImageTransform(64, train=True), num_actors=cores, cpus_per_actor=1)
        for b in ds.iter_torch_batches(batch_size=BATCH, prefetch_batches=2):
            n += b["pixel_values"].shape[0]
    return n / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--map-batch", type=int, default=BATCH, help="rows per Ray Data transform call")
    p.add_argument("--extra-cpus", type=int, default=1, help="logical CPUs for Ray beyond the transform actors")
    a = p.parse_args()

    import ray

    from ccrk_ray.data.synthetic import generate_split
    from ccrk_ray.demo import iter_captions
    from ccrk_ray.tokenizer import train_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="ccrk-bench-"))
    generate_split(tmp / "train", "train", a.images, rows_per_shard=500)
    tok = CaptionTokenizer(train_tokenizer(iter_captions(tmp / "train", CCRK_LANGUAGES), tmp / "tok", 2000), 32)
    transform = OneToKBatchTransform(tok, CCRK_LANGUAGES, len(CCRK_LANGUAGES), ImageTransform(64, train=True),
                                     with_ids=False, on_bad_row="skip")
    sources = {"local disk": str(tmp / "train")}
    server = None
    if not a.no_s3:
        import boto3
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0 or 5599, verbose=False)
        server.start()
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                          AWS_ENDPOINT_URL="http://127.0.0.1:5599")
        s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:5599")
        s3.create_bucket(Bucket="bench")
        for f in sorted((tmp / "train").glob("*.parquet")):
            s3.upload_file(str(f), "bench", f"train/{f.name}")
        sources["local S3 server"] = "s3://bench/train"

    # One logical CPU per transform actor, plus --extra-cpus for Ray Data's read tasks (the physical
    # cores stay the same); the driver iterates.
    ray.init(num_cpus=a.cores + a.extra_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"{a.images} images x {a.epochs} epochs, K=10 captions, 64 px, {a.cores} cores")
    print(f"{'source':18}{'DataLoader':>14}{'Ray Data':>14}{'ratio':>8}{'training path':>16}{'ratio':>8}")
    try:
        for name, uri in sources.items():
            dl = run_dataloader(uri, transform, a.cores, a.epochs)
            rd = run_ray(uri, tok, a.cores, a.epochs, a.map_batch)
            st = run_stream(uri, tok, a.cores, a.epochs)
            print(f"{name:18}{dl:10.0f} /s {rd:10.0f} /s {rd / dl:7.2f}x {st:12.0f} /s {st / dl:7.2f}x", flush=True)
    finally:
        ray.shutdown()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
