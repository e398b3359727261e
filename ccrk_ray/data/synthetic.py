"""A procedural multilingual image–caption data set (the project's demo data).

Each image shows one group of ``count`` identical objects (``kind``, ``colour``, ``size``) placed at
a ``position`` on a ``background``; every image comes with one grammatical caption per language
built from the same scene description. Optional attributes (size, position, background) may be
left out of a caption, so captions of one image differ in detail between languages.

Pure numpy + Pillow + pyarrow: no Ray, no torch, nothing downloaded.

Determinism: row ``i`` of split ``split`` depends only on ``(seed, split, i)`` — not on
``num_images``, ``rows_per_shard`` or the other languages asked for — so a bigger data set extends
a smaller one, and the same arguments give the same parquet bytes.
"""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import re
import zlib
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from ccrk_ray.data.schema import IMAGE, IMAGE_ID, ROW_GROUP_ROWS, SOURCE, SPLIT, arrow_schema, caption_column
from ccrk_ray.core.languages import CCRK_LANGUAGES, validate_languages

__all__ = [
    "ATTRIBUTES",
    "OPTIONAL_ATTRIBUTES",
    "SCENE_COLUMN",
    "SOURCE_NAME",
    "Scene",
    "sample_scene",
    "layout_scene",
    "render_scene",
    "caption",
    "sample_captions",
    "generate_split",
]

# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------

ATTRIBUTES: dict[str, tuple] = {
    "count": (1, 2, 3),
    "kind": ("circle", "square", "triangle", "star", "cross"),
    "colour": ("red", "green", "blue", "yellow", "purple", "orange"),
    "size": ("small", "large"),
    "position": ("left", "right", "top", "bottom", "centre"),
    "background": ("white", "black", "grey", "striped"),
}

# Attributes a caption may leave out; count, kind and colour are always mentioned.
OPTIONAL_ATTRIBUTES: tuple[str, ...] = ("size", "position", "background")

SCENE_COLUMN = "scene"
SOURCE_NAME = "synthetic"


@dataclass(frozen=True)
class Scene:
    count: int
    kind: str
    colour: str
    size: str
    position: str
    background: str

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            allowed = ATTRIBUTES[f.name]
            if f.name == "count":
                ok = (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
                      and int(value) in allowed)
                if ok and type(value) is not int:
                    object.__setattr__(self, "count", int(value))  # numpy int -> int (JSON-able)
            else:
                ok = isinstance(value, str) and value in allowed
            if not ok:
                raise ValueError(f"Scene.{f.name} must be one of {allowed}, got {value!r}")

    def to_json(self) -> str:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str | bytes) -> "Scene":
        try:
            data = json.loads(s)
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a Scene JSON object: {s!r} ({e})") from None
        names = [f.name for f in fields(cls)]
        if not isinstance(data, dict) or sorted(data) != sorted(names):
            raise ValueError(f"a Scene JSON object needs exactly the keys {names}, got {s!r}")
        return cls(**data)


def sample_scene(rng: np.random.Generator) -> Scene:
    """A scene with every attribute drawn uniformly and independently."""
    return Scene(**{name: values[int(rng.integers(len(values)))] for name, values in ATTRIBUTES.items()})


# ---------------------------------------------------------------------------------------------
# Rendering. All geometry is in fractions of the image side, so any image_size >= 32 works.
# ---------------------------------------------------------------------------------------------

_MIN_IMAGE_SIZE = 32
_SUPERSAMPLE = 4                      # draw at 4x and box-downsample: anti-aliased shapes
_OBJECT_SIDE = {"small": 0.12, "large": 0.24}   # side of an object's square cell
_GAP = 0.05                           # nominal gap between neighbouring cells
_OBJECT_JITTER = 0.01                 # per object, each axis (< _GAP / 2: cells never touch)
_CLUSTER_JITTER = 0.03                # whole group, across its axis
_ALONG_JITTER = 0.12                  # whole group, along the left/right column or top/bottom row
_MARGIN = 0.02                        # cells stay this far from the image border
_OUTLINE = 0.06                       # dark outline width, fraction of the object's cell side

# Where the group's centre sits (x, y), and how its members are laid out.
_ANCHORS = {"left": (1 / 6, 0.5), "right": (5 / 6, 0.5), "top": (0.5, 1 / 6),
            "bottom": (0.5, 5 / 6), "centre": (0.5, 0.5)}

