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

from ccrk_ray.core.config import ConfigError, DataError, NoDataError, first_line


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def s3_filesystem(endpoint_url: str | None = None) -> pafs.S3FileSystem:
    """An S3 filesystem that takes its credentials from the AWS SDK's default chain (environment,
    ``~/.aws``, instance or pod role) in whichever process uses it. No key is ever passed in, so
    none is kept in the object: pickled (to Ray workers, into Ray Tune's experiment state) it
    carries the endpoint, region and retry settings only."""
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs, **s3_settings())


# Retries and timeouts of every S3 request, fit for multi-day runs on a busy object store; each can
# be set with the environment variable beside it (the cluster configs and job runtime envs pass
# them to every node), or ``ccrk ... --s3-retries/--s3-connect-timeout/--s3-request-timeout``.
S3_SETTINGS = {"retries": ("CCRK_S3_RETRIES", 10), "connect_timeout": ("CCRK_S3_CONNECT_TIMEOUT", 10.0),
               "request_timeout": ("CCRK_S3_REQUEST_TIMEOUT", 120.0)}


def configure_s3(retries: int | None = None, connect_timeout: float | None = None,
                 request_timeout: float | None = None, override: bool = True) -> None:
    """Set the S3 settings of this process and of the local cluster it starts (its processes
    inherit the environment); ``override=False`` keeps values already set (a config file's values
    under the command line's)."""
    for name, value in (("retries", retries), ("connect_timeout", connect_timeout),
                        ("request_timeout", request_timeout)):
        var = S3_SETTINGS[name][0]
        if value is not None and (override or not os.environ.get(var)):
            os.environ[var] = str(value)
    s3_settings()       # a bad value is an error now, not in the first worker that reads


def s3_settings() -> dict:
    """pyarrow S3FileSystem arguments of the S3 retry and timeout settings."""
    values = {}
    for name, (var, default) in S3_SETTINGS.items():
        raw = os.environ.get(var)
        try:
            values[name] = type(default)(raw) if raw else default
        except ValueError:
            raise ConfigError(f"{var}={raw!r}: expected {'an integer' if isinstance(default, int) else 'a number'}") \
                from None
        if values[name] < (0 if name == "retries" else 0.001):
            raise ConfigError(f"{var}={raw!r}: must be {'>= 0' if name == 'retries' else '> 0'}")
    return {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=values["retries"] + 1),
            "connect_timeout": values["connect_timeout"], "request_timeout": values["request_timeout"]}


def resolve(uri: str | Path, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path, ``s3://…`` or any pyarrow filesystem URI."""
    uri = str(uri)
    if uri.startswith("s3://"):
        return s3_filesystem(endpoint_url), uri[len("s3://"):].rstrip("/")
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).resolve())


def list_parquet(uri: str | Path, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, list[str]]:
    """The parquet files of a file or a prefix (sorted; hidden and temp files ignored). Storage that
    cannot be reached is a DataError naming the URI."""
    fs, path = resolve(uri, endpoint_url)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise NoDataError(f"no data at {uri}")
        if info.type == pafs.FileType.File:
            return fs, [path]
        listed = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except NoDataError:
        raise
    except OSError as exc:      # pyarrow's S3 errors: network, credentials, no such bucket
        raise DataError(f"{uri}: cannot be read ({first_line(exc)})") from None
    files = [f.path for f in listed
             if f.type == pafs.FileType.File and f.path.endswith(".parquet")
             and not Path(f.path).name.startswith((".", "_"))]
    if not files:
        raise NoDataError(f"no .parquet files under {uri}")
    return fs, sorted(files)


def count_rows(uri: str | Path, endpoint_url: str | None = None) -> int:
    """Rows of every parquet file under ``uri``, from the footers only (no data read)."""
    fs, files = list_parquet(uri, endpoint_url)
    return sum(pq.ParquetFile(f, filesystem=fs).metadata.num_rows for f in files)
