"""Output directories and small files that must never be left half-written.

``write_json`` writes a pointer or report atomically: a temporary file renamed over the target on
local disk (a crash leaves the old file or the new one, never a cut one), a single PUT on object
storage (which is atomic by itself).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from ccrk_ray.core import storage
from ccrk_ray.core.config import ConfigError


def write_json(uri: str | Path, value: Any, indent: int | None = None) -> None:
    """``value`` as JSON at ``uri`` (local path or ``s3://``…), atomically; parent folders made."""
    data = (json.dumps(value, indent=indent, default=str) + "\n").encode()
    if storage.is_remote(str(uri)):
        fs, path = storage.resolve(str(uri))
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(uri: str | Path) -> Any | None:
    """The JSON value at ``uri`` (local or remote), or None when there is no such file."""
    fs, path = storage.resolve(str(uri))
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def prepare_out_dir(out: Path, marker: str, outputs: tuple[str, ...], command: str) -> None:
    """Refuse a directory holding unrelated files; clear ``command``'s own outputs of an earlier
    run (the directory holds ``marker``)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory")
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir())
        if entries and marker not in entries:
            raise ConfigError(f"output directory {out} is not empty and not a ccrk {command} output "
                              f"(holds {', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''})")
        foreign = [e for e in entries if e not in outputs]
        if foreign:
            raise ConfigError(f"output directory {out} holds files ccrk {command} did not write: "
                              f"{', '.join(foreign[:3])}")
        for name in entries:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
