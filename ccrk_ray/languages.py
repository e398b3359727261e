"""Language codes the project knows, and validation of user-given language lists."""

from __future__ import annotations

from typing import Iterable, Sequence

from ccrk_ray.config import ConfigError

# The ten languages of the CCRK paper's pre-training set, in the paper's order.
CCRK_LANGUAGES: tuple[str, ...] = ("zh", "en", "de", "fr", "ja", "cs", "id", "es", "ru", "tr")


class UnknownLanguageError(ConfigError):
    """A language code that the component asked has no support for."""


def validate_languages(langs: Iterable[str], known: Sequence[str] = CCRK_LANGUAGES) -> tuple[str, ...]:
    """Return ``langs`` as a tuple after checking each is known and none repeats."""
    out = tuple(langs)
    if not out:
        raise UnknownLanguageError("no languages given")
    unknown = [lang for lang in out if lang not in known]
    if unknown:
        raise UnknownLanguageError(
            f"unknown language code(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}"
        )
    dupes = sorted({lang for lang in out if out.count(lang) > 1})
    if dupes:
        raise UnknownLanguageError(f"language code(s) given more than once: {', '.join(dupes)}")
    return out
