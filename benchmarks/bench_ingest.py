"""Ingest throughput: the Ray Data pipeline vs a plain torch DataLoader doing the same
decode / random-resized-crop / K-caption tokenisation on the same parquet, on the same CPU cores,
from local disk and from a local S3 server (moto in its own process, 127.0.0.1).

    .venv/bin/python benchmarks/bench_ingest.py [--images 4000] [--cores 2] [--epochs 4] [--no-s3] [--no-generic]

Prints samples/s of each and the ratio Ray Data / DataLoader, for the generic pipeline
(``one_to_k_dataset``: Ray's parquet reader, then transform actors) and for the training path
(``stream_blocks``: the seeded epoch plans, each actor call reading and transforming ~1024 rows of
them, one stream for all epochs, cut into batches by ``EpochBatcher``). Both use one transform
implementation (ccrk_ray.data.transforms.OneToKBatchTransform); the DataLoader workers each read
whole parquet files (file-sharded), as a hand-written loader would.
"""

from __future__ import annotations

import argparse
import atexit
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pyarrow.parquet as pq
import torch

from ccrk_ray.core import storage
from ccrk_ray.data import schema
from ccrk_ray.data.transforms import ImageTransform, OneToKBatchTransform
from ccrk_ray.core.languages import CCRK_LANGUAGES
from ccrk_ray.data.tokenizer import CaptionTokenizer

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


class Meter:
    """Samples/s over the whole run and after the first batch (start-up left out)."""

    def __init__(self):
        self.t0, self.first, self.n, self.n_first = time.perf_counter(), None, 0, 0

    def add(self, rows: int) -> None:
        self.n += rows
        if self.first is None:
            self.first, self.n_first = time.perf_counter(), self.n

    def result(self) -> tuple[float, float, float]:
        end = time.perf_counter()
        return self.n / (end - self.t0), self.first - self.t0, (self.n - self.n_first) / max(1e-9, end - self.first)


def run_dataloader(uri, transform, cores, epochs):
    # persistent workers: what a hand-written multi-epoch loader would use. Its workers start from a
    # forkserver, never forked from this process: it has started Ray, and a worker forked after
    # ray.init hung this benchmark for 15 minutes. The workers' start-up (imports) is in the timing,
    # as the Ray actors' is.
    loader = torch.utils.data.DataLoader(ParquetOneToK(uri, transform), batch_size=None, num_workers=cores,
                                         persistent_workers=True, prefetch_factor=2,
                                         multiprocessing_context="forkserver")
    m = Meter()
    for _ in range(epochs):
        for b in loader:
            m.add(b["pixel_values"].shape[0])
    return m.result()


def run_ray(uri, tokenizer, cores, epochs, map_batch=BATCH):
    from ccrk_ray.data.ingest import one_to_k_dataset

    ds = one_to_k_dataset(uri, languages=CCRK_LANGUAGES, k=len(CCRK_LANGUAGES), tokenizer=tokenizer,
                          image_transform=ImageTransform(64, train=True), batch_size=map_batch, num_actors=cores,
                          cpus_per_actor=1, with_ids=False)
    m = Meter()
    for _ in range(epochs):
        for b in ds.iter_torch_batches(batch_size=BATCH, prefetch_batches=2):
            m.add(b["pixel_values"].shape[0])
    return m.result()


def run_stream(uri, tokenizer, cores, epochs):
    """The training path: one worker's stream of the seeded epoch plans, all epochs in one data
    stream (``stream_blocks``: each actor call reads and transforms ~1024 rows of plan segments,
    the actors live across epochs), cut into per-epoch batches by ``EpochBatcher`` as the training
    loop does."""
    from ccrk_ray.data.batching import EpochBatcher
    from ccrk_ray.data.ingest import check_dataset, stream_blocks
    from ccrk_ray.data.plan import epoch_segments

    m = Meter()
    check = check_dataset(uri, CCRK_LANGUAGES)
    streams = [(e, epoch_segments(check.row_groups, e, 0)) for e in range(epochs)]     # training's chunk_rows
    batcher = EpochBatcher(stream_blocks(streams, uri=uri, files=check.files, seed=0, languages=CCRK_LANGUAGES,
                                         k=len(CCRK_LANGUAGES), tokenizer=tokenizer,
                                         image_transform=ImageTransform(64, train=True), num_actors=cores,
                                         cpus_per_actor=1), BATCH)
    for epoch in range(epochs):
        while (b := batcher.next(epoch)) is not None:
            m.add(b["pixel_values"].shape[0])
    return m.result()


class _Identity:
    def __call__(self, batch):
        return batch