_FILL = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 235),
    "yellow": (250, 215, 20),
    "purple": (145, 45, 200),
    "orange": (250, 130, 15),
}
_OUTLINE_COLOUR = (25, 25, 25)
_PLAIN_BACKGROUND = {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128)}
_STRIPES = ((240, 240, 240), (170, 170, 170))   # light/mid grey diagonal stripes
_STRIPE_PERIOD = 1 / 6                          # one light + one dark stripe, fraction of the side


def _cluster_offsets(count: int, position: str) -> np.ndarray:
    """Cell centres of the group in units of the cell pitch, centred on (0, 0)."""
    if position in ("left", "right"):          # a column in the left/right third
        offs = [(0.0, k - (count - 1) / 2) for k in range(count)]
    elif position in ("top", "bottom"):        # a row in the top/bottom third
        offs = [(k - (count - 1) / 2, 0.0) for k in range(count)]
    else:                                      # a compact cluster around the centre
        offs = {1: [(0.0, 0.0)], 2: [(-0.5, 0.0), (0.5, 0.0)],
                3: [(-0.5, -0.5), (0.5, -0.5), (0.0, 0.5)]}[count]
    arr = np.asarray(offs, dtype=np.float64)
    return arr - arr.mean(axis=0)


def _check_image_size(image_size: int) -> int:
    if (not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool)
            or image_size < _MIN_IMAGE_SIZE):
        raise ValueError(f"image_size must be an integer >= {_MIN_IMAGE_SIZE}, got {image_size!r}")
    return int(image_size)


def layout_scene(scene: Scene, rng: np.random.Generator, image_size: int = 64
                 ) -> list[tuple[float, float, float, float]]:
    """The square cells ``(x0, y0, x1, y1)`` (pixels, continuous coordinates) of the objects.

    Each object is drawn inside its cell. ``render_scene`` takes its randomness only from this
    function, so for a generator in the same state it draws exactly these cells. Cells lie inside
    ``[margin, image_size - margin]`` and are pairwise separated by at least
    ``(_GAP - 2 * _OBJECT_JITTER) * image_size`` pixels.
    """
    size = float(_check_image_size(image_size))
    side = _OBJECT_SIDE[scene.size] * size
    pitch = side + _GAP * size
    centres = _cluster_offsets(scene.count, scene.position) * pitch
    centres += rng.uniform(-_OBJECT_JITTER, _OBJECT_JITTER, size=centres.shape) * size
    # Always draw the same number of variates, whatever the position (keeps streams aligned).
    shift = rng.uniform(-1.0, 1.0, size=2)
    scale = np.full(2, _CLUSTER_JITTER)
    if scene.position in ("left", "right"):
        scale[1] = _ALONG_JITTER
    elif scene.position in ("top", "bottom"):
        scale[0] = _ALONG_JITTER
    centres += (np.asarray(_ANCHORS[scene.position]) + shift * scale) * size
    # Shift the whole group (never single objects: that could make them touch) into the image.
    lo_allowed, hi_allowed = _MARGIN * size, size - _MARGIN * size
    lo = centres.min(axis=0) - side / 2
    hi = centres.max(axis=0) + side / 2
    centres += np.maximum(lo_allowed - lo, 0.0) - np.maximum(hi - hi_allowed, 0.0)
    half = side / 2
    return [(float(x - half), float(y - half), float(x + half), float(y + half)) for x, y in centres]


@lru_cache(maxsize=32)
def _background(background: str, canvas_size: int, image_size: int) -> Image.Image:
    if background in _PLAIN_BACKGROUND:
        return Image.new("RGB", (canvas_size, canvas_size), _PLAIN_BACKGROUND[background])
    if background != "striped":
        raise ValueError(f"unknown background {background!r}")
    scale = canvas_size / image_size
    half_period = max(1.0, _STRIPE_PERIOD * image_size * scale / 2)
    idx = np.arange(canvas_size)
    band = ((idx[:, None] + idx[None, :]) // half_period).astype(np.int64) % 2   # diagonal stripes
    arr = np.asarray(_STRIPES, dtype=np.uint8)[band]
    return Image.fromarray(arr, "RGB")


def _shape_polygon(kind: str, x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if kind == "square":
        h = 0.88 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":  # upright, base = cell width, height 0.9 of it
        return [(cx, cy - 0.9 * r), (x1, cy + 0.9 * r), (x0, cy + 0.9 * r)]
    if kind == "star":      # five points, centred vertically in the cell
        dy = r * (1 - math.cos(math.pi / 5)) / 2
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.5 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + dy + rad * math.sin(a)))
        return pts
    if kind == "cross":     # a "+" sign, arms one third of the cell wide
        t = r / 3
        return [(cx - t, y0), (cx + t, y0), (cx + t, cy - t), (x1, cy - t), (x1, cy + t),
                (cx + t, cy + t), (cx + t, y1), (cx - t, y1), (cx - t, cy + t), (x0, cy + t),
                (x0, cy - t), (cx - t, cy - t)]
    raise ValueError(f"unknown kind {kind!r}")


