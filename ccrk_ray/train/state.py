"""Checkpoint layout (no pickled objects anywhere):

    <ckpt>/model/config.json, model.safetensors   the model (CCRKModel.save_pretrained)
    <ckpt>/training_state.pt                      optimiser + scheduler state dicts and the torch
                                                  RNG state (tensors and plain containers: loads
                                                  with weights_only=True)
    <ckpt>/progress.json                          epoch, step, and the data position inside the
                                                  epoch (``ccrk_ray.data.plan.Position``) or null
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ccrk_ray.model import CCRKModel

MODEL_DIR = "model"
STATE_FILE = "training_state.pt"
PROGRESS_FILE = "progress.json"


def save_checkpoint(directory: str | Path, model: CCRKModel, optimizer, scheduler, progress: dict[str, Any]) -> Path:
    d = Path(directory)
    model.save_pretrained(d / MODEL_DIR)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state()}, d / STATE_FILE)
    (d / PROGRESS_FILE).write_text(json.dumps(progress, sort_keys=True))
    return d


def read_progress(fs, directory: str) -> dict[str, Any]:
    """The progress dict (step, epoch, data position) of the checkpoint at ``directory`` of the
    pyarrow filesystem ``fs``, read where it is stored: the weights are not fetched for it."""
    with fs.open_input_stream(f"{directory}/{PROGRESS_FILE}") as f:
        return json.loads(f.read())


def load_training_state(directory: str | Path, model: CCRKModel, optimizer, scheduler) -> None:
    """Load weights into ``model`` and states into optimiser/scheduler (progress: ``read_progress``)."""
    from safetensors.torch import load_model

    d = Path(directory)
    load_model(model, str(d / MODEL_DIR / "model.safetensors"))
    state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if "rng" in state:
        torch.set_rng_state(state["rng"])


def load_model(checkpoint_dir: str | Path) -> CCRKModel:
    """The model of a training checkpoint (or of a plain saved model directory)."""
    d = Path(checkpoint_dir)
    return CCRKModel.from_pretrained(d / MODEL_DIR if (d / MODEL_DIR).is_dir() else d)


BEST_FILE = "best.json"


def save_best(model: CCRKModel, best_dir: str, step: int, score: float) -> str:
    """Save ``model`` as ``best_dir/step_<step>`` (local or any pyarrow URI such as ``s3://``), then
    point ``best_dir/best.json`` at it and delete the earlier best. The pointer is written last,
    so a crash mid-save leaves the previous best in place. Returns the new directory's URI."""
    import tempfile

    import pyarrow.fs as pafs

    from ccrk_ray.data import storage

    fs, root = storage.resolve(best_dir)
    name = f"step_{step:08d}"
    previous = read_best(best_dir)
    fs.create_dir(f"{root}/{name}", recursive=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        pafs.copy_files(tmp, f"{root}/{name}", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    uri = f"{best_dir.rstrip('/')}/{name}"
    with fs.open_output_stream(f"{root}/{BEST_FILE}") as f:
        f.write(json.dumps({"step": step, "r_mean": score, "dir": name}).encode())
    if previous and previous["dir"] != name:
        fs.delete_dir(f"{root}/{previous['dir']}")
    return uri


def read_best(best_dir: str) -> dict[str, Any] | None:
    """The ``best.json`` pointer of ``best_dir`` (step, r_mean, dir), or None."""
    import pyarrow.fs as pafs

    from ccrk_ray.data import storage

    fs, root = storage.resolve(best_dir)
    if fs.get_file_info(f"{root}/{BEST_FILE}").type != pafs.FileType.File:
        return None
    with fs.open_input_stream(f"{root}/{BEST_FILE}") as f:
        return json.loads(f.read())
