"""Where data lives: local paths, ``s3://`` (any S3-compatible endpoint) and other pyarrow URIs.

``s3://bucket/prefix`` uses the standard AWS credential chain; the endpoint (MinIO, Ceph, a local
test server) comes from the ``endpoint_url`` argument, else ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``, as AWS's own tools read them. Region: ``AWS_REGION`` / ``AWS_DEFAULT_REGION``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def s3_filesystem(endpoint_url: str | None = None) -> pafs.S3FileSystem:
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"],
                      secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
                      session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str | Path, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path, ``s3://…`` or any pyarrow filesystem URI."""
    uri = str(uri)
    if uri.startswith("s3://"):
        return s3_filesystem(endpoint_url), uri[len("s3://"):].rstrip("/")
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).resolve())


def list_parquet(uri: str | Path, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, list[str]]:
    """The parquet files of a file or a prefix (sorted; hidden and temp files ignored)."""
    fs, path = resolve(uri, endpoint_url)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no data at {uri}")
    if info.type == pafs.FileType.File:
        return fs, [path]
    files = [f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
             if f.type == pafs.FileType.File and f.path.endswith(".parquet")
             and not Path(f.path).name.startswith((".", "_"))]
    if not files:
        raise FileNotFoundError(f"no .parquet files under {uri}")
    return fs, sorted(files)


def count_rows(uri: str | Path, endpoint_url: str | None = None) -> int:
    """Rows of every parquet file under ``uri``, from the footers only (no data read)."""
    fs, files = list_parquet(uri, endpoint_url)
    return sum(pq.ParquetFile(f, filesystem=fs).metadata.num_rows for f in files)