def render_scene(scene: Scene, rng: np.random.Generator, image_size: int = 64) -> Image.Image:
    """Draw ``scene`` as an ``image_size`` x ``image_size`` RGB image (see ``layout_scene``)."""
    size = _check_image_size(image_size)
    cells = layout_scene(scene, rng, size)
    ss = _SUPERSAMPLE
    canvas = _background(scene.background, size * ss, size).copy()
    draw = ImageDraw.Draw(canvas)
    fill = _FILL[scene.colour]
    for x0, y0, x1, y1 in cells:
        width = max(1, round(_OUTLINE * (x1 - x0) * ss))   # drawn inside the shape
        # Cell [x0, x1) in image pixels -> hi-res pixels [x0*ss, x1*ss - 1] (PIL boxes are inclusive).
        box = (x0 * ss, y0 * ss, x1 * ss - 1, y1 * ss - 1)
        if scene.kind == "circle":
            draw.ellipse(box, fill=fill, outline=_OUTLINE_COLOUR, width=width)
        else:
            draw.polygon(_shape_polygon(scene.kind, *box), fill=fill, outline=_OUTLINE_COLOUR,
                         width=width)
    return canvas.reduce(ss)


# ---------------------------------------------------------------------------------------------
# Captions: one small function per language, vocabulary in per-language tables.
# ---------------------------------------------------------------------------------------------

def _capitalise(text: str, lang: str) -> str:
    if not text:
        return text
    first = text[0]
    if lang == "tr":
        first = {"i": "İ", "ı": "I"}.get(first, first.upper())
    else:
        first = first.upper()
    return first + text[1:]


# English ------------------------------------------------------------------------------------
_EN = {
    "kind": {"circle": ("circle", "circles"), "square": ("square", "squares"),
             "triangle": ("triangle", "triangles"), "star": ("star", "stars"),
             "cross": ("cross", "crosses")},
    "colour": {"red": "red", "green": "green", "blue": "blue", "yellow": "yellow",
               "purple": "purple", "orange": "orange"},
    "size": {"small": "small", "large": "large"},
    "number": {2: "two", 3: "three"},
    "position": {"left": "on the left", "right": "on the right", "top": "at the top",
                 "bottom": "at the bottom", "centre": "in the centre"},
    "background": {"white": "on a white background", "black": "on a black background",
                   "grey": "on a grey background", "striped": "on a striped background"},
}


def _place_phrases(t: dict, s: Scene, m: frozenset[str]) -> list[str]:
    """The position and background phrases a caption mentions, in that order."""
    return [t[a][getattr(s, a)] for a in ("position", "background") if a in m]


def _caption_en(s: Scene, m: frozenset[str]) -> str:
    t = _EN
    words = [t["size"][s.size]] if "size" in m else []
    words += [t["colour"][s.colour], t["kind"][s.kind][s.count > 1]]
    if s.count == 1:
        article = "an" if words[0][0] in "aeiou" else "a"
        parts = ["There is", article]
    else:
        parts = ["There are", t["number"][s.count]]
    parts += words
    parts += _place_phrases(t, s, m)
    return _capitalise(" ".join(parts), "en") + "."


