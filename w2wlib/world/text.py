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
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ..errors import W2WError
from .render import ATTRIBUTE_PHRASES, ATTRIBUTES, FACTOR_NAMES, Factors, sample_identities  # noqa: F401 (doctests)

__all__ = ["VOCABULARY", "check_prompt", "attribute_prompt", "describe_identity", "identity_prompt", "PromptMix",
           "write_tokenizer_files", "bpe_tokens"]

#: The words prompts are made of: the DreamBooth identifier "sks", the class word, attribute phrases.
VOCABULARY: tuple[str, ...] = tuple(sorted(
    {"a", "an", "photo", "picture", "portrait", "of", "the", "person", "sks", "with", "and", "face",
     "woman", "old", "no", "middle", "aged", "skin", "fair", "olive", "dark", "thin", "thick", "short", "long",
     "light", "black", "brown", "blond", "gray", "hair", "narrow", "chubby", "face", "soft", "strong", "jaw",
     "small", "big", "close", "wide", "blue", "green", "eyes", "drooping", "arched", "eyebrows", "broad", "nose",
     "mouth", "pale", "red", "lips", "goatee", "full", "beard", "round", "square", "gold", "glasses", "earrings",
     "deep", "wrinkles"} | {w for phrase in ATTRIBUTE_PHRASES.values() for w in phrase.split()}))

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
    """A short prompt for one identity: generic (``"a photo of a person"``) with probability
    ``generic``, otherwise naming its sex and up to ``max_phrases`` of its CelebA attributes.

    Example:
        >>> attribute_prompt([True] + [False] * 16, np.random.default_rng(0), generic=0.0)
        'a photo of a man'
    """
    if rng.random() < generic:
        return "a photo of a person"
    on = {name for name, flag in zip(ATTRIBUTES, attrs) if flag}
    noun = "man" if "Male" in on else "woman"
    age = "young " if "Young" in on and rng.random() < 0.5 else ("old " if "Young" not in on and rng.random() < 0.5 else "")
    bald = "bald " if "Bald" in on and rng.random() < 0.5 else ""
    others = [ATTRIBUTE_PHRASES[a] for a in ATTRIBUTES if a in on and a not in ("Male", "Young", "Bald")]
    rng.shuffle(others)
    return _join(f"a photo of a {age}{bald}{noun}", others[: int(rng.integers(0, max_phrases + 1))])


def _join(head: str, phrases: Sequence[str]) -> str:
    return f"{head} with " + " and ".join(phrases) if phrases else head


def _level(x: float, lo: float, hi: float, low: str, high: str) -> str:
    """``low`` below ``lo``, ``high`` above ``hi``, nothing in between (the unremarkable middle)."""
    return low if x < lo else (high if x > hi else "")


def _words(*words: str) -> str:
    return " ".join(w for w in words if w)


_HAIR_COLOURS = ("black", "brown", "blond", "gray")
_EYE_COLOURS = ("brown", "dark", "blue", "green")
_GLASSES = ("", "round glasses", "square glasses", "thin gold glasses")
_BARE = ("eyebrows", "a nose", "lips")


