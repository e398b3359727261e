"""Tests of the procedural multilingual data set (ccrk_ray.data.synthetic)."""

from __future__ import annotations

import colorsys
import io
import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ccrk_ray.data.schema import arrow_schema
from ccrk_ray.data.synthetic import (
    ATTRIBUTES,
    OPTIONAL_ATTRIBUTES,
    Scene,
    caption,
    generate_split,
    layout_scene,
    render_scene,
    sample_captions,
    sample_scene,
)
from ccrk_ray.core.languages import CCRK_LANGUAGES, UnknownLanguageError

ALL = frozenset(OPTIONAL_ATTRIBUTES)
NONE = frozenset()

# ----------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------


def test_attribute_space():
    assert ATTRIBUTES == {
        "count": (1, 2, 3),
        "kind": ("circle", "square", "triangle", "star", "cross"),
        "colour": ("red", "green", "blue", "yellow", "purple", "orange"),
        "size": ("small", "large"),
        "position": ("left", "right", "top", "bottom", "centre"),
        "background": ("white", "black", "grey", "striped"),
    }
    assert OPTIONAL_ATTRIBUTES == ("size", "position", "background")
    assert int(np.prod([len(v) for v in ATTRIBUTES.values()])) == 3600


def test_scene_json_round_trip_and_validation():
    s = Scene(2, "cross", "orange", "large", "top", "striped")
    text = s.to_json()
    assert json.loads(text) == {"count": 2, "kind": "cross", "colour": "orange", "size": "large",
                                "position": "top", "background": "striped"}
    assert Scene.from_json(text) == s
    with pytest.raises(ValueError, match="colour"):
        Scene(1, "circle", "pink", "small", "left", "white")
    with pytest.raises(ValueError, match="count"):
        Scene(4, "circle", "red", "small", "left", "white")
    with pytest.raises(ValueError, match="count"):
        Scene(True, "circle", "red", "small", "left", "white")
    with pytest.raises(ValueError):
        Scene.from_json('{"count": 1, "kind": "circle"}')
    with pytest.raises(ValueError):
        Scene.from_json("not json")


def test_sample_scene_covers_every_value_with_plain_python_types():
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng) for _ in range(2000)]
    for name, values in ATTRIBUTES.items():
        seen = [getattr(s, name) for s in scenes]
        assert set(seen) == set(values)
        # roughly uniform: every value within 40% of its expected frequency
        expected = len(scenes) / len(values)
        for v in values:
            assert abs(seen.count(v) - expected) < 0.4 * expected, (name, v)
    assert all(type(s.count) is int for s in scenes)
    Scene.from_json(scenes[0].to_json())  # JSON-serialisable


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------