# German: a noun phrase in the nominative; mixed declension after "ein" in the singular,
# no article and strong plural ending -e after zwei/drei; background in the strong dative.
_DE = {
    "kind": {"circle": ("Kreis", "Kreise", "m"), "square": ("Quadrat", "Quadrate", "n"),
             "triangle": ("Dreieck", "Dreiecke", "n"), "star": ("Stern", "Sterne", "m"),
             "cross": ("Kreuz", "Kreuze", "n")},
    # adjective stems (all declinable: no "lila"/"orange")
    "size": {"small": "klein", "large": "groß"},
    "colour": {"red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb",
               "purple": "violett", "orange": "orangefarben"},
    "ending": {"m": "er", "n": "es", "pl": "e"},   # after "ein" (nominative) / plural, no article
    "number": {1: "ein", 2: "zwei", 3: "drei"},
    "position": {"left": "links", "right": "rechts", "top": "oben", "bottom": "unten",
                 "centre": "in der Mitte"},
    "background": {"white": "auf weißem Hintergrund", "black": "auf schwarzem Hintergrund",
                   "grey": "auf grauem Hintergrund", "striped": "auf gestreiftem Hintergrund"},
}


def _caption_de(s: Scene, m: frozenset[str]) -> str:
    t = _DE
    singular, plural, gender = t["kind"][s.kind]
    ending = t["ending"][gender if s.count == 1 else "pl"]
    adjectives = [t["size"][s.size]] if "size" in m else []
    adjectives.append(t["colour"][s.colour])
    parts = [t["number"][s.count]] + [a + ending for a in adjectives]
    parts.append(singular if s.count == 1 else plural)
    parts += _place_phrases(t, s, m)
    return _capitalise(" ".join(parts), "de") + "."


# French: size before the noun, colour after it; both agree in gender and number.
# Adjective forms: (masc. sg, fem. sg, masc. pl, fem. pl).
_FR = {
    "kind": {"circle": ("cercle", "cercles", "m"), "square": ("carré", "carrés", "m"),
             "triangle": ("triangle", "triangles", "m"), "star": ("étoile", "étoiles", "f"),
             "cross": ("croix", "croix", "f")},
    "size": {"small": ("petit", "petite", "petits", "petites"),
             "large": ("grand", "grande", "grands", "grandes")},
    "colour": {"red": ("rouge", "rouge", "rouges", "rouges"),
               "green": ("vert", "verte", "verts", "vertes"),
               "blue": ("bleu", "bleue", "bleus", "bleues"),
               "yellow": ("jaune", "jaune", "jaunes", "jaunes"),
               "purple": ("violet", "violette", "violets", "violettes"),
               "orange": ("orange", "orange", "orange", "orange")},   # invariable
    "determiner": {(1, "m"): "un", (1, "f"): "une", 2: "deux", 3: "trois"},
    "position": {"left": "à gauche", "right": "à droite", "top": "en haut", "bottom": "en bas",
                 "centre": "au centre"},
    "background": {"white": "sur un fond blanc", "black": "sur un fond noir",
                   "grey": "sur un fond gris", "striped": "sur un fond rayé"},
}


def _caption_fr(s: Scene, m: frozenset[str]) -> str:
    t = _FR
    singular, plural, gender = t["kind"][s.kind]
    form = (0 if gender == "m" else 1) + (0 if s.count == 1 else 2)
    parts = ["il y a", t["determiner"][(1, gender) if s.count == 1 else s.count]]
    if "size" in m:
        parts.append(t["size"][s.size][form])
    parts += [singular if s.count == 1 else plural, t["colour"][s.colour][form]]
    parts += _place_phrases(t, s, m)
    return _capitalise(" ".join(parts), "fr") + "."


# Spanish: colour then size after the noun ("un círculo rojo pequeño"); pre-nominal singular
# "grande" would have to become "gran" (with a "great" reading), so size goes after the colour.
# Adjective forms: (masc. sg, fem. sg, masc. pl, fem. pl).
_ES = {
    "kind": {"circle": ("círculo", "círculos", "m"), "square": ("cuadrado", "cuadrados", "m"),
             "triangle": ("triángulo", "triángulos", "m"), "star": ("estrella", "estrellas", "f"),
             "cross": ("cruz", "cruces", "f")},
    "size": {"small": ("pequeño", "pequeña", "pequeños", "pequeñas"),
             "large": ("grande", "grande", "grandes", "grandes")},
    "colour": {"red": ("rojo", "roja", "rojos", "rojas"),
               "green": ("verde", "verde", "verdes", "verdes"),
               "blue": ("azul", "azul", "azules", "azules"),
               "yellow": ("amarillo", "amarilla", "amarillos", "amarillas"),
               "purple": ("morado", "morada", "morados", "moradas"),
               "orange": ("naranja", "naranja", "naranja", "naranja")},   # invariable
    "determiner": {(1, "m"): "un", (1, "f"): "una", 2: "dos", 3: "tres"},
    "position": {"left": "a la izquierda", "right": "a la derecha", "top": "arriba",
                 "bottom": "abajo", "centre": "en el centro"},
    "background": {"white": "sobre un fondo blanco", "black": "sobre un fondo negro",
                   "grey": "sobre un fondo gris", "striped": "sobre un fondo rayado"},
}


