"""Shared fixtures. Ray tests share one small local cluster per module and always shut it down."""

from __future__ import annotations

import logging
import os

from ccrk_ray.core.log import ROOT as LOG_ROOT
from ccrk_ray.core.runtime import LOCAL_ENV, LOCAL_SYSTEM_CONFIG, QUIET_ENV

# Quiet, fast Ray on 2 cores, as a ccrk command's own local cluster has it (set before ray is
# imported anywhere; subprocesses inherit it).
for _key, _value in {**QUIET_ENV, **LOCAL_ENV, "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_key, _value)

import numpy as np
import pytest

from ccrk_ray.core.languages import CCRK_LANGUAGES
from tests.ports import free_port

# Tests that start Ray carry this (``pytestmark = RAY``): pytest-xdist's ``--dist loadgroup`` (as
# ``./run test`` runs the suite) then runs them one after another on one worker, one Ray cluster at
# a time as a user has it, while the other tests run beside them on a second worker. (Two groups
# of Ray tests side by side, each with its own Ray temp dir, measured on 2 cores: 9 % less wall
# time for 12 % more CPU work, and a command failed in Ray Train's placement-group cleaner.)
RAY = [pytest.mark.ray, pytest.mark.xdist_group("ray")]


def pytest_collection_modifyitems(items):
    """Within a module, tests that use the module's fixture cluster (``ray_local``, alive from its
    first user to the module's end) run after the others: a ``ccrk`` subprocess starts its own
    cluster, and two Ray clusters on one machine is not what a user's run has (Ray Train's
    placement-group cleaner, for one, cannot tell them apart)."""
    first = {}
    for i, item in enumerate(items):
        first.setdefault(item.module, i)
    items.sort(key=lambda item: (first[item.module], "ray_local" in item.fixturenames))


@pytest.fixture(autouse=True)
def package_logger_restored():
    """An in-process ``main()`` sets the package logger up for a person (its own handler, no
    propagation): put it back after each test, so a later test's caplog still sees its records
    whichever tests ran before it in the same process."""
    logger = logging.getLogger(LOG_ROOT)
    saved = logger.propagate, logger.level, list(logger.handlers)
    yield
    logger.propagate, logger.level = saved[:2]
    logger.handlers[:] = saved[2]


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray cluster with explicit small resources (4 logical CPUs on 2 cores)."""
    import ray

    # The dashboard stays on: without it Train's placement-group cleaner cannot query the State API.
    ray.init(num_cpus=4, log_to_driver=False, _system_config=LOCAL_SYSTEM_CONFIG,
             runtime_env={"env_vars": {k: os.environ[k] for k in {**QUIET_ENV, **LOCAL_ENV}}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small synthetic data set (train 96 / test 40 images, 10 languages) and a tokenizer."""
    from ccrk_ray.data.synthetic import generate_split
    from ccrk_ray.data.tokenizer import iter_captions
    from ccrk_ray.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_data")
    generate_split(root / "train", "train", 96, seed=1, rows_per_shard=48)
    generate_split(root / "test", "test", 40, seed=2)
    tok = train_tokenizer(iter_captions(root / "train", CCRK_LANGUAGES), root / "tokenizer", vocab_size=600)
    return {"root": root, "train": root / "train", "test": root / "test", "tokenizer": tok}


def tiny_text_config(vocab_size: int, max_length: int = 32) -> dict:
    return dict(model_type="xlm-roberta", vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=64, max_position_embeddings=max_length + 2,
                pad_token_id=1, bos_token_id=0, eos_token_id=2)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's) on 127.0.0.1; yields (endpoint_url, bucket).

    The AWS_* variables point the standard credential chain and endpoint at it, so code under test
    reads ``s3://bucket/...`` exactly as users do."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    bucket = "ccrk-test"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    try:
        yield endpoint, bucket
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload_dir(endpoint: str, bucket: str, local_dir, prefix: str) -> list[str]:
    import boto3
    from pathlib import Path

    client = boto3.client("s3", endpoint_url=endpoint)
    keys = []
    for f in sorted(Path(local_dir).glob("*.parquet")):
        key = f"{prefix}/{f.name}"
        client.upload_file(str(f), bucket, key)
        keys.append(key)
    return keys

