"""The package's output for a person: one ``logging`` logger tree (``ccrk.*``) and progress bars.

Commands call ``setup_logging(verbosity)`` once: ``-1`` (``--quiet``) shows warnings and errors,
``0`` our progress lines, ``1`` (``--verbose``) debug lines too, and Ray's own chatter (see
``ccrk_ray.core.runtime``). Library code only calls ``get_logger(__name__)`` and ``progress(...)``;
nothing below the commands prints.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

ROOT = "ccrk"
_state = {"verbosity": 0}
T = TypeVar("T")


class _Elapsed(logging.Formatter):
    """``[ccrk 12.3s] message``: seconds since the command started, so slow phases stand out."""

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        text = f"[ccrk {record.created - _START_WALL:6.1f}s] {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


_START_WALL = time.time()


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (``ccrk_ray.x.y`` → ``ccrk.x.y``)."""
    return logging.getLogger(ROOT + name.removeprefix("ccrk_ray"))


def setup_logging(verbosity: int = 0, stream=None) -> None:
    """Our lines go to stdout (progress bars to stderr); calling it again replaces the handler."""
    global _START_WALL
    _state["verbosity"] = verbosity
    root = logging.getLogger(ROOT)
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO if verbosity == 0 else logging.WARNING)
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(_Elapsed())
    root.addHandler(handler)
    _START_WALL = time.time()


def verbosity() -> int:
    return _state["verbosity"]


def bars_enabled() -> bool:
    """Progress bars are for a person at a terminal; logs (CI, ``ray job`` logs) get lines instead."""
    return verbosity() >= 0 and sys.stderr.isatty()


def progress(iterable: Iterable[T] | None = None, *, total: int | float | None = None, desc: str = "",
             unit: str = "it", disable: bool | None = None, **kwargs) -> "tqdm[T]":
    """A progress bar with rate and ETA on stderr (tqdm); off under ``--quiet``. Outside a
    terminal it refreshes at most every 30 s so logs stay readable."""
    if disable is None:
        disable = verbosity() < 0
    tty = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True,
                mininterval=0.2 if tty else 30.0, leave=True, **kwargs)