def _caption_es(s: Scene, m: frozenset[str]) -> str:
    t = _ES
    singular, plural, gender = t["kind"][s.kind]
    form = (0 if gender == "m" else 1) + (0 if s.count == 1 else 2)
    parts = ["hay", t["determiner"][(1, gender) if s.count == 1 else s.count],
             singular if s.count == 1 else plural, t["colour"][s.colour][form]]
    if "size" in m:
        parts.append(t["size"][s.size][form])
    parts += _place_phrases(t, s, m)
    return _capitalise(" ".join(parts), "es") + "."


# Czech: a nominative noun phrase; no numeral in the singular, dva (masc.) / dvě (fem.), tři.
# Adjective forms: (masc. sg, fem. sg, nominative pl for masc. inanimate and fem: -é).
_CS = {
    "kind": {"circle": ("kruh", "kruhy", "m"), "square": ("čtverec", "čtverce", "m"),
             "triangle": ("trojúhelník", "trojúhelníky", "m"), "star": ("hvězda", "hvězdy", "f"),
             "cross": ("kříž", "kříže", "m")},
    "size": {"small": ("malý", "malá", "malé"), "large": ("velký", "velká", "velké")},
    "colour": {"red": ("červený", "červená", "červené"), "green": ("zelený", "zelená", "zelené"),
               "blue": ("modrý", "modrá", "modré"), "yellow": ("žlutý", "žlutá", "žluté"),
               "purple": ("fialový", "fialová", "fialové"),
               "orange": ("oranžový", "oranžová", "oranžové")},
    "number": {(2, "m"): "dva", (2, "f"): "dvě", (3, "m"): "tři", (3, "f"): "tři"},
    "position": {"left": "vlevo", "right": "vpravo", "top": "nahoře", "bottom": "dole",
                 "centre": "uprostřed"},
    "background": {"white": "na bílém pozadí", "black": "na černém pozadí",
                   "grey": "na šedém pozadí", "striped": "na pruhovaném pozadí"},
}


def _caption_cs(s: Scene, m: frozenset[str]) -> str:
    t = _CS
    singular, plural, gender = t["kind"][s.kind]
    form = 2 if s.count > 1 else (0 if gender == "m" else 1)
    parts = [t["number"][(s.count, gender)]] if s.count > 1 else []
    if "size" in m:
        parts.append(t["size"][s.size][form])
    parts += [t["colour"][s.colour][form], singular if s.count == 1 else plural]
    parts += _place_phrases(t, s, m)
    return _capitalise(" ".join(parts), "cs") + "."


# Russian: a nominative noun phrase; with два/две/три the noun is genitive singular, masculine
# adjectives genitive plural, feminine adjectives nominative plural.
# Adjective forms: (masc. sg, fem. sg, genitive pl, nominative pl).
_RU = {
    "kind": {"circle": ("круг", "круга", "m"), "square": ("квадрат", "квадрата", "m"),
             "triangle": ("треугольник", "треугольника", "m"), "star": ("звезда", "звезды", "f"),
             "cross": ("крест", "креста", "m")},   # (nominative sg, genitive sg, gender)
    "size": {"small": ("маленький", "маленькая", "маленьких", "маленькие"),
             "large": ("большой", "большая", "больших", "большие")},
    "colour": {"red": ("красный", "красная", "красных", "красные"),
               "green": ("зелёный", "зелёная", "зелёных", "зелёные"),
               "blue": ("синий", "синяя", "синих", "синие"),
               "yellow": ("жёлтый", "жёлтая", "жёлтых", "жёлтые"),
               "purple": ("фиолетовый", "фиолетовая", "фиолетовых", "фиолетовые"),
               "orange": ("оранжевый", "оранжевая", "оранжевых", "оранжевые")},
    "number": {(2, "m"): "два", (2, "f"): "две", (3, "m"): "три", (3, "f"): "три"},
    "position": {"left": "слева", "right": "справа", "top": "сверху", "bottom": "снизу",
                 "centre": "в центре"},
    "background": {"white": "на белом фоне", "black": "на чёрном фоне", "grey": "на сером фоне",
                   "striped": "на полосатом фоне"},
}


