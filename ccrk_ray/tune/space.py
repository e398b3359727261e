"""The search space of ``ccrk tune`` and how one sample becomes a trial's ``ccrk finetune`` config.

See ``ccrk_ray.tune.sweep`` for the ``tune:`` section, hyperparameters and distributions.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from ccrk_ray.core.config import ConfigError, build, check_range, deep_merge
from ccrk_ray.tasks.finetune import load_config

HYPERPARAMETERS: dict[str, tuple[str, str, type]] = {   # name: (config section, key, type)
    "lr": ("train", "lr", float),
    "lr_mult": ("model", "lr_mult", float),
    "temperature": ("model", "temperature", float),
    "batch_size": ("train", "batch_size", int),
    "epochs": ("train", "epochs", int),
    "warmup": ("train", "warmup", float),
    "weight_decay": ("train", "weight_decay", float),
}
DISTRIBUTIONS = {"uniform": 2, "loguniform": 2, "quniform": 3, "qloguniform": 3, "randint": 2, "choice": None,
                 "grid": None}
SWEEP_METRICS = ("r_mean", "-mrv", "r_mean-mrv")     # what a sweep maximises (tune.objective)
TRIAL_NAME = "finetune"          # the Ray Train run name of every trial


@dataclass
class TuneSection:
    space: dict[str, Any] | None = None
    objective: str = "r_mean"
    mrv_weight: float = 1.0
    grace_period: int = 1
    reduction_factor: int = 2
    seed: int = 0
    name: str = "tune"

    @classmethod
    def from_dict(cls, d: Any, where: str = "tune") -> "TuneSection":
        t = build(cls, d, where)
        t.objective = str(t.objective).replace(" ", "")
        if t.objective not in SWEEP_METRICS:
            raise ConfigError(f"tune.objective must be one of {', '.join(SWEEP_METRICS)}, got {t.objective!r}")
        check_range("tune.mrv_weight", t.mrv_weight, 0)
        check_range("tune.grace_period", t.grace_period, 1)
        check_range("tune.reduction_factor", t.reduction_factor, 2)
        if t.space is not None and not isinstance(t.space, dict):
            raise ConfigError(f"tune.space must be a mapping of hyperparameter: distribution, got {t.space!r}")
        return t


@dataclass(frozen=True)
class Dist:
    """One hyperparameter's distribution: ``kind`` in DISTRIBUTIONS, or ``fixed`` (one value)."""
    kind: str
    args: tuple

    def corners(self) -> list:
        """The values a config must accept for every sample to be valid."""
        if self.kind in ("choice", "grid", "fixed"):
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return [self.args[0], self.args[1]]

    def to_tune(self):
        if self.kind == "fixed":
            return self.args[0]
        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def to_yaml(self):
        return self.args[0] if self.kind == "fixed" else {self.kind: list(self.args)}


def parse_dist(name: str, spec: Any) -> Dist:
    where = f"tune.space.{name}"
    if not isinstance(spec, dict):
        if isinstance(spec, (list, tuple)):
            raise ConfigError(f"{where}: a list needs a distribution, e.g. {{choice: {list(spec)}}}")
        return Dist("fixed", (spec,))
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: expected one of {', '.join(DISTRIBUTIONS)} (e.g. {{loguniform: [1.0e-5, 1.0e-4]}}) "
                          f"or a plain value, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, (list, tuple)) or not args:
        raise ConfigError(f"{where}: {kind} takes a non-empty list, got {args!r}")
    n = DISTRIBUTIONS[kind]
    if n is not None:
        if len(args) != n or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"{where}: {kind} takes {n} numbers "
                              f"[low, high{', q' if n == 3 else ''}], got {args!r}")
        lo, hi = args[0], args[1]
        if not lo < hi:
            raise ConfigError(f"{where}: {kind} needs low < high, got {args!r}")
        if "log" in kind and lo <= 0:
            raise ConfigError(f"{where}: {kind} needs low > 0, got {args!r}")
        if n == 3 and args[2] <= 0:
            raise ConfigError(f"{where}: {kind} needs q > 0, got {args!r}")
    return Dist(kind, tuple(args))