EXPECTED = {
    Scene(1, "circle", "red", "small", "left", "white"): {
        "en": "There is a small red circle on the left on a white background.",
        "de": "Ein kleiner roter Kreis links auf weißem Hintergrund.",
        "fr": "Il y a un petit cercle rouge à gauche sur un fond blanc.",
        "es": "Hay un círculo rojo pequeño a la izquierda sobre un fondo blanco.",
        "cs": "Malý červený kruh vlevo na bílém pozadí.",
        "ru": "Маленький красный круг слева на белом фоне.",
        "tr": "Beyaz zemin üzerinde solda küçük kırmızı bir daire var.",
        "id": "Ada sebuah lingkaran merah kecil di sebelah kiri dengan latar belakang putih.",
        "zh": "白色背景上，左边有一个红色小圆形。",
        "ja": "白い背景の左側に小さな赤い円が一つあります。",
    },
    Scene(2, "cross", "orange", "large", "top", "striped"): {
        "en": "There are two large orange crosses at the top on a striped background.",
        "de": "Zwei große orangefarbene Kreuze oben auf gestreiftem Hintergrund.",
        "fr": "Il y a deux grandes croix orange en haut sur un fond rayé.",
        "es": "Hay dos cruces naranja grandes arriba sobre un fondo rayado.",
        "cs": "Dva velké oranžové kříže nahoře na pruhovaném pozadí.",
        "ru": "Два больших оранжевых креста сверху на полосатом фоне.",
        "tr": "Çizgili zemin üzerinde üstte iki büyük turuncu artı işareti var.",
        "id": "Ada dua tanda tambah oranye besar di bagian atas dengan latar belakang bergaris.",
        "zh": "条纹背景上，上方有两个橙色大十字形。",
        "ja": "縞模様の背景の上部に大きなオレンジ色の十字が二つあります。",
    },
    Scene(2, "star", "red", "small", "right", "black"): {
        "en": "There are two small red stars on the right on a black background.",
        "de": "Zwei kleine rote Sterne rechts auf schwarzem Hintergrund.",
        "fr": "Il y a deux petites étoiles rouges à droite sur un fond noir.",
        "es": "Hay dos estrellas rojas pequeñas a la derecha sobre un fondo negro.",
        "cs": "Dvě malé červené hvězdy vpravo na černém pozadí.",
        "ru": "Две маленькие красные звезды справа на чёрном фоне.",
        "tr": "Siyah zemin üzerinde sağda iki küçük kırmızı yıldız var.",
        "id": "Ada dua bintang merah kecil di sebelah kanan dengan latar belakang hitam.",
        "zh": "黑色背景上，右边有两个红色小星形。",
        "ja": "黒い背景の右側に小さな赤い星が二つあります。",
    },
    Scene(2, "circle", "green", "large", "left", "grey"): {
        "en": "There are two large green circles on the left on a grey background.",
        "de": "Zwei große grüne Kreise links auf grauem Hintergrund.",
        "fr": "Il y a deux grands cercles verts à gauche sur un fond gris.",
        "es": "Hay dos círculos verdes grandes a la izquierda sobre un fondo gris.",
        "cs": "Dva velké zelené kruhy vlevo na šedém pozadí.",
        "ru": "Два больших зелёных круга слева на сером фоне.",
        "tr": "Gri zemin üzerinde solda iki büyük yeşil daire var.",
        "id": "Ada dua lingkaran hijau besar di sebelah kiri dengan latar belakang abu-abu.",
        "zh": "灰色背景上，左边有两个绿色大圆形。",
        "ja": "灰色の背景の左側に大きな緑の円が二つあります。",
    },
    Scene(3, "square", "purple", "large", "centre", "grey"): {
        "en": "There are three large purple squares in the centre on a grey background.",
        "de": "Drei große violette Quadrate in der Mitte auf grauem Hintergrund.",
        "fr": "Il y a trois grands carrés violets au centre sur un fond gris.",
        "es": "Hay tres cuadrados morados grandes en el centro sobre un fondo gris.",
        "cs": "Tři velké fialové čtverce uprostřed na šedém pozadí.",
        "ru": "Три больших фиолетовых квадрата в центре на сером фоне.",
        "tr": "Gri zemin üzerinde ortada üç büyük mor kare var.",
        "id": "Ada tiga persegi ungu besar di tengah dengan latar belakang abu-abu.",
        "zh": "灰色背景上，中间有三个紫色大正方形。",
        "ja": "灰色の背景の中央に大きな紫の正方形が三つあります。",
    },
    Scene(3, "star", "yellow", "large", "bottom", "black"): {
        "en": "There are three large yellow stars at the bottom on a black background.",
        "de": "Drei große gelbe Sterne unten auf schwarzem Hintergrund.",
        "fr": "Il y a trois grandes étoiles jaunes en bas sur un fond noir.",
        "es": "Hay tres estrellas amarillas grandes abajo sobre un fondo negro.",
        "cs": "Tři velké žluté hvězdy dole na černém pozadí.",
        "ru": "Три большие жёлтые звезды снизу на чёрном фоне.",
        "tr": "Siyah zemin üzerinde altta üç büyük sarı yıldız var.",
        "id": "Ada tiga bintang kuning besar di bagian bawah dengan latar belakang hitam.",
        "zh": "黑色背景上，下方有三个黄色大星形。",
        "ja": "黒い背景の下部に大きな黄色い星が三つあります。",
    },
    Scene(3, "cross", "purple", "small", "right", "white"): {
        "en": "There are three small purple crosses on the right on a white background.",
        "de": "Drei kleine violette Kreuze rechts auf weißem Hintergrund.",
        "fr": "Il y a trois petites croix violettes à droite sur un fond blanc.",
        "es": "Hay tres cruces moradas pequeñas a la derecha sobre un fondo blanco.",
        "cs": "Tři malé fialové kříže vpravo na bílém pozadí.",
        "ru": "Три маленьких фиолетовых креста справа на белом фоне.",
        "tr": "Beyaz zemin üzerinde sağda üç küçük mor artı işareti var.",
        "id": "Ada tiga tanda tambah ungu kecil di sebelah kanan dengan latar belakang putih.",
        "zh": "白色背景上，右边有三个紫色小十字形。",
        "ja": "白い背景の右側に小さな紫の十字が三つあります。",
    },
    Scene(1, "square", "orange", "large", "bottom", "black"): {
        "en": "There is a large orange square at the bottom on a black background.",
        "de": "Ein großes orangefarbenes Quadrat unten auf schwarzem Hintergrund.",
        "fr": "Il y a un grand carré orange en bas sur un fond noir.",
        "es": "Hay un cuadrado naranja grande abajo sobre un fondo negro.",
        "cs": "Velký oranžový čtverec dole na černém pozadí.",
        "ru": "Большой оранжевый квадрат снизу на чёрном фоне.",
        "tr": "Siyah zemin üzerinde altta büyük turuncu bir kare var.",
        "id": "Ada sebuah persegi oranye besar di bagian bawah dengan latar belakang hitam.",
        "zh": "黑色背景上，下方有一个橙色大正方形。",
        "ja": "黒い背景の下部に大きなオレンジ色の正方形が一つあります。",
    },
    Scene(1, "star", "blue", "large", "top", "white"): {
        "en": "There is a large blue star at the top on a white background.",
        "de": "Ein großer blauer Stern oben auf weißem Hintergrund.",
        "fr": "Il y a une grande étoile bleue en haut sur un fond blanc.",
        "es": "Hay una estrella azul grande arriba sobre un fondo blanco.",
        "cs": "Velká modrá hvězda nahoře na bílém pozadí.",
        "ru": "Большая синяя звезда сверху на белом фоне.",
        "tr": "Beyaz zemin üzerinde üstte büyük mavi bir yıldız var.",
        "id": "Ada sebuah bintang biru besar di bagian atas dengan latar belakang putih.",
        "zh": "白色背景上，上方有一个蓝色大星形。",
        "ja": "白い背景の上部に大きな青い星が一つあります。",
    },
    Scene(1, "star", "yellow", "small", "centre", "grey"): {
        "en": "There is a small yellow star in the centre on a grey background.",
        "de": "Ein kleiner gelber Stern in der Mitte auf grauem Hintergrund.",
        "fr": "Il y a une petite étoile jaune au centre sur un fond gris.",
        "es": "Hay una estrella amarilla pequeña en el centro sobre un fondo gris.",
        "cs": "Malá žlutá hvězda uprostřed na šedém pozadí.",
        "ru": "Маленькая жёлтая звезда в центре на сером фоне.",
        "tr": "Gri zemin üzerinde ortada küçük sarı bir yıldız var.",
        "id": "Ada sebuah bintang kuning kecil di tengah dengan latar belakang abu-abu.",
        "zh": "灰色背景上，中间有一个黄色小星形。",
        "ja": "灰色の背景の中央に小さな黄色い星が一つあります。",
    },
    Scene(1, "triangle", "green", "small", "bottom", "striped"): {
        "en": "There is a small green triangle at the bottom on a striped background.",
        "de": "Ein kleines grünes Dreieck unten auf gestreiftem Hintergrund.",
        "fr": "Il y a un petit triangle vert en bas sur un fond rayé.",
        "es": "Hay un triángulo verde pequeño abajo sobre un fondo rayado.",
        "cs": "Malý zelený trojúhelník dole na pruhovaném pozadí.",
        "ru": "Маленький зелёный треугольник снизу на полосатом фоне.",
        "tr": "Çizgili zemin üzerinde altta küçük yeşil bir üçgen var.",
        "id": "Ada sebuah segitiga hijau kecil di bagian bawah dengan latar belakang bergaris.",
        "zh": "条纹背景上，下方有一个绿色小三角形。",
        "ja": "縞模様の背景の下部に小さな緑の三角形が一つあります。",
    },
}


