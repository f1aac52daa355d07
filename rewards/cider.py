"""CIDEr-D reward with document frequencies fixed from a training corpus — numpy-vectorised.

CIDEr (Vedantam, Zitnick & Parikh, "CIDEr: Consensus-based Image Description Evaluation", CVPR 2015,
arXiv 1411.5726), in its CIDEr-D form as the coco-caption code computes it. pycocoevalcap 1.2 ships that code:
its ``Cider`` class (``pycocoevalcap.cider``) is named CIDEr but computes CIDEr-D — clipped numerator, Gaussian
length penalty, ×10 — with document frequencies taken from the batch it is given.

Notation: candidate c with references S = (s_1, …, s_m); n-gram orders n = 1 … N (N = 4); I the corpus, a sequence
of reference sets (one per image); h_k(s) the raw count of n-gram k in s; |s| the token count of s.

  df(k)      = #{reference sets in I with k in at least one of their references}
  g_k(s)     = h_k(s) · (log |I| − log max(1, df(k)))                tf-idf; an n-gram unseen in I gets log |I|
  sim_n(c,s) = Σ_{k of order n} min(g_k(c), g_k(s)) · g_k(s) / (‖g^n(c)‖ ‖g^n(s)‖)   (0 if a norm is 0)
  CIDEr-D(c, S) = 10 / (N m) · Σ_j Σ_n exp(−(|c| − |s_j|)² / (2σ²)) · sim_n(c, s_j),   σ = 6

Two details follow the coco-caption code rather than the paper: h_k is the raw count (the paper divides it by the
sentence's n-gram total, which changes the clipping), and the code measures length as the number of bigrams; that
equals |s| − 1 for every non-empty s, so Δ is the same as with token counts whenever sim_n can be non-zero.

Document frequencies are fixed ONCE from a training corpus (SCST practice, Rennie et al. 2017). pycocoevalcap
instead recomputes them from the batch it scores, which makes an RL reward depend on what else is in the batch.
Given the same corpus — ``CiderD(refs)`` built from exactly the reference sets pycocoevalcap sees — the two agree
to floating-point rounding (for the default N = 4; pycocoevalcap always extracts 1- to 4-grams).

Tokenisation: ``simple_tokenize`` (`balcaprl.text`: NFKC, lower-case, Unicode punctuation to spaces, split on
whitespace) approximates the Java PTB tokenizer coco-caption uses; typographic quotes, dashes, ellipses and
full-width forms count as their ASCII counterparts, so they do not change the reward, and ASCII text tokenises
exactly as pycocoevalcap sees it after ``" ".join``. Pass ``tokenize=str.split`` for text that is already tokenised,
as pycocoevalcap's scorer itself just splits on whitespace.

Vectorisation: n-grams are integers, never Python tuples. Words get ids; the k-gram starting at a token gets the
rank of ``id of the (k−1)-gram there · #words + id of its last word`` among the distinct such codes (`_ngram_levels`).
The corpus keeps, per order, its sorted codes and their df, looked up with ``np.searchsorted``. A batch's distinct
reference lists are scored once each — the G completions of a GRPO group share one — and the clipped products of
all candidate-reference pairs are summed with one ``np.bincount``. Only tokenisation and word look-ups are Python.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Sequence
from itertools import chain, repeat
from typing import Any, NamedTuple

import numpy as np

from balcaprl.completions import completion_text
from balcaprl.text import simple_tokenize

__all__ = ["CiderD", "CiderDReward", "cider_d", "simple_tokenize"]


def _reference_tuple(references: str | Sequence[str] | None, row: int, what: str = "Row") -> tuple[str, ...]:
    """One row's references as a hashable tuple; a single string is one reference."""
    if isinstance(references, str):
        return (references,)
    if references is None or len(references) == 0:
        raise ValueError(f"{what} {row} has no reference caption; CIDEr-D needs at least one per row.")
    return tuple(references)


def _check_strings(references: tuple[str, ...], row: int, what: str = "Row") -> None:
    for reference in references:
        if not isinstance(reference, str):
            raise TypeError(f"{what} {row}: references must be strings, got {type(reference).__name__}.")


