"""Caption text normalisation — one definition of "token" and "word", shared by every length and n-gram count.

MLLM captions are full of typographic punctuation: “curly quotes”, ‘apostrophes’, — dashes, … ellipses, full-width
， commas. A tokenizer that strips only ASCII punctuation leaves them glued to words ("“dog" ≠ "dog"), which changes
CIDEr-D and word counts for the same caption. Here a character is punctuation when its Unicode general category is
punctuation (P*), a math, currency or modifier symbol (Sm, Sc, Sk): on ASCII that class is exactly
``string.punctuation`` (tested), so ASCII text is handled bit for bit as before, and every other character of those
categories is handled like its ASCII counterpart.

- `normalize_caption`: NFKC (full-width forms → ASCII, "…" → "...", ligatures and compatibility spaces unfolded)
  and invisible format characters (Unicode Cf: soft hyphen, zero-width space, BOM, ...) removed. ASCII text is
  returned unchanged.
- `simple_tokenize`: normalised, lower-cased, punctuation turned into spaces, split on whitespace — the no-Java
  stand-in for coco-caption's PTB tokenizer, used by the ``cider_d`` reward and by ``balcaprl evaluate`` without
  Java.
- `caption_words`: the whitespace-separated tokens of the normalised text that hold at least one character other
  than punctuation ("a dog - running ." has 3 words; "man's" and "T-shirt" stay one word each). This is what
  `balcaprl.length.word_length` counts: the length mask of training and the evaluation's length statistics.
"""

from __future__ import annotations

import string
import unicodedata

__all__ = ["DEFAULT_WINDOW", "caption_words", "is_punctuation", "normalize_caption", "simple_tokenize", "word_length"]

PUNCTUATION_CATEGORIES = frozenset({"Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "Sm", "Sc", "Sk"})


def is_punctuation(character: str) -> bool:
    """Whether one character is punctuation here: Unicode category P*, Sm, Sc or Sk (= ``string.punctuation`` on
    ASCII)."""
    return unicodedata.category(character) in PUNCTUATION_CATEGORIES


class _PunctuationToSpace(dict):
    """A `str.translate` table mapping every punctuation character to a space and every other one to itself, filled
    as characters are met (the whole Unicode range would be a 1.1 M-entry table)."""

    def __missing__(self, code_point: int) -> int:
        value = ord(" ") if is_punctuation(chr(code_point)) else code_point
        self[code_point] = value
        return value


_PUNCTUATION_TO_SPACE = _PunctuationToSpace()
# ASCII text (most captions) takes the plain table of `string.punctuation`, the one the tokenizer always used.
_ASCII_PUNCTUATION_TO_SPACE = str.maketrans(string.punctuation, " " * len(string.punctuation))


def _punctuation_table(text: str) -> dict[int, int]:
    return _ASCII_PUNCTUATION_TO_SPACE if text.isascii() else _PUNCTUATION_TO_SPACE


def normalize_caption(text: str) -> str:
    """NFKC with Unicode format characters (category Cf) removed; ASCII text comes back unchanged (the fast path)."""
    if text.isascii():
        return text
    text = unicodedata.normalize("NFKC", text)
    return "".join(character for character in text if unicodedata.category(character) != "Cf")


def simple_tokenize(text: str) -> list[str]:
    """Normalise (`normalize_caption`), lower-case, turn punctuation into spaces, split on whitespace — a fast stand-in
    for the PTB tokenizer.

    coco-caption runs Stanford's PTBTokenizer (Java) and then drops punctuation tokens. On plain captions the two
    agree; they differ on clitics and hyphens (``"man's"`` → ``man s`` here, ``man 's`` in PTB). Scores are
    therefore close to, not identical with, published CIDEr-D numbers; report evaluation tables with pycocoevalcap.
    Typographic punctuation tokenises like its ASCII counterpart (``“Man’s”`` → ``man s``, as ``"Man's"``).
    """
    text = normalize_caption(text)
    return text.lower().translate(_punctuation_table(text)).split()


def caption_words(text: str) -> list[str]:
    """The words of a caption: whitespace-separated tokens of `normalize_caption` text that are not punctuation only.

    Punctuation inside or around a word stays with it (``"dog,"``, ``"man’s"``); a token made only of punctuation
    (``"-"``, ``"…"``, ``"“"``) is not a word.
    """
    text = normalize_caption(text)
    table = _punctuation_table(text)
    return [token for token in text.split() if token.translate(table).strip()]


# BalCapRL's window of ρ = caption length / mean reference length (arXiv 2605.07394): rewards kept for 0.5 ≤ ρ ≤ 2.
# Here, beside `word_length`, so that tools which must not import torch (``balcaprl data inspect``) share them.
DEFAULT_WINDOW = (0.5, 2.0)


def word_length(text: str) -> int:
    """Length in words: whitespace-separated tokens that hold something besides punctuation (`caption_words`, after
    NFKC), so a stray "-", "…" or "“" is not a word and typographic punctuation counts as its ASCII counterpart. The
    length mask of training (``length_unit: words``, `balcaprl.length`) and the evaluation's length statistics both
    count this way."""
    return len(caption_words(text))