@pytest.mark.parametrize("scene", list(EXPECTED), ids=lambda s: f"{s.count}-{s.colour}-{s.kind}")
def test_full_captions_exact(scene):
    expected = EXPECTED[scene]
    assert set(expected) == set(CCRK_LANGUAGES)
    for lang in CCRK_LANGUAGES:
        assert caption(scene, lang) == expected[lang], lang
        assert caption(scene, lang, ALL) == expected[lang], lang


# Captions with optional attributes left out.
EXPECTED_PARTIAL = [
    (Scene(1, "square", "orange", "large", "bottom", "black"), NONE, {
        "en": "There is an orange square.",
        "de": "Ein orangefarbenes Quadrat.",
        "fr": "Il y a un carré orange.",
        "es": "Hay un cuadrado naranja.",
        "cs": "Oranžový čtverec.",
        "ru": "Оранжевый квадрат.",
        "tr": "Resimde turuncu bir kare var.",
        "id": "Ada sebuah persegi oranye.",
        "zh": "图中有一个橙色正方形。",
        "ja": "オレンジ色の正方形が一つあります。",
    }),
    (Scene(2, "star", "green", "large", "centre", "striped"), frozenset({"position"}), {
        "en": "There are two green stars in the centre.",
        "de": "Zwei grüne Sterne in der Mitte.",
        "fr": "Il y a deux étoiles vertes au centre.",
        "es": "Hay dos estrellas verdes en el centro.",
        "cs": "Dvě zelené hvězdy uprostřed.",
        "ru": "Две зелёные звезды в центре.",
        "tr": "Ortada iki yeşil yıldız var.",
        "id": "Ada dua bintang hijau di tengah.",
        "zh": "中间有两个绿色星形。",
        "ja": "中央に緑の星が二つあります。",
    }),
    (Scene(3, "triangle", "blue", "small", "left", "grey"), frozenset({"size", "background"}), {
        "en": "There are three small blue triangles on a grey background.",
        "de": "Drei kleine blaue Dreiecke auf grauem Hintergrund.",
        "fr": "Il y a trois petits triangles bleus sur un fond gris.",
        "es": "Hay tres triángulos azules pequeños sobre un fondo gris.",
        "cs": "Tři malé modré trojúhelníky na šedém pozadí.",
        "ru": "Три маленьких синих треугольника на сером фоне.",
        "tr": "Gri zemin üzerinde üç küçük mavi üçgen var.",
        "id": "Ada tiga segitiga biru kecil dengan latar belakang abu-abu.",
        "zh": "灰色背景上有三个蓝色小三角形。",
        "ja": "灰色の背景に小さな青い三角形が三つあります。",
    }),
    (Scene(1, "cross", "yellow", "small", "top", "white"), frozenset({"size", "position"}), {
        "en": "There is a small yellow cross at the top.",
        "de": "Ein kleines gelbes Kreuz oben.",
        "fr": "Il y a une petite croix jaune en haut.",
        "es": "Hay una cruz amarilla pequeña arriba.",
        "cs": "Malý žlutý kříž nahoře.",
        "ru": "Маленький жёлтый крест сверху.",
        "tr": "Üstte küçük sarı bir artı işareti var.",
        "id": "Ada sebuah tanda tambah kuning kecil di bagian atas.",
        "zh": "上方有一个黄色小十字形。",
        "ja": "上部に小さな黄色い十字が一つあります。",
    }),
]