class _Level(NamedTuple):
    """The k-grams of one order k in a token stream (see `_ngram_levels`)."""

    starts: np.ndarray  # token position where each k-gram occurrence begins
    codes: np.ndarray  # sorted distinct codes of the order; for k > 1, code // num_words is the prefix's id
    ids: np.ndarray  # per occurrence: index of its code in ``codes``


def _ngram_levels(words: np.ndarray, sentence: np.ndarray, num_words: int, max_order: int) -> list[_Level]:
    """The k-grams (k = 1 … N) lying inside one sentence of a token stream, as integer ids equal for equal k-grams.

    ``words[t]`` ∈ [0, num_words) is the word id of token t and ``sentence[t]`` its sentence (contiguous, ascending).
    code(k-gram at t) = words[t] for k = 1, else id((k−1)-gram at t) · num_words + words[t + k − 1]; its id is the
    code's rank among the order's distinct codes. Ranks keep codes below #tokens · num_words: no int64 overflow.
    """
    num_tokens = len(words)
    levels: list[_Level] = []
    previous_ids = words
    for order in range(1, max_order + 1):
        num_starts = max(num_tokens - order + 1, 0)
        # sentence is ascending, so first and last token in one sentence means the whole k-gram is.
        starts = np.flatnonzero(sentence[:num_starts] == sentence[order - 1 : order - 1 + num_starts])
        codes = words[starts] if order == 1 else previous_ids[starts] * num_words + words[starts + order - 1]
        distinct_codes, ids = np.unique(codes, return_inverse=True)
        levels.append(_Level(starts, distinct_codes, ids))
        previous_ids = np.zeros(num_tokens, dtype=np.int64)
        previous_ids[starts] = ids
    return levels


