"""The best-model store of a run: fine-tuning's best validation step and a sweep trial's best epoch.

    <best_dir>/best.json        {"dir", "metric", "score", "step", "epoch", "r_mean", "mrv"}
    <best_dir>/<dir>/           the model (config.json, model.safetensors)

``best_dir`` is local or any pyarrow URI (``s3://``). A new best is written to a directory of its
own first, then the pointer is replaced atomically (``ccrk_ray.core.files.write_json``), then the
earlier best is deleted: a crash at any point leaves a pointer naming a complete model. The
directory the pointer names is never written again (a resumed run that reaches the same step gets
a new name).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from ccrk_ray.core import storage
from ccrk_ray.core.files import read_json, write_json

BEST_FILE = "best.json"


class BestStore:
    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.root = storage.resolve(self.uri)

    def read(self) -> dict[str, Any] | None:
        """The pointer (see the module docstring), or None before the first save."""
        return read_json(f"{self.uri}/{BEST_FILE}")

    def _new_name(self, step: int, epoch: int, previous: dict[str, Any] | None) -> str:
        base = f"step_{step:08d}" if step >= 0 else f"epoch_{epoch:04d}"
        name, n = base, 1
        while (previous and previous.get("dir") == name) or \
                self.fs.get_file_info(f"{self.root}/{name}").type != pafs.FileType.NotFound:
            n += 1
            name = f"{base}.{n}"
        return name

    def _commit(self, name: str, previous: dict[str, Any] | None, record: dict[str, Any]) -> dict[str, Any]:
        record = {"dir": name, **record}
        write_json(f"{self.uri}/{BEST_FILE}", record)
        if previous and previous.get("dir") not in (None, name):
            try:
                self.fs.delete_dir(f"{self.root}/{previous['dir']}")
            except FileNotFoundError:
                pass
        return record

    def save_model(self, model, *, metric: str, score: float, step: int, epoch: int,
                   r_mean: float | None = None, mrv: float | None = None) -> dict[str, Any]:
        """Save ``model`` (``save_pretrained``) as the new best; returns the new pointer."""
        previous = self.read()
        name = self._new_name(step, epoch, previous)
        self.fs.create_dir(f"{self.root}/{name}", recursive=True)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            pafs.copy_files(tmp, f"{self.root}/{name}", source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        return self._commit(name, previous, {"metric": metric, "score": float(score), "step": int(step),
                                             "epoch": int(epoch), "r_mean": r_mean, "mrv": mrv})

    def save_copy(self, source_fs: pafs.FileSystem, source_path: str, *, metric: str, score: float, step: int,
                  epoch: int, r_mean: float | None = None, mrv: float | None = None) -> dict[str, Any]:
        """Copy a saved model directory (e.g. a committed checkpoint's ``model/``) as the new best."""
        previous = self.read()
        name = self._new_name(-1, epoch, previous)
        self.fs.create_dir(f"{self.root}/{name}", recursive=True)
        pafs.copy_files(source_path, f"{self.root}/{name}", source_filesystem=source_fs, destination_filesystem=self.fs)
        return self._commit(name, previous, {"metric": metric, "score": float(score), "step": int(step),
                                             "epoch": int(epoch), "r_mean": r_mean, "mrv": mrv})

    def download(self, local_dir: str) -> dict[str, Any] | None:
        """Copy the best model into the local directory ``local_dir``; its pointer, or None."""
        best = self.read()
        if best is None:
            return None
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(f"{self.root}/{best['dir']}", str(local_dir), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return best