def _caption_ru(s: Scene, m: frozenset[str]) -> str:
    t = _RU
    nominative, genitive, gender = t["kind"][s.kind]
    if s.count == 1:
        form = 0 if gender == "m" else 1
    else:
        form = 2 if gender == "m" else 3
    parts = [t["number"][(s.count, gender)]] if s.count > 1 else []
    if "size" in m:
        parts.append(t["size"][s.size][form])
    parts += [t["colour"][s.colour][form], nominative if s.count == 1 else genitive]
    parts += _place_phrases(t, s, m)
    return _capitalise(" ".join(parts), "ru") + "."


# Turkish: "[background] [position] <adjectives> bir <noun> var." / "<number> <adjectives> <noun>"
# (no plural suffix after a numeral); "Resimde ... var." when neither place is mentioned.
_TR = {
    "kind": {"circle": "daire", "square": "kare", "triangle": "üçgen", "star": "yıldız",
             "cross": "artı işareti"},
    "size": {"small": "küçük", "large": "büyük"},
    "colour": {"red": "kırmızı", "green": "yeşil", "blue": "mavi", "yellow": "sarı",
               "purple": "mor", "orange": "turuncu"},
    "number": {2: "iki", 3: "üç"},
    "position": {"left": "solda", "right": "sağda", "top": "üstte", "bottom": "altta",
                 "centre": "ortada"},
    "background": {"white": "beyaz zemin üzerinde", "black": "siyah zemin üzerinde",
                   "grey": "gri zemin üzerinde", "striped": "çizgili zemin üzerinde"},
    "in_picture": "resimde",
    "exists": "var",
}


def _caption_tr(s: Scene, m: frozenset[str]) -> str:
    t = _TR
    parts = []
    if "background" in m:
        parts.append(t["background"][s.background])
    if "position" in m:
        parts.append(t["position"][s.position])
    if not parts:
        parts.append(t["in_picture"])
    if s.count > 1:
        parts.append(t["number"][s.count])
    if "size" in m:
        parts.append(t["size"][s.size])
    parts.append(t["colour"][s.colour])
    if s.count == 1:
        parts.append("bir")
    parts += [t["kind"][s.kind], t["exists"]]
    return _capitalise(" ".join(parts), "tr") + "."


# Indonesian: "Ada sebuah/dua/tiga <noun> <colour> [size] [position] [background]."
_ID = {
    "kind": {"circle": "lingkaran", "square": "persegi", "triangle": "segitiga", "star": "bintang",
             "cross": "tanda tambah"},
    "size": {"small": "kecil", "large": "besar"},
    "colour": {"red": "merah", "green": "hijau", "blue": "biru", "yellow": "kuning",
               "purple": "ungu", "orange": "oranye"},
    "number": {1: "sebuah", 2: "dua", 3: "tiga"},
    "position": {"left": "di sebelah kiri", "right": "di sebelah kanan", "top": "di bagian atas",
                 "bottom": "di bagian bawah", "centre": "di tengah"},
    "background": {"white": "dengan latar belakang putih", "black": "dengan latar belakang hitam",
                   "grey": "dengan latar belakang abu-abu",
                   "striped": "dengan latar belakang bergaris"},
}


def _caption_id(s: Scene, m: frozenset[str]) -> str:
    t = _ID
    parts = ["ada", t["number"][s.count], t["kind"][s.kind], t["colour"][s.colour]]
    if "size" in m:
        parts.append(t["size"][s.size])
    parts += _place_phrases(t, s, m)
    return _capitalise(" ".join(parts), "id") + "."


# Chinese: NP = {一/两/三}个 + colour + size + noun.
_ZH = {
    "kind": {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形",
             "cross": "十字形"},
    "size": {"small": "小", "large": "大"},
    "colour": {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色",
               "orange": "橙色"},
    "number": {1: "一个", 2: "两个", 3: "三个"},
    "position": {"left": "左边", "right": "右边", "top": "上方", "bottom": "下方", "centre": "中间"},
    "background": {"white": "白色", "black": "黑色", "grey": "灰色", "striped": "条纹"},
}


