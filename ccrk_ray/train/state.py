"""Checkpoint layout (no pickled objects anywhere):

    <ckpt>/model/config.json, model.safetensors   the model (CCRKModel.save_pretrained)
    <ckpt>/training_state.pt                      optimiser + scheduler state dicts, the torch
                                                  RNG state and, training in float16, the gradient
                                                  scaler's (tensors and plain containers: loads
                                                  with weights_only=True)
    <ckpt>/progress.json                          epoch, step, and the data position inside the
                                                  epoch (``ccrk_ray.data.plan.Position``) or null
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from safetensors.torch import load_model as load_weights

from ccrk_ray.model import CCRKModel
from ccrk_ray.model.pretrained import WEIGHTS_NAME
from ccrk_ray.model.saved import CHECKPOINT_MODEL_DIR as MODEL_DIR

STATE_FILE = "training_state.pt"
PROGRESS_FILE = "progress.json"


def save_checkpoint(directory: str | Path, model: CCRKModel, optimizer, scheduler, progress: dict[str, Any],
                    scaler=None) -> Path:
    d = Path(directory)
    model.save_pretrained(d / MODEL_DIR)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}
    if scaler is not None and scaler.is_enabled():
        state["grad_scaler"] = scaler.state_dict()
    torch.save(state, d / STATE_FILE)
    (d / PROGRESS_FILE).write_text(json.dumps(progress, sort_keys=True))
    return d


def read_progress(fs, directory: str) -> dict[str, Any]:
    """The progress dict (step, epoch, data position) of the checkpoint at ``directory`` of the
    pyarrow filesystem ``fs``, read where it is stored: the weights are not fetched for it."""
    with fs.open_input_stream(f"{directory}/{PROGRESS_FILE}") as f:
        return json.loads(f.read())


def load_training_state(directory: str | Path, model: CCRKModel, optimizer, scheduler, scaler=None) -> None:
    """Load weights into ``model`` and states into optimiser/scheduler and the float16 gradient
    scaler, when both the checkpoint and this run have one (progress: ``read_progress``)."""
    d = Path(directory)
    load_weights(model, str(d / MODEL_DIR / WEIGHTS_NAME))
    state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if "rng" in state:
        torch.set_rng_state(state["rng"])
    if scaler is not None and scaler.is_enabled() and "grad_scaler" in state:
        scaler.load_state_dict(state["grad_scaler"])