@pytest.mark.parametrize("scene,mention,expected", EXPECTED_PARTIAL)
def test_partial_captions_exact(scene, mention, expected):
    for lang in CCRK_LANGUAGES:
        assert caption(scene, lang, mention) == expected[lang], lang


# The words each language uses for Scene(2, "square", "blue", "large", "top", "striped")'s
# optional attributes (as they appear in its captions).
OPTIONAL_WORDS = {
    "en": {"size": "large", "position": "at the top", "background": "striped background"},
    "de": {"size": "große", "position": "oben", "background": "gestreiftem Hintergrund"},
    "fr": {"size": "grands", "position": "en haut", "background": "fond rayé"},
    "es": {"size": "grandes", "position": "arriba", "background": "fondo rayado"},
    "cs": {"size": "velké", "position": "nahoře", "background": "pruhovaném pozadí"},
    "ru": {"size": "больших", "position": "сверху", "background": "полосатом фоне"},
    "tr": {"size": "büyük", "position": "üstte", "background": "çizgili zemin"},
    "id": {"size": "besar", "position": "di bagian atas", "background": "bergaris"},
    "zh": {"size": "大", "position": "上方", "background": "条纹背景"},
    "ja": {"size": "大きな", "position": "上部", "background": "縞模様の背景"},
}