def _caption_zh(s: Scene, m: frozenset[str]) -> str:
    t = _ZH
    np_ = (t["number"][s.count] + t["colour"][s.colour]
           + (t["size"][s.size] if "size" in m else "") + t["kind"][s.kind])
    bg = t["background"][s.background] + "背景上" if "background" in m else None
    pos = t["position"][s.position] if "position" in m else None
    if bg and pos:
        return f"{bg}，{pos}有{np_}。"
    if pos:
        return f"{pos}有{np_}。"
    if bg:
        return f"{bg}有{np_}。"
    return f"图中有{np_}。"


# Japanese: "[bg の][pos に] size colour noun が count あります。"
_JA = {
    "kind": {"circle": "円", "square": "正方形", "triangle": "三角形", "star": "星", "cross": "十字"},
    "size": {"small": "小さな", "large": "大きな"},
    "colour": {"red": "赤い", "green": "緑の", "blue": "青い", "yellow": "黄色い", "purple": "紫の",
               "orange": "オレンジ色の"},
    "number": {1: "一つ", 2: "二つ", 3: "三つ"},
    "position": {"left": "左側", "right": "右側", "top": "上部", "bottom": "下部", "centre": "中央"},
    "background": {"white": "白い背景", "black": "黒い背景", "grey": "灰色の背景",
                   "striped": "縞模様の背景"},
}


def _caption_ja(s: Scene, m: frozenset[str]) -> str:
    t = _JA
    np_ = (t["size"][s.size] if "size" in m else "") + t["colour"][s.colour] + t["kind"][s.kind]
    bg = t["background"][s.background] if "background" in m else None
    pos = t["position"][s.position] if "position" in m else None
    if bg and pos:
        place = f"{bg}の{pos}に"
    elif pos:
        place = f"{pos}に"
    elif bg:
        place = f"{bg}に"
    else:
        place = ""
    return f"{place}{np_}が{t['number'][s.count]}あります。"


_CAPTIONERS: dict[str, Callable[[Scene, frozenset[str]], str]] = {
    "zh": _caption_zh, "en": _caption_en, "de": _caption_de, "fr": _caption_fr, "ja": _caption_ja,
    "cs": _caption_cs, "id": _caption_id, "es": _caption_es, "ru": _caption_ru, "tr": _caption_tr,
}
_CAPTION_LANGUAGES = tuple(_CAPTIONERS)   # == CCRK_LANGUAGES, in the same order


def _check_mention(mention: Iterable[str]) -> frozenset[str]:
    if isinstance(mention, str):
        raise ValueError(f"mention must be a set of attribute names, got the string {mention!r}")
    out = frozenset(mention)
    unknown = sorted(out - set(OPTIONAL_ATTRIBUTES))
    if unknown:
        raise ValueError(f"mention may only hold optional attributes {OPTIONAL_ATTRIBUTES}, "
                         f"got {unknown}")
    return out


def caption(scene: Scene, lang: str, mention: Iterable[str] = frozenset(OPTIONAL_ATTRIBUTES)) -> str:
    """One caption of ``scene`` in ``lang``; count, kind and colour are always mentioned, the
    optional attributes only when in ``mention``."""
    (lang,) = validate_languages([lang], known=_CAPTION_LANGUAGES)
    return _CAPTIONERS[lang](scene, _check_mention(mention))


