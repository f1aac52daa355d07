"""One caption normalisation (`balcaprl.text`) for the cider_d reward, the no-Java evaluation and word counts:
typographic punctuation counts as ASCII punctuation, and ASCII text is handled exactly as before."""

from __future__ import annotations

import os
import random
import string

import pytest

from balcaprl.length import length_ratios, word_length
from balcaprl.rewards.cider import CiderD, cider_d
from balcaprl.text import caption_words, is_punctuation, normalize_caption, simple_tokenize

# The same captions twice: as an MLLM writes them (curly quotes, apostrophes, dashes, ellipses, full-width forms,
# no-break and zero-width spaces) and in ASCII.
TYPOGRAPHIC = [
    "A man’s “vintage” bicycle — leaning on a wall…",
    "Two dogs，playing in the snow！",
    "A ‘small’ café sign – “open”.",
    "Ｔｈｅ cat sleeps\u00a0on a\u200b sofa « here ».",
]
ASCII = [
    'A man\'s "vintage" bicycle - leaning on a wall...',
    "Two dogs,playing in the snow!",
    "A 'small' café sign - \"open\".",
    'The cat sleeps on a sofa " here ".',
]
REFERENCES = [
    ["A man's bicycle leaning on a wall.", "An old bicycle against a brick wall."],
    ["Two dogs playing in the snow.", "Dogs play in snow."],
    ["A small cafe sign that says open.", "The sign of a small cafe."],
    ["A cat sleeping on a sofa.", "The cat sleeps on the couch."],
]


def ascii_only_tokenize(text: str) -> list[str]:
    """The tokenizer as it was: only ASCII punctuation removed."""
    return text.lower().translate(str.maketrans(string.punctuation, " " * len(string.punctuation))).split()


def test_the_punctuation_class_is_string_punctuation_on_ascii():
    assert {chr(code) for code in range(128) if is_punctuation(chr(code))} == set(string.punctuation)


def test_ascii_text_tokenises_exactly_as_before():
    generator = random.Random(0)
    alphabet = string.printable + "  "
    texts = ["".join(generator.choice(alphabet) for _ in range(generator.randrange(60))) for _ in range(2000)]
    texts += [caption for rows in REFERENCES for caption in rows] + ASCII
    assert all(simple_tokenize(text) == ascii_only_tokenize(text) for text in texts)
    assert all(normalize_caption(text) == text for text in texts)


def test_typographic_punctuation_tokenises_as_ascii():
    for typographic, plain in zip(TYPOGRAPHIC, ASCII):
        assert simple_tokenize(typographic) == simple_tokenize(plain), typographic
        assert len(caption_words(typographic)) == len(caption_words(plain)), typographic
    assert simple_tokenize("Ｔｈｅ “cat”…") == ["the", "cat"]
    assert simple_tokenize("naïve café") == ["naïve", "café"]  # letters are not punctuation


def test_words_are_tokens_that_are_not_punctuation_only():
    assert word_length("  a red\tcircle\n") == 3
    assert word_length("a dog - running . ...") == 3  # before: 6 (whitespace tokens)
    assert word_length("“A dog” — running …") == word_length('"A dog" - running ...') == 3
    assert word_length("a man's T-shirt, red.") == 4  # punctuation inside or around a word stays with it
    assert word_length("— … “ ”") == 0
    ratios = length_ratios(["a dog — running …"], [["a dog running"]])
    assert ratios.tolist() == [1.0]


def test_cider_d_reward_is_the_same_for_typographic_and_ascii_punctuation():
    corpus = REFERENCES + [["A red bus on a street.", "A bus."], ["A plate of food.", "Some food on a plate."]]
    reward = cider_d(corpus)
    typographic = reward(completions=TYPOGRAPHIC, references=REFERENCES)
    plain = reward(completions=ASCII, references=REFERENCES)
    assert typographic == pytest.approx(plain, rel=1e-12, abs=1e-12) and min(plain) > 0
    # References written with typographic punctuation score the same too.
    curly_references = [[reference.replace("'", "’") for reference in rows] for rows in REFERENCES]
    assert reward(completions=ASCII, references=curly_references) == pytest.approx(plain, rel=1e-12, abs=1e-12)
    # What this fixes: with only ASCII punctuation stripped, the curly-quoted captions scored lower.
    before = CiderD(corpus, tokenize=ascii_only_tokenize)
    assert sum(before.score(TYPOGRAPHIC, REFERENCES)) < sum(before.score(ASCII, REFERENCES)) - 0.5


def test_no_java_metrics_are_the_same_for_typographic_and_ascii_punctuation(monkeypatch):
    """Without java on PATH (a real PATH without it), BLEU / ROUGE-L / CIDEr-D run on the shared tokenizer."""
    from balcaprl.evaluate.classic import classic_section, length_section

    directories = os.environ.get("PATH", "").split(os.pathsep)
    monkeypatch.setenv("PATH", os.pathsep.join(d for d in directories if not os.access(os.path.join(d, "java"), 1)))
    rows = [
        [
            {"id": str(index), "caption": caption, "references": references}
            for index, (caption, references) in enumerate(zip(captions, REFERENCES))
        ]
        for captions in (TYPOGRAPHIC, ASCII)
    ]
    typographic, plain = (classic_section(records) for records in rows)
    assert typographic["tokenizer"] == plain["tokenizer"] == "simple"
    assert typographic["metrics"] == plain["metrics"] and plain["metrics"]["CIDEr-D"] > 0
    assert typographic["per_caption"] == plain["per_caption"]
    assert length_section(rows[0])["per_caption"] == length_section(rows[1])["per_caption"]