def test_leaving_out_an_attribute_removes_its_words():
    scene = Scene(2, "square", "blue", "large", "top", "striped")
    assert set(OPTIONAL_WORDS) == set(CCRK_LANGUAGES)
    for lang, words in OPTIONAL_WORDS.items():
        full = caption(scene, lang).lower()   # lower(): a word may start the sentence
        for attr in OPTIONAL_ATTRIBUTES:
            assert words[attr].lower() in full, (lang, attr)
        for mention in itertools.chain.from_iterable(
                itertools.combinations(OPTIONAL_ATTRIBUTES, k) for k in range(4)):
            text = caption(scene, lang, frozenset(mention)).lower()
            for attr in OPTIONAL_ATTRIBUTES:
                assert (words[attr].lower() in text) == (attr in mention), (lang, mention, attr, text)


CASED = ("en", "de", "fr", "es", "cs", "ru", "tr", "id")   # the others are zh and ja


def test_every_scene_has_a_distinct_well_formed_caption_in_every_language():
    scenes = [Scene(*values) for values in itertools.product(*ATTRIBUTES.values())]
    assert len(scenes) == 3600
    for lang in CCRK_LANGUAGES:
        full = [caption(s, lang) for s in scenes]
        # the full caption identifies the scene
        assert len(set(full)) == len(scenes), lang
        for mention in (ALL, NONE, frozenset({"position"})):
            for s in scenes[::7]:
                text = caption(s, lang, mention)
                assert "  " not in text and text == text.strip()
                if lang in CASED:
                    assert text.endswith(".") and not text.endswith("..")
                    assert text[0].isupper(), text
                else:
                    assert text.endswith("。") and " " not in text and "." not in text


def test_caption_argument_errors():
    scene = Scene(1, "circle", "red", "small", "left", "white")
    for lang in CCRK_LANGUAGES:   # every project language has a captioner
        assert caption(scene, lang)
    with pytest.raises(UnknownLanguageError):
        caption(scene, "xx")
    with pytest.raises(ValueError, match="colour"):
        caption(scene, "en", frozenset({"colour"}))


def test_sample_captions_omit_prob_extremes_and_mixture():
    rng = np.random.default_rng(3)
    for _ in range(20):
        scene = sample_scene(rng)
        assert sample_captions(scene, CCRK_LANGUAGES, rng, 0.0) == {
            lang: caption(scene, lang, ALL) for lang in CCRK_LANGUAGES}
        assert sample_captions(scene, CCRK_LANGUAGES, rng, 1.0) == {
            lang: caption(scene, lang, NONE) for lang in CCRK_LANGUAGES}
    # in between: each language draws its own subset; all 8 subsets show up
    scene = Scene(2, "square", "blue", "large", "top", "striped")
    seen = set()
    for _ in range(200):
        out = sample_captions(scene, ("en", "de"), rng, 0.5)
        assert list(out) == ["en", "de"]
        seen.add(frozenset(a for a in OPTIONAL_ATTRIBUTES if OPTIONAL_WORDS["en"][a] in out["en"]))
    assert len(seen) == 8
    # omission rate follows omit_prob
    kept = [OPTIONAL_WORDS["en"]["size"] in sample_captions(scene, "en", rng, 0.2)["en"]
            for _ in range(2000)]
    assert 0.75 < np.mean(kept) < 0.85
    with pytest.raises(ValueError, match="omit_prob"):
        sample_captions(scene, ("en",), rng, 1.5)
    with pytest.raises(UnknownLanguageError):
        sample_captions(scene, ("en", "klingon"), rng, 0.2)


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