def describe_identity(factors: Factors, i: int) -> tuple[str, list[tuple[str, str]]]:
    """Identity ``i`` of ``factors`` in words: ``(head, [(full phrase, short phrase), ...])``.

    The full phrases name every factor the renderer draws, each continuous one by its low or high third
    (the middle third is left unsaid) and with the CelebA attribute's own word at the attribute's
    threshold (``chubby``, ``big nose``, ``bushy eyebrows``, ``pale skin``...). The short phrase is the
    attribute phrase a user would write (``blond hair`` for ``thick long light blond hair``).

    Example:
        >>> head, phrases = describe_identity(sample_identities([3]), 0); head
        'a photo of a young man'
    """
    f = {name: float(getattr(factors, name)[i]) for name in FACTOR_NAMES}
    age = "young" if f["age"] < 0.45 else ("middle aged" if f["age"] < 0.7 else "old")
    bald = f["hair_style"] == 0
    head = _words("a photo of a", age, "bald" if bald else "", "man" if f["sex"] > 0.5 else "woman")
    out: list[tuple[str, str]] = []
    skin = ("pale" if f["skin_tone"] < 0.15 else "fair" if f["skin_tone"] < 0.45
            else "olive" if f["skin_tone"] < 0.75 else "dark")
    out.append((f"{skin} skin", f"{skin} skin"))
    if not bald:
        colour, style = _HAIR_COLOURS[int(f["hair_color"])], int(f["hair_style"])
        out.append((_words(_level(f["hair_volume"], 1 / 3, 2 / 3, "thin", "thick"), "short" if style <= 2 else "long",
                           _level(f["hair_shade"], -0.05, 0.05, "dark", "light"), colour, "hair"), f"{colour} hair"))
        if style in (2, 4):
            out.append(("bangs", "bangs"))
    width = "chubby" if f["face_width"] > 1.06 else ("narrow" if f["face_width"] < 0.98 else "")
    height = _level(f["face_height"], 0.977, 1.023, "short", "long")
    if width or height:
        out.append((_words("a", width, height, "face"), "a chubby face" if width == "chubby" else _words("a", width, height, "face")))
    if jaw := _level(f["jaw"], 1 / 3, 2 / 3, "soft", "strong"):
        out.append((f"a {jaw} jaw", f"a {jaw} jaw"))
    eyes = _EYE_COLOURS[int(f["eye_color"])]
    out.append((_words(_level(f["eye_size"], 0.95, 1.05, "small", "big"), _level(f["eye_spacing"], 0.967, 1.033, "close", "wide"),
                       eyes, "eyes"), f"{eyes} eyes"))
    brows = _level(f["brow_thickness"], 0.9, 1.25, "thin", "bushy")
    out.append((_words(brows, _level(f["brow_tilt"], -1 / 3, 1 / 3, "drooping", "arched"), "eyebrows"), _words(brows, "eyebrows")))
    nose = _level(f["nose_size"], 0.97, 1.2, "small", "big")
    out.append((_words("a", nose, _level(f["nose_width"], 0.933, 1.067, "narrow", "broad"), "nose"), _words("a", nose, "nose")))
    if mouth := _level(f["mouth_width"], 0.95, 1.05, "small", "wide"):
        out.append((f"a {mouth} mouth", f"a {mouth} mouth"))
    lips = _level(f["lip_size"], 0.95, 1.2, "thin", "big")
    out.append((_words(lips, _level(f["lip_color"], 1 / 3, 2 / 3, "pale", "red"), "lips"), _words(lips, "lips")))
    if f["beard"] > 0:
        out.append(("a goatee beard" if f["beard"] == 1 else "a full beard", "beard"))
    if f["mustache"] > 0.5:
        out.append(("a mustache", "mustache"))
    if f["glasses"] > 0:
        out.append((_GLASSES[int(f["glasses"])], "glasses"))
    if f["earrings"] > 0.5:
        out.append(("earrings", "earrings"))
    if wrinkles := _level(f["wrinkles"], 0.15, 0.5, "", "deep"):
        out.append((f"{wrinkles} wrinkles", "wrinkles"))
    elif f["wrinkles"] >= 0.15:
        out.append(("wrinkles", "wrinkles"))
    return head, out


@dataclass(frozen=True)
class PromptMix:
    """How training prompts are drawn (empty prompts for CFG are drawn by the trainer, before this).

    Full descriptions teach the text pathway the whole identity, so that text can pin a person as it
    does in SD 1.5 (the shipped base trained on <= 3 phrases learnt to ignore its text:
    ``../shared/NOTES.md``). Generic and short prompts keep "a photo of a person" diverse and let a user's
    short prompt ("a photo of a person with blond hair") mean what it says.
    """

    generic: float = 0.15   # "a photo of a person"
    short: float = 0.15     # the head (sex, sometimes age) and 1-3 short phrases
    # the rest: the full description, every phrase


def identity_prompt(factors: Factors, i: int, rng: np.random.Generator, mix: PromptMix = PromptMix()) -> str:
    """A training prompt for identity ``i`` of ``factors``, drawn from ``mix``.

    Example:
        >>> identity_prompt(sample_identities([3]), 0, np.random.default_rng(0), PromptMix(0, 0))[:22]
        'a photo of a young man'
    """
    u = rng.random()
    if u < mix.generic:
        return "a photo of a person"
    head, phrases = describe_identity(factors, i)
    if u < mix.generic + mix.short:
        short = [s for _, s in phrases if s not in _BARE]  # a bare "lips" says nothing
        k = min(len(short), int(rng.integers(1, 4)))
        keep = sorted(rng.choice(len(short), k, replace=False).tolist())
        if rng.random() < 0.5 and " bald " not in head:
            head = "a photo of a person"
        return _join(head, [short[j] for j in keep])
    return _join(head, [full for full, _ in phrases])
