"""Typed configuration shared by the commands, and the error type for bad user input."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input (a flag, a config value, an output directory): reported as one line."""


def check_range(name: str, value, lo=None, hi=None) -> None:
    """Raise ConfigError naming ``name`` when ``value`` is outside [lo, hi]."""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{name} must be {bounds}, got {value}")
