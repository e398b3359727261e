"""Multilingual subword tokenizer: train one on captions, or load any HF tokenizer by name/path.

The trained tokenizer is a SentencePiece-style byte-pair-encoding model (``▁`` word boundaries, as
XLM-R's SentencePiece uses; CJK characters and sentence punctuation are split off first, as BERT
does, so that pieces never straddle Chinese/Japanese words) with XLM-R's special tokens (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>`` last) and XLM-R's
``<s> A </s>`` template, saved with ``save_pretrained`` so that
``transformers.AutoTokenizer.from_pretrained(path)`` loads it — the same call that loads
``xlm-roberta-large``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
import transformers
from transformers import PreTrainedTokenizerFast

from ccrk_ray.core.config import ConfigError, first_line
from ccrk_ray.data.schema import caption_column

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
MASK_TOKEN = "<mask>"
# CJK ideographs, full-width forms and CJK/ASCII sentence punctuation: one pre-token each (kana runs
# stay together so that BPE can learn okurigana and particles).
CJK_OR_PUNCT = r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef.,!?;:]"


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 4000) -> Path:
    """Train a Unigram tokenizer on ``texts`` and save it HF-style under ``out_dir``."""
    if vocab_size < 100:
        raise ValueError(f"vocab_size must be >= 100, got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(),
        pre_tokenizers.Split(Regex(CJK_OR_PUNCT), behavior="isolated"),
    ])
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), max_token_length=12,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([MASK_TOKEN])
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   sep_token="</s>", cls_token="<s>", pad_token="<pad>", mask_token=MASK_TOKEN,
                                   model_max_length=512)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


def load_tokenizer(name_or_path: str | Path):
    """Load a tokenizer by HF name (e.g. ``xlm-roberta-large``) or local path, never running code
    shipped with it; one that cannot be loaded is a ConfigError naming it."""
    try:
        # AutoTokenizer on first use (transformers' lazy attribute): it imports torch, which the data
        # actors (that import this module for CaptionTokenizer) never need
        return transformers.AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"tokenizer {name_or_path}: cannot be loaded ({first_line(exc)})") from None


# CCLM/X-VLM caption normalisation (``pre_caption``): these characters become spaces
CAPTION_PUNCTUATION = re.compile(r"[,.'!?\"()*#:;~\-/]")
SPACES = re.compile(r"\s{2,}")


def pre_caption(text: str, max_words: int) -> str:
    """A caption as the CCLM / X-VLM / CCRK reference code feeds it to the tokenizer: lowercased,
    ``,.'!?"()*#:;~-/`` turned into spaces, ``<person>`` into ``person``, runs of whitespace
    collapsed, trimmed, and cut to its first ``max_words`` space-separated words."""
    text = CAPTION_PUNCTUATION.sub(" ", text.lower().replace("<person>", "person"))
    words = SPACES.sub(" ", text).rstrip("\n").strip(" ").split(" ")
    return " ".join(words[:max_words])


class CaptionTokenizer:
    """Fixed-length batch tokenisation for the data path: ``(input_ids, attention_mask)`` T×L int64.

    Uses the tokenizer's Rust backend directly (``encode_batch``, padding and truncation set once),
    which gives the same ids as calling the HF tokenizer with ``padding="max_length",
    truncation=True`` at a fraction of the Python overhead; slow (Python) tokenizers go through
    the HF call. Build it once in the driver and ship it to data workers: with a fast tokenizer
    it pickles without ``transformers``, so workers start quickly.

    ``pre_caption`` (a word count): normalise each caption first as the reference code does
    (``pre_caption``).
    """

    def __init__(self, tokenizer, max_length: int, pre_caption: int | None = None):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if pre_caption is not None and pre_caption < 1:
            raise ValueError(f"pre_caption must be a word count >= 1, got {pre_caption}")
        hf = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        self.max_length = max_length
        self.pre_caption = pre_caption
        self.vocab_size = len(hf)
        self.special_tokens = {k: v for k, v in hf.special_tokens_map.items() if isinstance(v, str)}
        backend = getattr(hf, "backend_tokenizer", None)
        self.backend, self.hf = None, None
        if backend is None:
            self.hf = hf
        else:
            self.backend = Tokenizer.from_str(backend.to_str())
            self.backend.enable_truncation(max_length)
            self.backend.enable_padding(length=max_length, pad_id=hf.pad_token_id, pad_token=hf.pad_token)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Save the tokenizer so that ``AutoTokenizer.from_pretrained(directory)`` loads it (a model
        directory then carries its own tokenizer)."""
        if self.backend is None:
            self.hf.save_pretrained(str(directory))
            return Path(directory)
        plain = Tokenizer.from_str(self.backend.to_str())
        plain.no_padding()
        plain.no_truncation()
        PreTrainedTokenizerFast(tokenizer_object=plain, model_max_length=self.max_length,
                                **self.special_tokens).save_pretrained(str(directory))
        return Path(directory)

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.pre_caption is not None:
            texts = [pre_caption(t, self.pre_caption) for t in texts]
        if self.backend is None:
            enc = self.hf(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                          return_tensors="np")
            return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
        # encode_batch_fast (tokenizers >= 0.20) skips character offsets, which nothing here uses:
        # the same ids and masks in ~2/3 of the time
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        encodings = encode(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(encodings), self.max_length)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(ids.shape)
        return ids, mask


def iter_captions(path: str | Path, languages: Sequence[str]) -> Iterator[str]:
    """Every caption in ``languages`` of a local parquet directory (a tokenizer training corpus)."""
    for f in sorted(Path(path).glob("*.parquet")):
        table = pq.read_table(f, columns=[caption_column(lang) for lang in languages])
        for col in table.columns:
            for caps in col.to_pylist():
                yield from caps or ()
