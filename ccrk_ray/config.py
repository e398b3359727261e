"""Typed configuration shared by the commands, and the error type for bad user input."""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(ValueError):
    """Bad user input (a flag, a config value, an output directory): reported as one line."""


def check_range(name: str, value, lo=None, hi=None) -> None:
    """Raise ConfigError naming ``name`` when ``value`` is outside [lo, hi]."""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{name} must be {bounds}, got {value}")


def expand_vars(value: Any, environ: Mapping[str, str] | None = None, where: str = "config") -> Any:
    """``value`` (a string, or lists/mappings of them) with every ``${NAME}`` replaced by the
    environment variable NAME — how cluster configs and job submissions pass data and storage
    locations. Unset or empty variables are one ConfigError naming them all; a lone ``$`` stays."""
    env = os.environ if environ is None else environ
    missing: set[str] = set()

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            missing.update(m.group(1) for m in _VAR.finditer(v) if not env.get(m.group(1)))
            return _VAR.sub(lambda m: env.get(m.group(1)) or m.group(0), v)
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        return v

    out = walk(value)
    if missing:
        raise ConfigError(f"{where}: environment variable(s) not set: {', '.join(sorted(missing))}")
    return out
