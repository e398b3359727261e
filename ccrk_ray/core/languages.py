"""Language codes the project knows, and validation of user-given language lists."""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from ccrk_ray.core.config import ConfigError

# The ten languages of the CCRK paper's pre-training set, in the paper's order.
CCRK_LANGUAGES: tuple[str, ...] = ("zh", "en", "de", "fr", "ja", "cs", "id", "es", "ru", "tr")


# CLIP_benchmark's language codes that differ from ours (its XTD10 writes Japanese as "jp"); FLORES
# codes such as jpn_Jpan (Flickr30k-200, XTD200) are kept as they are.
CLIP_BENCHMARK_ALIASES = {"jp": "ja"}


def canonical_languages(langs: Iterable[str]) -> tuple[tuple[str, ...], dict[str, str]]:
    """(``langs`` with CLIP_benchmark's aliases replaced by our codes, {given: ours} for each one
    replaced)."""
    out = (langs,) if isinstance(langs, str) else tuple(langs)
    aliases = {lang: CLIP_BENCHMARK_ALIASES[lang] for lang in out if lang in CLIP_BENCHMARK_ALIASES}
    return tuple(CLIP_BENCHMARK_ALIASES.get(lang, lang) for lang in out), aliases


class UnknownLanguageError(ConfigError):
    """A language code that the component asked has no support for."""


# Any ISO 639-1/-3 style code, optionally with region/script parts (``pt``, ``zh-Hant``, ``pt_BR``).
LANGUAGE_CODE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8})*")


def validate_languages(langs: Iterable[str], known: Sequence[str] | None = CCRK_LANGUAGES) -> tuple[str, ...]:
    """Return ``langs`` as a tuple after checking each is known (``known=None``: any well-formed
    language code, e.g. the test languages of WIT) and none repeats."""
    out = (langs,) if isinstance(langs, str) else tuple(langs)
    if not out:
        raise UnknownLanguageError("no languages given")
    if known is None:
        unknown = [lang for lang in out if not isinstance(lang, str) or not LANGUAGE_CODE.fullmatch(lang)]
    else:
        unknown = [lang for lang in out if lang not in known]
    if unknown:
        raise UnknownLanguageError(
            f"unknown language code(s) {', '.join(map(repr, unknown))}; known: "
            + (", ".join(known) if known is not None else "not a language code (e.g. en, zh, pt-BR)")
        )
    dupes = sorted({lang for lang in out if out.count(lang) > 1})
    if dupes:
        raise UnknownLanguageError(f"language code(s) given more than once: {', '.join(dupes)}")
    return out