def _check_prob(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if isinstance(value, bool) or not 0.0 <= v <= 1.0:   # NaN fails the comparison too
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return v


def _as_languages(languages: str | Sequence[str]) -> tuple[str, ...]:
    langs = (languages,) if isinstance(languages, str) else languages
    return validate_languages(langs, known=_CAPTION_LANGUAGES)


def sample_captions(scene: Scene, languages: str | Sequence[str], rng: np.random.Generator,
                    omit_prob: float) -> dict[str, str]:
    """One caption per language; for each language independently, each optional attribute is
    left out with probability ``omit_prob`` (one draw per language and optional attribute)."""
    langs = _as_languages(languages)
    p = _check_prob("omit_prob", omit_prob)
    draws = rng.random((len(langs), len(OPTIONAL_ATTRIBUTES)))
    return {lang: _CAPTIONERS[lang](scene, _mention(row, p)) for lang, row in zip(langs, draws)}


def omit_by_language(omit_prob: float | Mapping[str, float], languages: Sequence[str]) -> dict[str, float]:
    """{language: omission probability} from one probability or a mapping naming every language."""
    if not isinstance(omit_prob, Mapping):
        p = _check_prob("omit_prob", omit_prob)
        return {lang: p for lang in languages}
    missing = [lang for lang in languages if lang not in omit_prob]
    if missing:
        raise ValueError(f"omit_prob has no value for language(s) {', '.join(missing)}")
    return {lang: _check_prob(f"omit_prob[{lang}]", omit_prob[lang]) for lang in languages}


def _mention(draws: np.ndarray, omit_prob: float) -> frozenset[str]:
    """Optional attributes kept by one row of uniform draws (kept where draw >= omit_prob)."""
    return frozenset(a for a, u in zip(OPTIONAL_ATTRIBUTES, draws) if u >= omit_prob)


# ---------------------------------------------------------------------------------------------
# Writing a split
# ---------------------------------------------------------------------------------------------

_SHARD_RE = re.compile(r"part-\d{5}\.parquet")


def _check_int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    ok = ok and value >= minimum and (maximum is None or value <= maximum)
    if not ok:
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma: small saturated objects keep their colour at 64 px.
    image.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def generate_split(out_dir: str | os.PathLike, split: str, num_images: int,
                   languages: str | Sequence[str] = CCRK_LANGUAGES, seed: int = 0,
                   omit_prob: float | Mapping[str, float] = 0.2, image_size: int = 64, rows_per_shard: int = 1000,
                   jpeg_quality: int = 90) -> list[pathlib.Path]:
    """Write ``num_images`` synthetic rows to ``out_dir/part-00000.parquet``, ``part-00001`` ...

    Columns: the ccrk-ray schema for ``languages`` plus ``scene`` (``Scene.to_json()``); one
    caption per language per row. ``omit_prob``: the chance that a caption leaves out each
    optional attribute, for every language or per language ({lang: p}, every language named).
    Shards of an earlier run in ``out_dir`` that this run does not rewrite (``part-NNNNN.parquet``
    beyond the new last shard) are removed, so the directory holds exactly this split. Returns the
    shard paths in order.
    """
    langs = _as_languages(languages)
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}")
    num_images = _check_int("num_images", num_images, 1)
    omit = omit_by_language(omit_prob, langs)
    image_size = _check_int("image_size", image_size, _MIN_IMAGE_SIZE)
    rows_per_shard = _check_int("rows_per_shard", rows_per_shard, 1)
    jpeg_quality = _check_int("jpeg_quality", jpeg_quality, 1, 100)
    seed = _check_int("seed", seed, 0)

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    schema = arrow_schema(langs, extra=[pa.field(SCENE_COLUMN, pa.string())])
    split_key = zlib.crc32(split.encode("utf-8"))
    # Caption draws are made for all known languages and picked by the language's fixed index,
    # so a language's captions do not depend on which other languages are generated.
    lang_index = [_CAPTION_LANGUAGES.index(lang) for lang in langs]
    n_opt = len(OPTIONAL_ATTRIBUTES)

    paths: list[pathlib.Path] = []
    for shard, start in enumerate(range(0, num_images, rows_per_shard)):
        stop = min(start + rows_per_shard, num_images)
        cols: dict[str, list] = {IMAGE_ID: [], IMAGE: [], SPLIT: [], SOURCE: [], SCENE_COLUMN: []}
        cols.update({caption_column(lang): [] for lang in langs})
        for i in range(start, stop):
            rng = np.random.default_rng([seed, split_key, i])
            scene = sample_scene(rng)
            image = render_scene(scene, rng, image_size)
            draws = rng.random((len(_CAPTION_LANGUAGES), n_opt))
            cols[IMAGE_ID].append(f"{split}-{i:07d}")
            cols[IMAGE].append(_encode_jpeg(image, jpeg_quality))
            cols[SPLIT].append(split)
            cols[SOURCE].append(SOURCE_NAME)
            cols[SCENE_COLUMN].append(scene.to_json())
            for lang, k in zip(langs, lang_index):
                text = _CAPTIONERS[lang](scene, _mention(draws[k], omit[lang]))
                cols[caption_column(lang)].append([text])
        table = pa.Table.from_pydict(cols, schema=schema)
        path = out / f"part-{shard:05d}.parquet"
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
        os.replace(tmp, path)
        paths.append(path)

    written = {p.name for p in paths}
    for stale in sorted(out.iterdir()):
        if _SHARD_RE.fullmatch(stale.name) and stale.name not in written and stale.is_file():
            stale.unlink()
    return paths
