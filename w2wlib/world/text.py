"""The mini world's language: a small prompt vocabulary, a CLIP BPE tokenizer built from it, and prompts.

The tokenizer is a real ``CLIPTokenizer`` (vocab.json + merges.txt, byte-level BPE with ``</w>``
word ends, as SD 1.5's). Its merges are built so that every vocabulary word is one token; any other
word still tokenizes, falling back to sub-word pieces and single characters, exactly as real CLIP does
with rare words. The text encoder never saw such pieces in training, so they carry little meaning:
library code that builds prompts calls :func:`check_prompt`, which raises a ``W2WError`` naming the
unknown words, while the plain diffusers pipeline accepts any text.

Example:
    >>> check_prompt("a photo of sks person")
    'a photo of sks person'
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import W2WError
from .render import ATTRIBUTE_PHRASES, ATTRIBUTES

__all__ = ["VOCABULARY", "check_prompt", "attribute_prompt", "write_tokenizer_files", "bpe_tokens"]

#: The words prompts are made of: the DreamBooth identifier "sks", the class word, attribute phrases.
VOCABULARY: tuple[str, ...] = tuple(sorted(
    {"a", "an", "photo", "picture", "portrait", "of", "the", "person", "sks", "with", "and", "face",
     "woman", "old", "no"} | {w for phrase in ATTRIBUTE_PHRASES.values() for w in phrase.split()}))

_START, _END = "<|startoftext|>", "<|endoftext|>"
_UNRANKED = 1 << 30


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def bpe_tokens(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair-encode one lowercase ASCII word with CLIP's algorithm (lowest-rank pair first)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        rank, pair = min((ranks.get(p, _UNRANKED), p) for p in zip(parts, parts[1:]))
        if rank == _UNRANKED:
            break
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def _merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Merges under which every word is a single token. New merges go last (lowest priority), which
    cannot change how earlier words split: each of their steps had a better-ranked pair available."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(parts := bpe_tokens(word, ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(merges)
            merges.append((parts[0], parts[1]))
    return merges


def write_tokenizer_files(folder: Path) -> Path:
    """Write vocab.json and merges.txt for the mini world's CLIP tokenizer; returns ``folder``.

    Load them with ``CLIPTokenizer(vocab_path, merges_path)`` (positionally: with transformers 5 the
    ``vocab_file=`` keyword silently builds a 2-token vocabulary).
    """
    folder.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    merges = _merges(VOCABULARY)
    tokens = base + [c + "</w>" for c in base] + [a + b for a, b in merges] + [_START, _END]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return folder


def check_prompt(prompt: str) -> str:
    """Return ``prompt`` if every word is in :data:`VOCABULARY`, else raise a W2WError naming the others."""
    words = re.findall(r"[a-z]+|[^\sa-z]", prompt.lower())
    unknown = sorted({w for w in words if w not in VOCABULARY})
    if unknown:
        raise W2WError(f"prompt {prompt!r} has words the mini world's text encoder never saw: {unknown}. "
                       f"Use words from w2wlib.world.text.VOCABULARY ({len(VOCABULARY)} words).")
    return prompt


def attribute_prompt(attrs: Sequence[bool] | np.ndarray, rng: np.random.Generator, *, max_phrases: int = 3,
                     generic: float = 0.3) -> str:
    """A training prompt for one identity: generic (``"a photo of a person"``) with probability
    ``generic``, otherwise naming its sex and up to ``max_phrases`` of its attributes, so that text
    conditioning means something, as it does in SD.

    Example:
        >>> attribute_prompt([True] + [False] * 16, np.random.default_rng(0), generic=0.0)
        'a photo of a man'
    """
    if rng.random() < generic:
        return "a photo of a person"
    on = {name for name, flag in zip(ATTRIBUTES, attrs) if flag}
    noun = "man" if "Male" in on else "woman"
    age = "young " if "Young" in on and rng.random() < 0.5 else ("old " if "Young" not in on and rng.random() < 0.5 else "")
    others = [ATTRIBUTE_PHRASES[a] for a in ATTRIBUTES if a in on and a not in ("Male", "Young")]
    rng.shuffle(others)
    picked = others[: int(rng.integers(0, max_phrases + 1))]
    text = f"a photo of a {age}{noun}"
    if picked:
        text += " with " + " and ".join(picked)
    return text