def _lookup(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position of each key in ``sorted_keys`` and whether it is there (the position means nothing where not)."""
    if sorted_keys.size == 0:
        return np.zeros(len(keys), dtype=np.intp), np.zeros(len(keys), dtype=bool)
    position = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return position, sorted_keys[position] == keys


class _SentenceNGrams(NamedTuple):
    """The distinct n-grams of a list of sentences, one entry per (sentence, n-gram)."""

    sentence: np.ndarray  # sentence index
    ngram: np.ndarray  # n-gram id, shared by equal n-grams across all the sentences
    order: np.ndarray  # n − 1
    weight: np.ndarray  # g_k(s) = h_k(s) · idf(k)
    num_ngrams: int  # ids are in [0, num_ngrams)


class CiderD:
    """CIDEr-D scorer with document frequencies fixed from ``corpus_references`` (see the module docstring).

    Args:
        corpus_references: the reference sets of the training corpus, one sequence of captions per image (a single
            string counts as a set of one). df(k) and |I| come from these and never change afterwards.
        n: the largest n-gram order N.
        sigma: σ of the Gaussian length penalty.
        tokenize: ``str -> list[str]``, applied to corpus, references and candidates alike; default
            `simple_tokenize`. Use a module-level function (not a lambda) if the scorer must be pickled.
    """

    def __init__(
        self,
        corpus_references: Sequence[str | Sequence[str]],
        n: int = 4,
        sigma: float = 6.0,
        tokenize: Callable[[str], list[str]] | None = None,
    ):
        if n < 1:
            raise ValueError(f"n (the largest n-gram order) must be >= 1, got {n}.")
        if sigma <= 0:
            raise ValueError(f"sigma (the length-penalty width) must be > 0, got {sigma}.")
        self.n = n
        self.sigma = sigma
        self.tokenize = tokenize if tokenize is not None else simple_tokenize

        self._vocabulary: dict[str, int] = {}
        words = array("q")  # word id of every corpus token; an int64 buffer, not millions of Python ints
        sentence_lengths: list[int] = []
        set_of_sentence: list[int] = []
        self.num_reference_sets = 0
        for row, reference_set in enumerate(corpus_references):
            reference_set = _reference_tuple(reference_set, row, what="corpus_references row")
            _check_strings(reference_set, row, what="corpus_references row")
            for reference in reference_set:
                tokens = self.tokenize(reference)
                words.extend([self._vocabulary.setdefault(token, len(self._vocabulary)) for token in tokens])
                sentence_lengths.append(len(tokens))
                set_of_sentence.append(row)
            self.num_reference_sets = row + 1
        if self.num_reference_sets == 0:
            raise ValueError("corpus_references is empty; CIDEr-D takes its document frequencies from a corpus.")
        self._log_num_reference_sets = math.log(self.num_reference_sets)  # log |I|

        sentence = np.repeat(np.arange(len(sentence_lengths)), sentence_lengths)
        set_of_token = np.asarray(set_of_sentence, dtype=np.int64)[sentence]
        self._codes: list[np.ndarray] = []  # per order: sorted distinct n-gram codes of the corpus
        self._document_frequencies: list[np.ndarray] = []  # per order: df of each code
        for level in _ngram_levels(np.frombuffer(words, dtype=np.int64), sentence, len(self._vocabulary), n):
            # A reference set is one document: count each n-gram once per set, however many captions contain it.
            # (np.unique without return_* takes a hash path that is pathologically slow on these keys: sort instead.)
            num_codes = len(level.codes)
            set_ngram_pairs = np.sort(set_of_token[level.starts] * num_codes + level.ids)
            distinct = np.ones(len(set_ngram_pairs), dtype=bool)
            distinct[1:] = set_ngram_pairs[1:] != set_ngram_pairs[:-1]
            self._codes.append(level.codes)
            self._document_frequencies.append(
                np.bincount(set_ngram_pairs[distinct] % max(num_codes, 1), minlength=num_codes).astype(np.int32)
            )

    def document_frequency(self, ngram: str | Sequence[str]) -> int:
        """df(k): in how many corpus reference sets n-gram k occurs (a string is tokenised first)."""
        tokens = self.tokenize(ngram) if isinstance(ngram, str) else list(ngram)
        if not 1 <= len(tokens) <= self.n:
            raise ValueError(f"An n-gram has 1 to {self.n} tokens, got {len(tokens)}: {tokens!r}.")
        rank = 0
        for order, token in enumerate(tokens):
            word = self._vocabulary.get(token)
            if word is None:
                return 0
            code = word if order == 0 else rank * len(self._vocabulary) + word
            position, found = _lookup(self._codes[order], np.array([code]))
            if not found[0]:
                return 0
            rank = int(position[0])
        return int(self._document_frequencies[len(tokens) - 1][rank])

    def score(self, candidates: Sequence[str], references: Sequence[str | Sequence[str]]) -> list[float]:
        """CIDEr-D of ``candidates[i]`` against its own ``references[i]`` (a list of captions or one string).

        An empty candidate scores 0. References need not belong to the corpus: their n-grams take df from it.

        >>> references = [["a red circle", "a red circle on the left"], ["a blue square", "one blue square"]]
        >>> [round(score, 4) for score in CiderD(references).score(["a red circle", "a blue circle"], references)]
        [5.6969, 1.7603]
        """
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists.")
        num_candidates, max_order = len(candidates), self.n
        if num_candidates == 0:
            return []

        # Distinct reference lists, each scored once: the G completions of a GRPO group share theirs.
        set_index: dict[tuple[str, ...], int] = {}
        candidate_set = np.empty(num_candidates, dtype=np.int64)
        for row, row_references in enumerate(references):
            key = _reference_tuple(row_references, row)
            if key not in set_index:
                _check_strings(key, row)
                set_index[key] = len(set_index)
            candidate_set[row] = set_index[key]
        reference_sets = list(set_index)
        num_refs = np.array([len(reference_set) for reference_set in reference_sets], dtype=np.int64)
        max_refs = int(num_refs.max())

        # Sentences: the candidates, then the references of each distinct set (set index, column j within the set).
        reference_set_of = np.repeat(np.arange(len(reference_sets)), num_refs)
        reference_column = np.arange(len(reference_set_of)) - np.repeat(np.cumsum(num_refs) - num_refs, num_refs)
        tokens = [self.tokenize(candidate) for candidate in candidates]
        tokens += [self.tokenize(reference) for reference_set in reference_sets for reference in reference_set]
        lengths = np.fromiter(map(len, tokens), dtype=float, count=len(tokens))  # |s|
        entries = self._sentence_ngrams(tokens)
        norms = np.sqrt(
            np.bincount(
                entries.sentence * max_order + entries.order,
                weights=entries.weight**2,
                minlength=len(tokens) * max_order,
            )
        ).reshape(len(tokens), max_order)  # ‖g^n(s)‖
        ref_norms = np.zeros((len(reference_sets), max_refs, max_order))
        ref_norms[reference_set_of, reference_column] = norms[num_candidates:]
        ref_lengths = np.zeros((len(reference_sets), max_refs))
        ref_lengths[reference_set_of, reference_column] = lengths[num_candidates:]

        # Entries are sorted by sentence: the candidates' come first, then the references'.
        split = int(np.searchsorted(entries.sentence, num_candidates))
        owner, reference_sentence = entries.sentence[:split], entries.sentence[split:] - num_candidates

        # Reference table: one row per (set, n-gram), one column per reference, holding g_k(s_j).
        table_keys, table_row = np.unique(
            reference_set_of[reference_sentence] * entries.num_ngrams + entries.ngram[split:], return_inverse=True
        )
        table = np.zeros((len(table_keys), max_refs))
        table[table_row, reference_column[reference_sentence]] = entries.weight[split:]

        # Each candidate n-gram against the same n-gram in its own references; clipped products summed per
        # (candidate, reference, order) with one bincount.
        position, matched = _lookup(table_keys, candidate_set[owner] * entries.num_ngrams + entries.ngram[:split])
        owner, order = owner[matched], entries.order[:split][matched]
        candidate_weight = entries.weight[:split][matched]  # g_k(c)
        ref_weight = table[position[matched]]  # (M, max_refs)
        clipped = np.minimum(candidate_weight[:, None], ref_weight) * ref_weight
        bins = (owner[:, None] * max_refs + np.arange(max_refs)) * max_order + order[:, None]
        numerator = (
            np.bincount(bins.ravel(), weights=clipped.ravel(), minlength=num_candidates * max_refs * max_order)
            .astype(np.float64, copy=False)  # bincount of no weights at all (nothing matched) is an int array
            .reshape(num_candidates, max_refs, max_order)
        )

        denominator = norms[:num_candidates, None, :] * ref_norms[candidate_set]  # ‖g^n(c)‖ ‖g^n(s_j)‖
        similarity = np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)
        delta = lengths[:num_candidates, None] - ref_lengths[candidate_set]
        penalty = np.exp(-(delta**2) / (2 * self.sigma**2))
        # Padding columns have a zero numerator, so dividing by the true m averages over real references only.
        scores = 10.0 * (similarity * penalty[:, :, None]).sum(axis=(1, 2)) / (max_order * num_refs[candidate_set])
        return scores.tolist()

    def _sentence_ngrams(self, tokens: list[list[str]]) -> _SentenceNGrams:
        """h_k(s), df(k) and g_k(s) of every distinct n-gram k of every sentence s, all as flat arrays."""
        flat = list(chain.from_iterable(tokens))
        sentence = np.repeat(np.arange(len(tokens)), [len(sentence_tokens) for sentence_tokens in tokens])
        num_corpus_words = len(self._vocabulary)
        corpus_words = np.fromiter(map(self._vocabulary.get, flat, repeat(-1)), dtype=np.int64, count=len(flat))
        # Words unseen in the corpus have df 0 but still need ids, so that a candidate matches its references on them.
        words = corpus_words.copy()
        unseen = np.flatnonzero(corpus_words < 0)
        unseen_words = [flat[position] for position in unseen.tolist()]
        unseen_ids = {word: num_corpus_words + i for i, word in enumerate(dict.fromkeys(unseen_words))}
        words[unseen] = [unseen_ids[word] for word in unseen_words]
        num_words = max(num_corpus_words + len(unseen_ids), 1)
        levels = _ngram_levels(words, sentence, num_words, self.n)

        # df of each distinct n-gram, order by order: its corpus code is (corpus rank of its (k−1)-gram prefix) ·
        # #corpus words + its last word, as in the corpus tables; rank -1 where the corpus lacks the n-gram.
        document_frequencies, orders = [], []
        corpus_rank = np.empty(0, dtype=np.int64)
        for order, level in enumerate(levels):
            if order == 0:
                codes, known = level.codes, level.codes < num_corpus_words
            else:
                prefix, last = corpus_rank[level.codes // num_words], level.codes % num_words
                codes, known = prefix * num_corpus_words + last, (prefix >= 0) & (last < num_corpus_words)
            # Local ids follow the corpus order (unseen words come last), so codes[known] ascend: searchsorted then
            # walks a large corpus table in order instead of jumping around it.
            searchable = np.flatnonzero(known)
            position, found = _lookup(self._codes[order], codes[searchable])
            in_corpus, position = searchable[found], position[found]
            corpus_rank = np.full(len(codes), -1, dtype=np.int64)
            corpus_rank[in_corpus] = position
            level_document_frequency = np.zeros(len(codes), dtype=np.int64)
            level_document_frequency[in_corpus] = self._document_frequencies[order][position]
            document_frequencies.append(level_document_frequency)
            orders.append(np.full(len(codes), order))
        document_frequency, order_of_ngram = np.concatenate(document_frequencies), np.concatenate(orders)

        # One entry per (sentence, n-gram), n-grams numbered across orders; h_k(s) is the number of occurrences.
        offsets = np.cumsum([0] + [len(level.codes) for level in levels])
        num_ngrams = max(int(offsets[-1]), 1)
        keys, term_frequency = np.unique(
            np.concatenate(
                [
                    sentence[level.starts] * num_ngrams + level.ids + offsets[order]
                    for order, level in enumerate(levels)
                ]
            ),
            return_counts=True,
        )
        ngram = keys % num_ngrams
        idf = self._log_num_reference_sets - np.log(np.maximum(document_frequency[ngram], 1.0))
        return _SentenceNGrams(
            sentence=keys // num_ngrams,
            ngram=ngram,
            order=order_of_ngram[ngram],
            weight=term_frequency * idf,
            num_ngrams=num_ngrams,
        )


class CiderDReward:
    """TRL reward function ``fn(prompts, completions, references, **kwargs) -> list[float]`` scoring CIDEr-D.

    The references come from the dataset column ``reference_column`` (default ``references``): one list of reference
    captions (or one string) per completion. Completions are plain strings or conversational
    ``[{"role": "assistant", "content": ...}]``. A small class rather than a closure so that it pickles;
    ``__name__`` is ``"cider_d"`` (metric ``rewards/cider_d/mean``).
    """

    def __init__(self, scorer: CiderD, reference_column: str = "references"):
        self.scorer = scorer
        self.reference_column = reference_column
        self.__name__ = "cider_d"

    def __call__(
        self,
        prompts: Sequence[Any] | None = None,
        completions: Sequence[Any] | None = None,
        references: Sequence[str | Sequence[str]] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        if self.reference_column != "references":
            references = kwargs.get(self.reference_column)
        if completions is None:
            raise ValueError("cider_d needs `completions`.")
        if references is None:
            raise ValueError(
                f"cider_d needs the dataset column {self.reference_column!r} (one list of reference captions per row)."
            )
        return self.scorer.score([completion_text(completion) for completion in completions], references)

    def __repr__(self) -> str:
        scorer = self.scorer
        return f"cider_d(n={scorer.n}, sigma={scorer.sigma}, corpus of {scorer.num_reference_sets} reference sets)"


def cider_d(
    corpus_references: Sequence[str | Sequence[str]], reference_column: str = "references", **cider_kwargs: Any
) -> CiderDReward:
    """TRL reward function scoring CIDEr-D with document frequencies from ``corpus_references``.

    ``reference_column`` names the dataset column holding each row's references; ``cider_kwargs`` go to `CiderD`
    (``n``, ``sigma``, ``tokenize``).
    """
    return CiderDReward(CiderD(corpus_references, **cider_kwargs), reference_column)
