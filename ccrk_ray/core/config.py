"""Configuration plumbing shared by every layer: the error type for bad user input, strict
construction of config dataclasses from YAML mappings (unknown keys and wrong types named), range
checks, ``${VAR}`` expansion and merging of config layers."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

T = TypeVar("T")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(ValueError):
    """Bad user input (a flag, a config value, a path, a model or tokenizer that cannot be
    loaded): reported as one line, exit code 2."""


class DataError(ValueError):
    """Input data that cannot be used (not parquet, the wrong schema, unreachable storage, no
    rows): reported as one line naming the file, exit code 1."""


class NoDataError(FileNotFoundError, ConfigError):
    """No data where a flag or config value points: a usage error (exit code 2), and a
    FileNotFoundError for callers that treat it as one."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (library errors can run to pages), shortened."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


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


def read_yaml(path: str | Path, flag: str = "--config") -> dict[str, Any]:
    """A YAML mapping with ``${VAR}`` expanded; a missing file or bad YAML is one ConfigError."""
    try:
        d = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{flag} {path}: is a directory, not a YAML file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{flag} {path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{flag} {path}: expected a mapping at the top level")
    return expand_vars(d, where=str(path))


def parse_sets(items: Sequence[str] | None) -> dict[str, Any]:
    """``--set section.key=value`` items as a nested mapping (values read as YAML: ``3``, ``1e-4``,
    ``true``, ``[en, de]``, ``null``); the config's typed checks then name a bad key or value."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.lr=1e-4")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({' '.join(str(exc).split())})") from None
        if isinstance(value, str):
            try:
                value = float(value) if text.strip().lower() not in ("nan", "inf", "-inf") else value
            except ValueError:
                pass                    # a string value (YAML reads 1e-4 as a string; a number here)
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p.strip(), {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is set to a value above")
        node[parts[-1].strip()] = value
    return out


def read_config(path: str | Path, sets: Sequence[str] | None = None) -> dict[str, Any]:
    """The YAML file ``path`` with the command line's ``--set`` items on top."""
    return deep_merge(read_yaml(path), parse_sets(sets))


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``, mapping by mapping (lists and scalars replace)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin in (tuple, list):
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"[{', '.join(_type_name(a) for a in args)}]"
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(hint, str(hint))


class _Mismatch(Exception):
    pass


def coerce(value: Any, hint: Any) -> Any:
    """``value`` as the declared type ``hint`` (int, float, bool, str, None, unions, tuple/list of
    one type or fixed length, dict, Any), converting only losslessly (an int where a float is
    declared, a list where a tuple is); raises _Mismatch otherwise. YAML's ``"32"`` is a string,
    not an int, and ``2.5`` is not an int: both are mismatches."""
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Mismatch
            return tuple(coerce(v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        out = [coerce(v, item) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _Mismatch
    return value


def check_types(cls: type, d: Any, where: str) -> dict[str, Any]:
    """The mapping ``d`` checked against the fields of the dataclass ``cls``: an unknown key, or a
    value that is not of its field's declared type, is one ConfigError naming ``where``.key and
    the value. Returns the values converted losslessly (``coerce``)."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: must be a mapping, got {d!r}")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(d) - set(names), key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} (known: {', '.join(names)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in d.items():
        try:
            values[key] = coerce(value, hints[key])
        except _Mismatch:
            raise ConfigError(f"{where}.{key}: expected {_type_name(hints[key])}, got {value!r}") from None
    return values


def build(cls: type[T], d: Any, where: str) -> T:
    """The dataclass ``cls`` from the mapping ``d``, strictly (``check_types``); a value its own
    checks refuse is a ConfigError naming ``where`` too."""
    values = check_types(cls, d, where)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