# Hue (degrees) of each object colour; the test finds the nearest one to what was drawn.
HUES = {"red": 0, "orange": 30, "yellow": 52, "green": 128, "blue": 228, "purple": 280}


def _object_mask(img: Image.Image, threshold: int = 100) -> np.ndarray:
    """Saturated pixels: backgrounds and outlines are grey, objects are saturated colours."""
    a = np.asarray(img.convert("RGB")).astype(np.int32)
    return (a.max(axis=2) - a.min(axis=2)) > threshold


def _hue_name(img: Image.Image, mask: np.ndarray) -> str:
    r, g, b = np.asarray(img.convert("RGB"))[mask].mean(axis=0) / 255
    hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
    return min(HUES, key=lambda c: min(abs(hue - HUES[c]), 360 - abs(hue - HUES[c])))


def _assert_position(mask: np.ndarray, position: str, size: int):
    ys, xs = np.nonzero(mask)
    mx, my = xs.mean() + 0.5, ys.mean() + 0.5
    third = size / 3
    if position == "left":
        assert mx < third
    elif position == "right":
        assert mx > 2 * third
    elif position == "top":
        assert my < third
    elif position == "bottom":
        assert my > 2 * third
    else:
        assert third < mx < 2 * third and third < my < 2 * third


def _cells_mask(cells, size: int, dilate: int = 1) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    for x0, y0, x1, y1 in cells:
        m[max(0, int(np.floor(y0)) - dilate):int(np.ceil(y1)) + dilate,
          max(0, int(np.floor(x0)) - dilate):int(np.ceil(x1)) + dilate] = True
    return m


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("image_size", [32, 64, 96, 128])
def test_layout_inside_image_non_overlapping_and_sized(image_size):
    rng = np.random.default_rng(image_size)
    for values in itertools.product(ATTRIBUTES["count"], ATTRIBUTES["size"], ATTRIBUTES["position"]):
        count, size, position = values
        scene = Scene(count, "circle", "red", size, position, "white")
        for _ in range(20):
            cells = layout_scene(scene, rng, image_size)
            assert len(cells) == count
            for x0, y0, x1, y1 in cells:
                assert 0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size
                side = (x1 - x0) / image_size
                assert 0.10 <= side <= 0.125 if size == "small" else 0.20 <= side <= 0.25
                assert (y1 - y0) == pytest.approx(x1 - x0)
            for a, b in itertools.combinations(cells, 2):
                assert not _overlap(a, b)
                # at least about 1.5 px of clear space at 64 px (scaled)
                gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
                assert gap >= 0.025 * image_size


def test_render_draws_the_layout_colour_and_position_on_every_background():
    size = 64
    rng = np.random.default_rng(5)
    for colour, background, position in itertools.product(
            ATTRIBUTES["colour"], ATTRIBUTES["background"], ATTRIBUTES["position"]):
        scene = Scene(int(rng.integers(1, 4)), ATTRIBUTES["kind"][int(rng.integers(5))], colour,
                      ATTRIBUTES["size"][int(rng.integers(2))], position, background)
        seed = int(rng.integers(1 << 30))
        img = render_scene(scene, np.random.default_rng(seed), size)
        assert img.mode == "RGB" and img.size == (size, size)
        cells = layout_scene(scene, np.random.default_rng(seed), size)
        mask = _object_mask(img)
        # every coloured pixel is inside a drawn cell; every cell holds a visible object
        assert not (mask & ~_cells_mask(cells, size)).any(), scene
        for cell in cells:
            inside = mask & _cells_mask([cell], size, dilate=0)
            assert inside.sum() >= 5, (scene, cell)
        assert _hue_name(img, mask) == colour, scene
        _assert_position(mask, position, size)


