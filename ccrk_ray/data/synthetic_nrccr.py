"""Synthetic data for NRCCR's claim, written in NRCCR's own layout (TextData caption files, a
FeatureData BigFile) so that ``convert_nrccr`` reads it as it reads the real thing.

Each item is a scene (``ccrk_ray.data.synthetic``) whose "image feature" is a fixed random
projection of its attributes plus Gaussian noise. Training captions: the English ``source`` of the
true scene; its machine ``translation`` into the target language, which with probability ``noise``
per caption is wrong — one attribute (the colour, kind, count or size) mistranslated, the same
way every time by default (``errors="systematic"``: blue always becomes green, as a translation
system errs consistently) or at random — and an optional detail dropped; the ``back_translation`` into English carries
the translation's errors (it is made from the same corrupted scene). Validation / test captions:
the ``native`` target-language caption of the true scene (people wrote it) and its English
translation ``native_en`` (clean). Nothing is downloaded; everything depends only on the seed.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from ccrk_ray.data.nrccr import VIEW_TAGS, write_bigfile
from ccrk_ray.data.synthetic import ATTRIBUTES, OPTIONAL_ATTRIBUTES, Scene, caption, sample_scene

SWAPPABLE = ("colour", "kind", "count", "size")
FEATURE_DIM = 32


def scene_vector(scene: Scene) -> np.ndarray:
    """One-hot of every attribute value, concatenated."""
    parts = []
    for name, values in ATTRIBUTES.items():
        v = np.zeros(len(values), dtype=np.float32)
        v[values.index(getattr(scene, name))] = 1.0
        parts.append(v)
    return np.concatenate(parts)


def projection(dim: int = FEATURE_DIM, seed: int = 1234) -> np.ndarray:
    width = sum(len(v) for v in ATTRIBUTES.values())
    return np.random.default_rng(seed).normal(size=(width, dim)).astype(np.float32) / np.sqrt(width)


ERRORS = ("systematic", "random")


def corrupt(scene: Scene, rng: np.random.Generator, errors: str = "systematic") -> Scene:
    """The scene with one swappable attribute changed: ``systematic`` — to the value after it
    (blue is always rendered green, a circle always a square: a word mistranslated the same way
    every time, as machine translation errs), ``random`` — to any other value."""
    name = SWAPPABLE[int(rng.integers(len(SWAPPABLE)))]
    allowed, current = ATTRIBUTES[name], getattr(scene, name)
    if errors == "systematic":
        wrong = allowed[(allowed.index(current) + 1) % len(allowed)]
    else:
        others = [v for v in allowed if v != current]
        wrong = others[int(rng.integers(len(others)))]
    return Scene(**{**{f: getattr(scene, f) for f in ATTRIBUTES}, name: wrong})


def write_split(root: str | Path, split: str, num_items: int, *, language: str = "de", noise: float = 0.0,
                errors: str = "systematic", captions_per_item: int = 2, seed: int = 0,
                feature_noise: float = 0.3) -> dict[str, Path]:
    """Write ``root/TextData/<split>_<tag>.txt`` for every view and ``root/FeatureData/<split>``;
    returns {view: caption file} (training views for ``split == "train"``, query views otherwise)
    plus ``"features"``."""
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    if errors not in ERRORS:
        raise ValueError(f"errors must be one of {', '.join(ERRORS)}, got {errors!r}")
    root = Path(root)
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    proj = projection()
    items, feats, lines = [], [], {}
    views = ("source", "translation", "back_translation") if split == "train" else ("native", "native_en")
    for i in range(num_items):
        item = f"{split}{i:05d}"
        scene = sample_scene(rng)
        items.append(item)
        feats.append(scene_vector(scene) @ proj + feature_noise * rng.normal(size=FEATURE_DIM).astype(np.float32))
        for k in range(captions_per_item):
            mention = frozenset(a for a in OPTIONAL_ATTRIBUTES if rng.random() < 0.7)
            if split == "train":
                wrong = rng.random() < noise
                seen = corrupt(scene, rng, errors) if wrong else scene
                said = (mention - {sorted(mention)[int(rng.integers(len(mention)))]}
                        if wrong and mention else mention)
                texts = {"source": caption(scene, "en", mention), "translation": caption(seen, language, said),
                         "back_translation": caption(seen, "en", said)}
            else:
                texts = {"native": caption(scene, language, mention), "native_en": caption(scene, "en", mention)}
            for view in views:
                tag = VIEW_TAGS[view].format(xx=language)
                lines.setdefault(view, []).append(f"{item}#{tag}#{k} {texts[view]}\n")
    text_dir = root / "TextData"
    text_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for view in views:
        path = text_dir / f"{split}_{VIEW_TAGS[view].format(xx=language)}.txt"
        path.write_text("".join(lines[view]), encoding="utf-8")
        out[view] = path
    out["features"] = write_bigfile(root / "FeatureData" / split, items, np.stack(feats))
    return out
