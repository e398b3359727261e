"""``ray job submit`` end to end, as users run it: a real local head, the real CLI client.

The head is ``ray start --head --block`` on free ports with its own temp dir and token auth (a
fresh token passed as RAY_AUTH_TOKEN, so ~/.ray is never used). It is stopped by signalling that
process and killing, by pid, whatever still runs from its temp dir -- never with ``ray stop``,
which kills every Ray process on the machine, other sessions' clusters included
(ray/scripts/scripts.py: stop()). The head's environment carries CCRK_STORAGE_PATH, as a cluster
config would, and the jobs name their outputs ``${CCRK_STORAGE_PATH}/...``.

Jobs: ``jobs/convert.py`` converts real xFlickr&CO test captions (en, de, ja) and their real
photos from ../shared/data into parquet shards; ``jobs/evaluate.py`` evaluates a tiny saved model
(built here with the package's own API) on those shards. Each is submitted with
``--working-dir . --runtime-env jobs/runtime_env.yaml`` and must reach SUCCEEDED; the shards are
compared with an independent read of the source files, and report.json with the same model
evaluated in this process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import RAY
from tests.ports import free_ports

pytestmark = RAY

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
XFLICKRCO = DATA / "iglue" / "datasets" / "xFlickrCO" / "annotations"
BIN = Path(sys.executable).parent
LANGS = ("en", "de", "ja")
IMAGE_SIZE, MAX_LENGTH = 64, 24


def load_entry():
    spec = importlib.util.spec_from_file_location("ccrk_jobs_entry", REPO / "jobs" / "_entry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------
# The entrypoint pattern, without Ray
# ----------------------------------------------------------------------------------------------


def test_expand_reads_only_braced_variables_and_refuses_unset_ones():
    entry = load_entry()
    env = {"CCRK_DATA_URI": "s3://b/data", "EMPTY": ""}
    assert entry.expand(["--data", "${CCRK_DATA_URI}/test", "$CCRK_DATA_URI", "a$b", "${CCRK_DATA_URI}${CCRK_DATA_URI}"],
                        env) == ["--data", "s3://b/data/test", "$CCRK_DATA_URI", "a$b", "s3://b/datas3://b/data"]
    from ccrk_ray.core.config import ConfigError

    with pytest.raises(ConfigError, match="environment variable.s. not set: EMPTY, NOPE$"):
        entry.expand(["${NOPE}/x", "${EMPTY}", "${CCRK_DATA_URI}"], env)


def run_entry(script: str, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"jobs/{script}", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


def test_entrypoints_forward_to_the_cli_and_exit_with_its_code(tmp_path):
    # an unset variable: exit 2 before anything runs
    res = run_entry("evaluate.py", "--checkpoint", "${CCRK_NOT_SET_ANYWHERE}/m", "--data", "d", "--out", "o")
    assert res.returncode == 2 and "CCRK_NOT_SET_ANYWHERE" in res.stderr and res.stdout == ""
    # the CLI's own error for a bad checkpoint, one line, exit 2; the variable was expanded
    res = run_entry("evaluate.py", "--checkpoint", "${MODEL_HOME}/none", "--data", str(tmp_path), "--out",
                    str(tmp_path / "o"), MODEL_HOME=str(tmp_path))
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("ccrk: error:") and f"{tmp_path}/none" in line, line
    assert f"ccrk evaluate: running {REPO / 'ccrk_ray'}" in res.stdout
    # nrccr: its actions through the CLI, the variable expanded, the model named
    res = run_entry("nrccr.py", "evaluate", "--checkpoint", "${MODEL_HOME}/none", "--data", str(tmp_path), "--out",
                    str(tmp_path / "n"), MODEL_HOME=str(tmp_path))
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"ccrk: error: --model {tmp_path}/none is not a saved model or a training checkpoint (no config.json)"]
    # convert: argparse's error through the CLI (no such format)
    res = run_entry("convert.py", "nosuchformat", "--out", str(tmp_path / "c"))
    assert res.returncode == 2 and res.stderr.startswith("ccrk: error:") and "nosuchformat" in res.stderr


# ----------------------------------------------------------------------------------------------
# A real head
# ----------------------------------------------------------------------------------------------


class Head:
    def __init__(self, address: str, env: dict, temp: Path, storage: Path, token: str):
        self.address, self.env, self.temp, self.storage, self.token = address, env, temp, storage, token

    def get(self, path: str, token: str | None = "own"):
        req = urllib.request.Request(self.address + path)
        if token:
            req.add_header("Authorization", f"Bearer {self.token if token == 'own' else token}")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def submit(self, submission_id: str, *entrypoint: str) -> subprocess.CompletedProcess:
        """The real client: ``ray job submit`` from the repository root, waiting for the end."""
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.address, "--submission-id", submission_id,
               "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--", *entrypoint]
        return subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=240)


def pids_running_from(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker`` (this head's unique temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                pids.append(int(entry.name))
    return pids


def stop_head(proc: subprocess.Popen, temp: Path) -> None:
    """Stop only this head: SIGTERM to `ray start --block` (it drains, then kills its children),
    then SIGKILL by pid to anything still running from this head's temp dir."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=45)             # a node with a running job drains for up to 30 s
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for pid in pids_running_from(str(temp)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while (left := pids_running_from(str(temp))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of the test head still running: {left}"


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    # Unix socket paths are limited to 107 bytes: a short temp dir, not pytest's deep tmp_path.
    # 4 logical CPUs on 2 cores: evaluation's Ray Data pipeline holds two actors and still needs
    # CPUs for its read tasks (with 2 it waits forever).
    temp = Path(tempfile.mkdtemp(prefix="ccrk-rj-", dir="/tmp"))
    storage = tmp_path_factory.mktemp("storage")
    token = secrets.token_hex(24)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", CCRK_STORAGE_PATH=str(storage),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_DATA_DISABLE_PROGRESS_BARS="1",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")          # a test head: nothing to drain
    (gcs, dash, client, node_manager, object_manager, agent_http, agent_grpc, metrics, runtime_env_agent
     ) = free_ports(9)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--temp-dir={temp}", "--num-cpus=4",
           f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--node-manager-port={node_manager}",
           f"--object-manager-port={object_manager}", f"--dashboard-agent-listen-port={agent_http}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={runtime_env_agent}", "--disable-usage-stats"]
    log = open(temp / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    h = Head(f"http://127.0.0.1:{dash}", env, temp, storage, token)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{(temp / 'ray-start.log').read_text()[-3000:]}")
            try:
                h.get("/api/jobs/")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"the dashboard did not answer in 90 s:\n{(temp / 'ray-start.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield h
    finally:
        stop_head(proc, temp)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_the_head_wants_the_token(head):
    with pytest.raises(urllib.error.HTTPError) as err:
        head.get("/api/jobs/", token=None)
    assert err.value.code in (401, 403)
    with pytest.raises(urllib.error.HTTPError) as err:
        head.get("/api/jobs/", token="not-the-token")
    assert err.value.code in (401, 403)
    assert isinstance(head.get("/api/jobs/"), list)


# ----------------------------------------------------------------------------------------------
# Data: xFlickr&CO test captions of the images the kit has photos of
# ----------------------------------------------------------------------------------------------


def jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def xflickrco(tmp_path_factory):
    if not DATA.is_dir():
        pytest.skip(f"real data kit {DATA} not found (it sits next to the repository in CI; see "
                    "shared/data/README.md)")
    root = tmp_path_factory.mktemp("xflickrco")
    photos = {}                                        # "coco:<id>" / "flickr30k:<id>" -> (path, sha256)
    for m in jsonl(DATA / "index" / "images_manifest.jsonl"):
        if any(src.startswith("xFlickrCO/test") for src in m["caption_sources"]):
            photos[m["key"]] = (DATA / m["file"], m["sha256"])
    images = root / "images"
    images.mkdir()
    expected, without_photo = {}, []                   # str(id) -> {lang: sentences}
    for lang in LANGS:
        kept = []
        for rec in jsonl(XFLICKRCO / lang / "test.jsonl"):
            key = f"{'coco' if isinstance(rec['id'], int) else 'flickr30k'}:{rec['id']}"
            if key in photos:
                kept.append(rec)
                expected.setdefault(str(rec["id"]), {})[lang] = rec["sentences"]
                link = images / Path(rec["img_path"]).name
                if not link.exists():
                    os.symlink(photos[key][0], link)
            elif len(without_photo) < 2 or str(rec["id"]) in without_photo:
                without_photo.append(str(rec["id"]))   # two ids with captions but no photo
                kept.append(rec)
        (root / f"{lang}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept),
                                            encoding="utf-8")
    assert len(photos) == 39 and len(expected) == 39 and len(set(without_photo)) == 2
    sha = {str(int(k.split(":")[1]) if k.startswith("coco:") else k.split(":")[1]): h for k, (_, h) in photos.items()}
    return {"root": root, "images": images, "expected": expected, "sha256": sha, "missing": set(without_photo)}


def tiny_model(model_dir: Path, captions) -> None:
    """A small random CCRK model saved the way `ccrk evaluate` reads it (weights, tokenizer,
    preprocess.json), through the package's own API."""
    import torch

    from ccrk_ray.model import CCRKModel, ModelConfig
    from ccrk_ray.data.tokenizer import load_tokenizer, train_tokenizer
    from tests.conftest import tiny_text_config

    train_tokenizer(captions, model_dir, vocab_size=400)
    vocab = len(load_tokenizer(model_dir))
    torch.manual_seed(0)
    model = CCRKModel(ModelConfig(vision_name="resnet10t", text_config=tiny_text_config(vocab, MAX_LENGTH),
                                  embed_dim=16))
    model.save_pretrained(model_dir)
    (model_dir / "preprocess.json").write_text(json.dumps(
        {"image_size": IMAGE_SIZE, "max_length": MAX_LENGTH, "languages": list(LANGS)}))


def job_status(head: Head, submission_id: str) -> dict:
    return head.get(f"/api/jobs/{submission_id}")


def test_convert_and_evaluate_jobs(head, xflickrco, tmp_path):
    import pyarrow.parquet as pq

    root = xflickrco["root"]
    convert = [str(BIN / "python"), "jobs/convert.py", "iglue", "--out", "${CCRK_STORAGE_PATH}/xflickrco-test",
               *[a for lang in LANGS for a in ("--ann", f"{lang}={root / f'{lang}.jsonl'}")],
               "--images", str(xflickrco["images"]), "--split", "test", "--rows-per-shard", "16"]
    t0 = time.monotonic()
    res = head.submit("ccrk-convert-1", "python", *convert[1:])
    t_convert = time.monotonic() - t0
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert job_status(head, "ccrk-convert-1")["status"] == "SUCCEEDED"

    # the job ran the uploaded copy of the repository, and the upload left the big folders out
    (pkg,) = [p for p in (head.temp / "session_latest" / "runtime_resources" / "working_dir_files").iterdir()
              if p.is_dir()]
    assert f"ccrk convert: running {pkg.resolve() / 'ccrk_ray'}" in res.stdout, res.stdout[-3000:]
    assert (pkg / "jobs" / "convert.py").is_file() and (pkg / "ccrk_ray" / "cli.py").is_file()
    assert not any((pkg / d).exists() for d in (".venv", ".git", "out", "tests"))

    # the shards: one row per image with a photo, captions and bytes as in the source files
    out = head.storage / "xflickrco-test"
    assert (out / "_SUCCESS.json").is_file()
    shards = sorted(out.glob("part-*.parquet"))
    assert len(shards) == 3                                            # 39 rows, 16 a shard
    rows = [r for p in shards for r in pq.read_table(p).to_pylist()]
    expected = xflickrco["expected"]
    assert sorted(r["image_id"] for r in rows) == sorted(expected)
    assert not xflickrco["missing"] & {r["image_id"] for r in rows}
    for r in rows:
        assert r["split"] == "test"
        assert {lang: r[f"captions_{lang}"] for lang in LANGS} == expected[r["image_id"]]
        assert hashlib.sha256(r["image"]).hexdigest() == xflickrco["sha256"][r["image_id"]]
    assert "39 rows written to 3 shards" in res.stdout and "missing_image: 2 " in res.stdout, res.stdout[-2000:]

    # a tiny model, then the evaluate job on the converted split
    model_dir = tmp_path / "model"
    tiny_model(model_dir, (c for caps in expected.values() for lang in LANGS for c in caps[lang]))
    t0 = time.monotonic()
    res = head.submit("ccrk-evaluate-1", "python", "jobs/evaluate.py", "--checkpoint", str(model_dir),
                      "--data", "${CCRK_STORAGE_PATH}/xflickrco-test", "--out", "${CCRK_STORAGE_PATH}/eval")
    t_eval = time.monotonic() - t0
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert job_status(head, "ccrk-evaluate-1")["status"] == "SUCCEEDED"
    report = json.loads((head.storage / "eval" / "report.json").read_text())
    assert (head.storage / "eval" / "report.md").is_file()
    assert report["num_images"] == 39 and list(report["languages"]) == list(LANGS)
    assert report["data"] == str(out) and report["model"] == str(model_dir)

    # the same numbers as evaluating this model on these shards in this process
    from ccrk_ray.data.transforms import ImageTransform, OneToKBatchTransform, split_from_batch
    from ccrk_ray.eval.report import report_from_ranks
    from ccrk_ray.eval.retrieval import evaluate_in_process
    from ccrk_ray.model import CCRKModel
    from ccrk_ray.data.tokenizer import CaptionTokenizer

    table = pq.read_table(out).sort_by("image_id")
    columns = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    batch = OneToKBatchTransform(CaptionTokenizer(model_dir, MAX_LENGTH), LANGS, len(LANGS),
                                 ImageTransform(IMAGE_SIZE, train=False))(columns)
    ref = report_from_ranks(evaluate_in_process(CCRKModel.from_pretrained(model_dir), split_from_batch(batch, LANGS)))
    one_image = 100 / 39
    for lang in LANGS:
        for d in ("t2i", "i2t"):
            for k in (1, 5, 10):
                got, want = report["languages"][lang][d][f"R@{k}"], ref["languages"][lang][d][f"R@{k}"]
                assert 0 <= got <= 100 and abs(got - want) <= one_image + 1e-9, (lang, d, k, got, want)
            assert report["languages"][lang][d]["chance@1"] == pytest.approx(one_image, rel=1e-6)
    for d in ("t2i", "i2t"):
        assert report["mrv"][d] == pytest.approx(ref["mrv"][d], rel=0.05, abs=0.05)
    # not a degenerate report: the languages' captions rank their images differently
    assert len({report["languages"][lang]["i2t"]["R@10"] for lang in LANGS}) > 1
    print(f"\njob wall times: convert {t_convert:.1f} s, evaluate {t_eval:.1f} s")


def test_pretrain_job_reads_its_locations_from_the_cluster(head, tiny_data, tmp_path):
    """The demo-sized pretrain job through `ray job submit`: its output location comes from the
    cluster's environment (``${CCRK_STORAGE_PATH}`` in the config file); the model it writes loads.
    (Resume is tested in tests/train/test_pretrain_ray.py; the evaluate job above.)"""
    from ccrk_ray.model.saved import load_model
    from tests.train.test_pretrain_ray import write_config

    config = write_config(tmp_path / "pretrain.yaml", tiny_data, Path("${CCRK_STORAGE_PATH}/pretrain"),
                          **{"train.max_steps": 3, "scaling.workers": [1, 1], "train.trace_dir": None})
    res = head.submit("ccrk-pretrain-1", "python", "jobs/pretrain.py", "--config", str(config))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert job_status(head, "ccrk-pretrain-1")["status"] == "SUCCEEDED"
    out = head.storage / "pretrain"
    assert json.loads((out / "train_result.json").read_text())["metrics"]["step"] == 3
    assert load_model(out / "model").config.embed_dim == 16