def test_backgrounds_are_distinct_and_yellow_is_outlined_on_white():
    size = 64
    rng = np.random.default_rng(0)
    stats = {}
    for bg in ATTRIBUTES["background"]:
        img = render_scene(Scene(1, "circle", "red", "small", "left", bg), rng, size)
        right = np.asarray(img)[:, size // 2:].astype(float)   # no object there
        stats[bg] = (right.mean(), right.std())
    assert stats["white"][0] > 250 and stats["white"][1] < 1
    assert stats["black"][0] < 5 and stats["black"][1] < 1
    assert 100 < stats["grey"][0] < 160 and stats["grey"][1] < 1
    assert stats["striped"][1] > 20                               # clearly patterned
    img = np.asarray(render_scene(Scene(1, "square", "yellow", "large", "centre", "white"), rng, size))
    assert (img.max(axis=2) < 90).sum() >= 20                      # a dark outline around the object


def test_render_is_deterministic_and_uses_only_its_rng():
    scene = Scene(3, "star", "blue", "small", "top", "striped")
    a = render_scene(scene, np.random.default_rng(9))
    b = render_scene(scene, np.random.default_rng(9))
    c = render_scene(scene, np.random.default_rng(10))
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()
    with pytest.raises(ValueError, match="image_size"):
        render_scene(scene, np.random.default_rng(0), 16)


# ----------------------------------------------------------------------------------------------
# Parquet splits
# ----------------------------------------------------------------------------------------------

LANGS = ("en", "de", "zh")


def _read(paths) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in paths])


def test_generate_split_schema_rows_and_content(tmp_path):
    paths = generate_split(tmp_path / "val", "val", 23, languages=LANGS, seed=4, rows_per_shard=10,
                           image_size=64)
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == [p.name for p in paths]
    expected_schema = arrow_schema(LANGS, extra=[pa.field("scene", pa.string())])
    for p, n in zip(paths, (10, 10, 3)):
        t = pq.read_table(p)
        assert t.schema.remove_metadata().equals(expected_schema), t.schema
        assert t.num_rows == n
    table = _read(paths)
    assert table.column_names == ["image_id", "image", "captions_en", "captions_de", "captions_zh",
                                  "split", "source", "scene"]
    rows = table.to_pylist()
    assert [r["image_id"] for r in rows] == [f"val-{i:07d}" for i in range(23)]
    assert {r["split"] for r in rows} == {"val"} and {r["source"] for r in rows} == {"synthetic"}
    for r in rows:
        scene = Scene.from_json(r["scene"])
        img = Image.open(io.BytesIO(r["image"]))
        assert img.format == "JPEG"
        img = img.convert("RGB")
        assert img.size == (64, 64)
        mask = _object_mask(img, threshold=110)
        assert _hue_name(img, mask) == scene.colour
        _assert_position(mask, scene.position, 64)
        for lang in LANGS:
            caps = r[f"captions_{lang}"]
            assert len(caps) == 1
            options = {caption(scene, lang, frozenset(m)) for k in range(4)
                       for m in itertools.combinations(OPTIONAL_ATTRIBUTES, k)}
            assert caps[0] in options


def test_generate_split_other_image_size(tmp_path):
    (path,) = generate_split(tmp_path, "train", 3, languages="en", image_size=96, jpeg_quality=75)
    t = pq.read_table(path)
    assert t.column_names == ["image_id", "image", "captions_en", "split", "source", "scene"]
    for blob in t.column("image").to_pylist():
        assert Image.open(io.BytesIO(blob)).convert("RGB").size == (96, 96)