def start_ray_data_services() -> None:
    """Run a tiny actor-pool dataset: the first execution in a cluster starts Ray Data's own actors
    (stats, autoscaling coordinator, actor-location tracker: a process each, ~1 CPU-s of imports),
    once per cluster. Started before the training path is timed when the generic reader does not
    run first. (Only then: after it, the generic reader's read tasks never got a CPU on this 2-core
    cluster.)"""
    import ray

    ray.data.range(8).map_batches(_Identity, batch_size=4, compute=ray.data.ActorPoolStrategy(size=1)).take_all()


def parity_samples(ray_run, dl_run) -> float | None:
    """Run length (samples) beyond which the Ray run's whole-run rate passes the DataLoader's:
    each run modelled as its start-up (time to the first batch) plus samples at its steady rate."""
    (_, first_r, steady_r), (_, first_d, steady_d) = ray_run, dl_run
    if steady_r <= steady_d:
        return None
    return max(0.0, (first_r - first_d) / (1 / steady_d - 1 / steady_r))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--no-generic", action="store_true", help="leave out the generic Ray Data reader (slow)")
    p.add_argument("--s3-port", type=int, default=5599, help="port of the local S3 server (moto, own process)")
    p.add_argument("--map-batch", type=int, default=BATCH, help="rows per Ray Data transform call")
    p.add_argument("--extra-cpus", type=int, default=1, help="logical CPUs for Ray beyond the transform actors")
    a = p.parse_args()

    import ray

    from ccrk_ray.data.synthetic import generate_split
    from ccrk_ray.data.tokenizer import iter_captions
    from ccrk_ray.data.tokenizer import train_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="ccrk-bench-"))
    generate_split(tmp / "train", "train", a.images, rows_per_shard=500)
    tok = CaptionTokenizer(train_tokenizer(iter_captions(tmp / "train", CCRK_LANGUAGES), tmp / "tok", 2000), 32)
    transform = OneToKBatchTransform(tok, CCRK_LANGUAGES, len(CCRK_LANGUAGES), ImageTransform(64, train=True),
                                     with_ids=False, on_bad_row="skip")
    sources = {"local disk": str(tmp / "train")}
    server = None
    if not a.no_s3:
        import boto3

        # its own process, as a real object store is: moto's threads inside this process would
        # compete for the GIL with whichever pipeline runs here
        port = a.s3_port
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        atexit.register(server.terminate)          # whatever fails below
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                          AWS_ENDPOINT_URL=endpoint)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        for _ in range(100):
            try:
                s3.create_bucket(Bucket="bench")
                break
            except Exception:
                if server.poll() is not None:
                    raise RuntimeError(f"moto server exited ({server.returncode}); is port {port} taken?")
                time.sleep(0.2)
        for f in sorted((tmp / "train").glob("*.parquet")):
            s3.upload_file(str(f), "bench", f"train/{f.name}")
        sources["local S3 server"] = "s3://bench/train"

    # One logical CPU per transform actor, plus --extra-cpus for Ray Data's read tasks (the physical
    # cores stay the same); the driver iterates.
    ray.init(num_cpus=a.cores + a.extra_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if a.no_generic:
        start_ray_data_services()
    print(f"{a.images} images x {a.epochs} epochs, K=10 captions, 64 px, {a.cores} cores; samples/s over the "
          "whole run (first batch after N s) | after the first batch")
    print(f"{'source':16}{'pipeline':28}{'whole run':>12}{'first batch':>13}{'steady':>9}{'ratio':>14}")
    try:
        for name, uri in sources.items():
            dl = run_dataloader(uri, transform, a.cores, a.epochs)
            runs = {"DataLoader": dl}
            if not a.no_generic:
                runs["Ray Data, generic"] = run_ray(uri, tok, a.cores, a.epochs, a.map_batch)
            runs["Ray Data, training path"] = run_stream(uri, tok, a.cores, a.epochs)
            for pipeline, (whole, first, steady) in runs.items():
                ratio = "" if pipeline == "DataLoader" else f"{whole / dl[0]:.2f}x | {steady / dl[2]:.2f}x"
                print(f"{name:16}{pipeline:28}{whole:8.0f} /s{first:11.1f} s{steady:7.0f} /s  {ratio:>12}",
                      flush=True)
            parity = parity_samples(runs["Ray Data, training path"], dl)
            print(f"{'':16}training path: whole-run rate passes the DataLoader's beyond "
                  + (f"~{parity:,.0f} samples" if parity is not None else "no run length (steady rate not above)"),
                  flush=True)
    finally:
        ray.shutdown()
        if server is not None:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
