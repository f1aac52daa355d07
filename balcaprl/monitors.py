"""Reward-hacking monitors: what a policy's sampled captions look like, beside the rewards they earned.

A reward model can be gamed in ways its score does not show: repeating a sentence that a recall judge keeps
crediting, collapsing onto one safe caption for every image, or drifting longer or shorter than the references
(BalCapRL, arXiv 2605.07394, §3: recall alone rewards listing, precision alone rewards saying little). The trainer
logs these every step (`BalCapGRPOTrainer`), over all the step's sampled captions of every process:

- ``monitor/repeated_sentence``: share of captions in which a sentence occurs twice (compared as lower-cased words
  without punctuation, so "A red circle." and "a red circle!" are the same sentence);
- ``monitor/repeated_4gram``: mean over captions of seq-rep-4, the share of a caption's word 4-grams that repeat an
  earlier 4-gram of the same caption (Welleck et al., 2019, "Neural text generation with unlikelihood training");
  0 for a caption of fewer than 5 words. Natural captions reuse some 4-grams ("there is a small ... there is a
  small"), so watch its trend, not its level;
- ``monitor/distinct_1``, ``monitor/distinct_2``: distinct-n of the step's captions taken together, unique word
  n-grams / all word n-grams (Li et al., 2016); falling values mean the policy says the same thing for every image;
- ``monitor/length_words``: mean caption length in words (`balcaprl.text.caption_words`, the length mask's unit);
- ``monitor/length_drift``: mean caption length minus the mean length of the rows' references, in words (each row's
  reference length is the mean over its references, as in the length mask's ratio).

Pure functions, no torch: they run on plain strings, in the trainer, the demo and the evaluation alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from statistics import fmean

from balcaprl.text import caption_words, simple_tokenize

__all__ = [
    "MONITOR_NAMES",
    "caption_monitors",
    "distinct_ngrams",
    "has_repeated_sentence",
    "repeated_ngram_share",
    "sentence_keys",
]

MONITOR_NAMES = (
    "monitor/repeated_sentence",
    "monitor/repeated_4gram",
    "monitor/distinct_1",
    "monitor/distinct_2",
    "monitor/length_words",
    "monitor/length_drift",
)

_SENTENCE = re.compile(r"[^.!?]+")


def sentence_keys(caption: str) -> list[tuple[str, ...]]:
    """The caption's sentences (text between . ! ?) as tuples of lower-cased words without punctuation; empty
    sentences are dropped."""
    keys = (tuple(simple_tokenize(piece)) for piece in _SENTENCE.findall(caption))
    return [key for key in keys if key]


def has_repeated_sentence(caption: str) -> bool:
    """Whether a sentence of ``caption`` occurs twice (see `sentence_keys` for what counts as the same sentence).

    >>> has_repeated_sentence("A red circle is on the left. A blue square. A red circle is on the left!")
    True
    >>> has_repeated_sentence("A red circle is on the left. A red circle is on the right.")
    False
    """
    keys = sentence_keys(caption)
    return len(set(keys)) < len(keys)


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def repeated_ngram_share(caption: str, n: int = 4) -> float:
    """seq-rep-n of one caption: 1 − unique word n-grams / word n-grams (0 when it has no n-gram).

    >>> repeated_ngram_share("a red circle and a red circle and a red circle", n=4)  # 8 4-grams, 4 distinct
    0.5
    """
    grams = _ngrams(simple_tokenize(caption), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_ngrams(captions: Sequence[str], n: int) -> float:
    """Distinct-n of a set of captions: unique word n-grams / all word n-grams over the set (0 when it has none)."""
    grams = [gram for caption in captions for gram in _ngrams(simple_tokenize(caption), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def caption_monitors(captions: Sequence[str], reference_lengths: Sequence[float] | None = None) -> dict[str, float]:
    """The `MONITOR_NAMES` values of a set of captions; ``reference_lengths`` (words, one per caption: the mean
    length of its row's references) gives ``monitor/length_drift``, left out when None.

    >>> values = caption_monitors(["A red circle. A red circle.", "A blue square on the left."], [3.0, 6.0])
    >>> values["monitor/repeated_sentence"], values["monitor/length_words"], values["monitor/length_drift"]
    (0.5, 6.0, 1.5)
    """
    if not captions:
        return {}
    lengths = [len(caption_words(caption)) for caption in captions]
    values = {
        "monitor/repeated_sentence": fmean(float(has_repeated_sentence(caption)) for caption in captions),
        "monitor/repeated_4gram": fmean(repeated_ngram_share(caption, 4) for caption in captions),
        "monitor/distinct_1": distinct_ngrams(captions, 1),
        "monitor/distinct_2": distinct_ngrams(captions, 2),
        "monitor/length_words": fmean(lengths),
    }
    if reference_lengths is not None:
        if len(reference_lengths) != len(captions):
            raise ValueError(f"{len(captions)} captions but {len(reference_lengths)} reference lengths.")
        values["monitor/length_drift"] = fmean(lengths) - fmean(reference_lengths)
    return values