def test_generate_split_is_deterministic(tmp_path):
    a = generate_split(tmp_path / "a", "train", 15, languages=LANGS, seed=7, rows_per_shard=8)
    b = generate_split(tmp_path / "b", "train", 15, languages=LANGS, seed=7, rows_per_shard=8)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    c = generate_split(tmp_path / "c", "train", 15, languages=LANGS, seed=8, rows_per_shard=8)
    assert _read(a).column("scene").to_pylist() != _read(c).column("scene").to_pylist()
    # rows depend on (seed, split, index) only: not on shard size, row count or other languages
    d = generate_split(tmp_path / "d", "train", 6, languages=("en",), seed=7, rows_per_shard=100)
    ta, td = _read(a).slice(0, 6), _read(d)
    for col in ("image_id", "image", "scene", "captions_en"):
        assert ta.column(col).to_pylist() == td.column(col).to_pylist()
    # another split with the same seed gets other images
    e = generate_split(tmp_path / "e", "val", 15, languages=LANGS, seed=7)
    assert _read(e).column("image").to_pylist() != _read(a).column("image").to_pylist()


def test_generate_split_replaces_stale_shards(tmp_path):
    generate_split(tmp_path, "train", 25, languages=("en",), rows_per_shard=10)
    (tmp_path / "notes.txt").write_text("keep me")
    paths = generate_split(tmp_path, "train", 5, languages=("en",), rows_per_shard=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "part-00000.parquet"]
    assert _read(paths).num_rows == 5


@pytest.mark.parametrize("kwargs,name", [
    ({"num_images": 0}, "num_images"),
    ({"num_images": 2.5}, "num_images"),
    ({"omit_prob": -0.1}, "omit_prob"),
    ({"omit_prob": 1.01}, "omit_prob"),
    ({"omit_prob": float("nan")}, "omit_prob"),
    ({"image_size": 31}, "image_size"),
    ({"rows_per_shard": 0}, "rows_per_shard"),
    ({"jpeg_quality": 0}, "jpeg_quality"),
    ({"seed": -1}, "seed"),
    ({"split": ""}, "split"),
])
def test_generate_split_argument_errors(tmp_path, kwargs, name):
    args = {"out_dir": tmp_path / "x", "split": "train", "num_images": 4, **kwargs}
    with pytest.raises(ValueError, match=name) as info:
        generate_split(**args)
    if name != "split":
        assert repr(kwargs[name]) in str(info.value)
    assert not (tmp_path / "x").exists()


def test_generate_split_unknown_language(tmp_path):
    with pytest.raises(UnknownLanguageError, match="xx"):
        generate_split(tmp_path, "train", 4, languages=("en", "xx"))
    with pytest.raises(UnknownLanguageError):
        generate_split(tmp_path, "train", 4, languages=("en", "en"))
    assert list(tmp_path.iterdir()) == []


def test_most_of_500_test_images_have_a_unique_description(tmp_path):
    paths = generate_split(tmp_path, "test", 500, languages=("en",), seed=0, rows_per_shard=200)
    scenes = _read(paths).column("scene").to_pylist()
    assert len(scenes) == 500
    counts = {}
    for s in scenes:
        counts[s] = counts.get(s, 0) + 1
    unique = sum(1 for c in counts.values() if c == 1)
    assert len(counts) > 0.8 * 500
    assert unique > 0.8 * 500


def test_generate_split_omits_details_per_language(tmp_path):
    """--omit-prob per language: each language leaves attributes out at its own rate, and a
    language's captions do not depend on the others' rates."""
    generate_split(tmp_path / "a", "train", 300, languages=("en", "de"), omit_prob={"en": 0.0, "de": 0.7}, seed=1)
    generate_split(tmp_path / "b", "train", 300, languages=("en", "de"), omit_prob=0.0, seed=1)
    a, b = pq.read_table(tmp_path / "a").to_pydict(), pq.read_table(tmp_path / "b").to_pydict()
    assert a["captions_en"] == b["captions_en"]                    # en at 0.0 either way
    de_words = sum(len(c[0].split()) for c in a["captions_de"]) / sum(len(c[0].split()) for c in b["captions_de"])
    assert de_words < 0.85                                       # German drops details, English none
    with pytest.raises(ValueError, match="no value for language"):
        generate_split(tmp_path / "c", "train", 3, languages=("en", "de"), omit_prob={"en": 0.1})
    with pytest.raises(ValueError, match=r"omit_prob\[de\]"):
        generate_split(tmp_path / "c", "train", 3, languages=("en", "de"), omit_prob={"en": 0.1, "de": 2})