def parse_space(space: dict[str, Any]) -> dict[str, Dist]:
    if not space:
        raise ConfigError("tune.space is empty: name at least one hyperparameter to search "
                          f"({', '.join(HYPERPARAMETERS)}), or leave tune.space out for the default space")
    unknown = sorted(set(space) - set(HYPERPARAMETERS))
    if unknown:
        raise ConfigError(f"tune.space: unknown hyperparameter(s) {', '.join(map(str, unknown))} "
                          f"(known: {', '.join(HYPERPARAMETERS)})")
    out = {name: parse_dist(name, spec) for name, spec in space.items()}
    for name, d in out.items():
        if HYPERPARAMETERS[name][2] is int:
            ok = d.kind in ("randint", "choice", "grid", "fixed") and all(
                isinstance(v, int) and not isinstance(v, bool) for v in d.args)
            if not ok:
                raise ConfigError(f"tune.space.{name}: integer values only (a plain integer, or randint, choice or "
                                  f"grid of integers), got {d.to_yaml()!r}")
    if all(d.kind == "fixed" or (d.kind in ("choice", "grid") and len(set(map(repr, d.args))) == 1)
           for d in out.values()):
        raise ConfigError("tune.space varies no hyperparameter: nothing to search")
    return out


def default_space(cfg, fresh_layers: bool = False) -> dict[str, Dist]:
    """The space searched when the config's ``tune:`` has no ``space``: around the config's values
    (and ``lr_mult`` when the starting point has fresh layers)."""
    lr, bs = cfg.train.lr, cfg.train.batch_size
    extra = {"lr_mult": Dist("choice", (1.0, 2.0, 5.0))} if fresh_layers else {}
    return extra | {
        "lr": Dist("loguniform", (lr / 3, lr * 3)),
        "temperature": Dist("loguniform", (0.035, 0.14)),
        "batch_size": Dist("choice", tuple(sorted({max(2, bs // 2), bs}))),
        "epochs": Dist("fixed", (cfg.train.epochs,)),
        "warmup": Dist("uniform", (0.0, 0.2)),
        "weight_decay": Dist("choice", (0.0, 0.01, 0.05)),
    }


def _absolute(value):
    """Local paths made absolute (trials run in other processes and directories); URIs kept."""
    if isinstance(value, str) and value and "://" not in value:
        return str(Path(value).expanduser().resolve())
    if isinstance(value, dict):
        return {k: _absolute(v) for k, v in value.items()}
    return value


def absolute_paths(user: dict[str, Any]) -> dict[str, Any]:
    d = copy.deepcopy(user)
    for key in ("output_dir", "storage_path"):
        if d.get(key):
            d[key] = _absolute(d[key])
    data = d.get("data")
    if isinstance(data, dict):
        for key in ("train", "val", "test", "tokenizer"):
            if data.get(key):
                data[key] = _absolute(data[key])
    if isinstance(d.get("train"), dict) and d["train"].get("trace_dir"):
        d["train"]["trace_dir"] = _absolute(d["train"]["trace_dir"])
    return d


def overrides(params: dict[str, Any], workers_max: int) -> dict[str, Any]:
    """Config sections setting the hyperparameters ``params`` (values cast to their types)."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        section, key, kind = HYPERPARAMETERS[name]
        out.setdefault(section, {})[key] = kind(value)
    if "batch_size" in params:
        out["train"]["global_batch_size"] = int(params["batch_size"]) * workers_max
    return out


def trial_config(sweep: dict[str, Any], params: dict[str, Any], trial_id: str) -> dict[str, Any]:
    """The ``ccrk finetune`` config of one trial."""
    d = deep_merge(sweep["base"], overrides(params, sweep["workers_max"]))
    d["output_dir"] = str(Path(sweep["output_dir"]) / "trials" / trial_id)
    d["name"] = TRIAL_NAME
    if sweep.get("storage_path"):
        d["storage_path"] = f"{sweep['storage_path'].rstrip('/')}/{sweep['name']}/trials/{trial_id}"
    else:
        d.pop("storage_path", None)
    d.setdefault("train", {})["checkpoint_every"] = 0      # one report (one Tune result) per epoch
    if d["train"].get("trace_dir"):
        d["train"]["trace_dir"] = str(Path(d["train"]["trace_dir"]) / trial_id)
    return d


def write_yaml(path: Path, d: dict[str, Any], header: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(d, sort_keys=False))
    return path


def load_finetune(task: str, d: dict[str, Any], checkpoint: str):
    with tempfile.TemporaryDirectory() as tmp:
        return load_config(task, write_yaml(Path(tmp) / "config.yaml", d), checkpoint)
