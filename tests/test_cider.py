"""CIDEr-D reward (rewards/cider.py): equality with pycocoevalcap, hand-computed values, fixed document frequencies."""

import math
import pickle
import random
from collections import Counter

import numpy as np
import pytest

from balcaprl.rewards.cider import CiderD, CiderDReward, cider_d, simple_tokenize

VOCABULARY = "a the man woman dog cat red blue small sits runs on in park street grass ball with".split()


def random_caption(rng: random.Random, max_words: int = 12) -> str:
    return " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(0, max_words)))


def perturbed(rng: random.Random, caption: str) -> str:
    """A reference with a few words resampled: overlaps its references the way a sampled caption does."""
    words = caption.split()
    for position in rng.sample(range(len(words)), len(words) // 3):
        words[position] = rng.choice(VOCABULARY)
    return " ".join(words)


def random_images(rng: random.Random, num_images: int) -> list[list[str]]:
    """1 to 5 pre-tokenised references per image; a few are empty strings."""
    return [[random_caption(rng) for _ in range(rng.randint(1, 5))] for _ in range(num_images)]


def random_candidate(rng: random.Random, references: list[str]) -> str:
    kind = rng.random()
    if kind < 0.05:
        return ""
    if kind < 0.15:
        return rng.choice(references)
    if kind < 0.6:
        return perturbed(rng, rng.choice(references))
    return random_caption(rng, max_words=16)


def pycocoevalcap_scores(candidates: list[str], references: list[list[str]]) -> np.ndarray:
    """pycocoevalcap's CIDEr-D (its ``Cider`` class) of a batch; it takes df from this batch's references."""
    cider = pytest.importorskip("pycocoevalcap.cider.cider")
    _, scores = cider.Cider().compute_score(
        {image: list(refs) for image, refs in enumerate(references)},
        {image: [candidate] for image, candidate in enumerate(candidates)},
    )
    return np.asarray(scores)


def formula_cider_d(candidate: str, references: list[str], corpus: list[list[str]], n: int, sigma: float) -> float:
    """CIDEr-D straight from the module docstring, with dictionaries (whitespace tokens)."""

    def counts(text: str) -> Counter:
        words = text.split()
        return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))

    document_frequency = Counter(ngram for refs in corpus for ngram in set().union(*map(counts, refs)))

    def tf_idf(text: str) -> dict:
        idf = {g: math.log(len(corpus)) - math.log(max(1, document_frequency[g])) for g in counts(text)}
        return {g: h * idf[g] for g, h in counts(text).items()}

    def norm(vector: dict, order: int) -> float:
        return math.sqrt(sum(w * w for g, w in vector.items() if len(g) == order))

    c, total = tf_idf(candidate), 0.0
    for reference in references:
        s = tf_idf(reference)
        penalty = math.exp(-((len(candidate.split()) - len(reference.split())) ** 2) / (2 * sigma**2))
        for order in range(1, n + 1):
            numerator = sum(min(w, s.get(g, 0.0)) * s.get(g, 0.0) for g, w in c.items() if len(g) == order)
            denominator = norm(c, order) * norm(s, order)
            total += penalty * (numerator / denominator if denominator else 0.0)
    return 10.0 * total / (n * len(references))


class TestAgainstPycocoevalcap:
    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_random_sets_match_to_1e_6(self, seed):
        rng = random.Random(seed)
        references = random_images(rng, 300)
        candidates = [random_candidate(rng, refs) for refs in references]
        expected = pycocoevalcap_scores(candidates, references)
        ours = CiderD(references, tokenize=str.split).score(candidates, references)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
        assert expected.max() > 1.0  # the batch exercises real overlaps, not only zeros

    def test_grpo_groups_match(self):
        # G candidates per image in one call to ours; pycocoevalcap once per candidate index j, so that each of its
        # runs holds every reference set exactly once, as our corpus does.
        rng = random.Random(3)
        num_images, num_generations = 40, 6
        references = random_images(rng, num_images)
        groups = [[random_candidate(rng, refs) for _ in range(num_generations)] for refs in references]
        ours = CiderD(references, tokenize=str.split).score(
            [candidate for group in groups for candidate in group],
            [refs for refs in references for _ in range(num_generations)],
        )
        expected = np.stack(
            [pycocoevalcap_scores([group[j] for group in groups], references) for j in range(num_generations)], axis=1
        )
        np.testing.assert_allclose(np.reshape(ours, (num_images, num_generations)), expected, rtol=0, atol=1e-6)

    def test_default_tokenizer_equals_pycocoevalcap_on_its_output(self):
        references = [["A dog, running on the grass.", "The dog runs!"], ["Two cats; sleeping."], ["A red ball"]]
        candidates = ["a DOG running on grass", "two cats sleeping...", "A red, red ball."]
        ours = CiderD(references).score(candidates, references)
        tokenized_references = [[" ".join(simple_tokenize(ref)) for ref in refs] for refs in references]
        tokenized_candidates = [" ".join(simple_tokenize(candidate)) for candidate in candidates]
        expected = pycocoevalcap_scores(tokenized_candidates, tokenized_references)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)

    def test_pycocoevalcap_depends_on_the_batch_ours_does_not(self):
        references = [["a dog runs in the park", "a dog in a park"], ["a cat sits on the grass"], ["a red ball"]]
        candidate = "a dog runs on the grass"
        theirs_small = pycocoevalcap_scores([candidate, "a cat"], references[:2])[0]
        theirs_large = pycocoevalcap_scores([candidate, "a cat", "a ball"], references)[0]
        assert abs(theirs_small - theirs_large) > 1e-3
        scorer = CiderD(references, tokenize=str.split)
        ours_small = scorer.score([candidate, "a cat"], references[:2])[0]
        ours_large = scorer.score([candidate, "a cat", "a ball"], references)[0]
        assert ours_small == ours_large


class TestHandComputed:
    # Corpus of |I| = 2 sets {"a cat"}, {"a dog"}: idf = log 2 − log df, so "a" (df 2) weighs 0 and "cat", "a cat"
    # (df 1) weigh L = log 2. Orders 3-4 are empty (norm 0 → sim 0), hence the factor 10 · (1 + 1 + 0 + 0) / 4.
    CORPUS = [["a cat"], ["a dog"]]

    def scorer(self, corpus=None, **kwargs) -> CiderD:
        return CiderD(corpus or self.CORPUS, tokenize=str.split, **kwargs)

    def test_identical_caption(self):
        # unigrams (0, L)·(0, L) / (L·L) = 1, bigram "a cat" 1 → 10 · 2 / 4
        assert self.scorer().score(["a cat"], [["a cat"]]) == pytest.approx([5.0], abs=1e-12)

    def test_no_shared_informative_ngram(self):
        # "a dog" vs "a cat": only "a" is shared and its idf is 0.
        assert self.scorer().score(["a dog"], [["a cat"]]) == [0.0]

    def test_clipping_of_repeated_words(self):
        # "cat cat": g_cat = 2L, clipped to the reference's L: min(2L, L) · L / (2L · L) = 1/2 for unigrams; the
        # bigram "cat cat" is absent from the reference → 10 · (1/2) / 4. Unclipped it would be 2.5.
        assert self.scorer().score(["cat cat"], [["a cat"]]) == pytest.approx([1.25], abs=1e-12)

    def test_two_references_with_length_penalty(self):
        # |I| = 3, L = log 3; "a" has df 3 (idf 0), every other n-gram df 1 (idf L). Candidate "a cat":
        #   vs "a cat sits": unigrams L² / (L · L√2) = 1/√2, bigrams 1/√2; Δ = 2 − 3 → penalty e^{−1/72}
        #   vs "a cat": 1 and 1, Δ = 0
        # CIDEr-D = 10 / (4 · 2) · (√2 · e^{−1/72} + 2)
        corpus = [["a cat sits", "a cat"], ["a dog"], ["a bird"]]
        expected = 1.25 * (2 + math.sqrt(2) * math.exp(-1 / 72))
        assert self.scorer(corpus).score(["a cat"], [corpus[0]]) == pytest.approx([expected], abs=1e-12)

    def test_one_image_corpus_gives_zero(self):
        # |I| = 1: every corpus n-gram has idf log 1 − log 1 = 0.
        assert self.scorer([["a cat"]]).score(["a cat"], [["a cat"]]) == [0.0]

    def test_image_outside_the_corpus_still_scores(self):
        # "bird" and "a bird" are unseen in the corpus: df 0 → idf log 2, as for any unseen n-gram.
        scorer = self.scorer()
        assert scorer.document_frequency("bird") == 0
        assert scorer.score(["a bird"], [["a bird"]]) == pytest.approx([5.0], abs=1e-12)

    def test_empty_candidate_scores_zero(self):
        assert self.scorer().score(["", "a cat"], [["a cat"], ["a cat"]]) == pytest.approx([0.0, 5.0], abs=1e-12)

    def test_sigma_and_n_are_used(self):
        corpus = [["a cat sits", "a cat"], ["a dog"], ["a bird"]]
        # n = 1: unigram sims 1/√2 (penalised) and 1 → 10 / 2 · (e^{−1/8} / √2 + 1) with σ = 2
        expected = 5 * (math.exp(-1 / 8) / math.sqrt(2) + 1)
        scores = self.scorer(corpus, n=1, sigma=2.0).score(["a cat"], [corpus[0]])
        assert scores == pytest.approx([expected], abs=1e-12)


class TestAgainstTheFormula:
    @pytest.mark.parametrize(("n", "sigma"), [(1, 6.0), (2, 3.0), (3, 6.0), (4, 1.5), (5, 6.0)])
    def test_random_sets_any_order_and_references_outside_the_corpus(self, n, sigma):
        rng = random.Random(n)
        corpus = random_images(rng, 30)
        # Half the scored images are in the corpus, half are not (their n-grams take df from the corpus).
        references = corpus[:20] + random_images(rng, 20)
        candidates = [random_candidate(rng, refs) + rng.choice(["", " zebra", " zebra sits"]) for refs in references]
        ours = CiderD(corpus, n=n, sigma=sigma, tokenize=str.split).score(candidates, references)
        expected = [formula_cider_d(c, refs, corpus, n, sigma) for c, refs in zip(candidates, references)]
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-9)


class TestDocumentFrequency:
    def test_counts_reference_sets_not_captions(self):
        scorer = CiderD([["a dog", "a dog runs"], ["a cat"]], tokenize=str.split)
        assert scorer.num_reference_sets == 2
        assert scorer.document_frequency("a") == 2
        assert scorer.document_frequency("dog") == 1  # in two captions of one set
        assert scorer.document_frequency("a dog runs") == 1
        assert scorer.document_frequency(("dog", "runs")) == 1
        assert scorer.document_frequency("zebra") == 0
        assert scorer.document_frequency("dog a") == 0

    def test_ngrams_do_not_cross_caption_boundaries(self):
        scorer = CiderD([["a b", "c d"]], tokenize=str.split)
        assert scorer.document_frequency("b c") == 0
        assert scorer.document_frequency("c d") == 1

    def test_fixed_whatever_else_is_in_the_batch(self):
        rng = random.Random(7)
        corpus = random_images(rng, 50)
        scorer = CiderD(corpus, tokenize=str.split)
        candidate, refs = perturbed(rng, corpus[0][0]), corpus[0]
        alone = scorer.score([candidate], [refs])[0]
        others = [random_candidate(rng, other) for other in corpus[1:20]]
        in_batch = scorer.score(others[:7] + [candidate] + others[7:], corpus[1:8] + [refs] + corpus[8:20])[7]
        assert alone == pytest.approx(in_batch, abs=1e-12)
        assert alone > 0


class TestErrors:
    def test_empty_corpus(self):
        with pytest.raises(ValueError, match="corpus_references is empty"):
            CiderD([])

    def test_corpus_row_without_references(self):
        with pytest.raises(ValueError, match="corpus_references row 1 has no reference"):
            CiderD([["a cat"], []])

    def test_scored_row_without_references_is_named(self):
        with pytest.raises(ValueError, match="Row 1 has no reference"):
            CiderD([["a cat"]]).score(["a", "b"], [["a cat"], []])

    def test_length_mismatch(self):
        with pytest.raises(ValueError, match="2 candidates but 1 reference lists"):
            CiderD([["a cat"]]).score(["a", "b"], [["a cat"]])

    def test_non_string_reference(self):
        with pytest.raises(TypeError, match="Row 0"):
            CiderD([["a cat"]]).score(["a"], [[None]])

    def test_bad_parameters(self):
        with pytest.raises(ValueError, match="n "):
            CiderD([["a cat"]], n=0)
        with pytest.raises(ValueError, match="sigma"):
            CiderD([["a cat"]], sigma=0.0)

    def test_empty_batch(self):
        assert CiderD([["a cat"]]).score([], []) == []


class TestRewardFunction:
    CORPUS = [["A cat sits on the mat.", "A cat on a mat."], ["A dog runs."], ["Two birds fly."]]

    def test_name_plain_and_conversational_completions(self):
        reward = cider_d(self.CORPUS)
        assert isinstance(reward, CiderDReward)
        assert reward.__name__ == "cider_d"
        texts = ["A cat sits on a mat", "a dog", ""]
        references = [self.CORPUS[0], self.CORPUS[1], self.CORPUS[2]]
        plain = reward(prompts=["p"] * 3, completions=texts, references=references)
        conversational = reward(
            prompts=["p"] * 3,
            completions=[[{"role": "assistant", "content": text}] for text in texts],
            references=references,
            trainer_state=None,
            image=[None] * 3,
        )
        parts = reward(
            prompts=["p"] * 3,
            completions=[[{"role": "assistant", "content": [{"type": "text", "text": text}]}] for text in texts],
            references=references,
        )
        assert plain == conversational == parts
        assert all(isinstance(value, float) for value in plain)
        assert plain[0] > plain[1] > 0.0 and plain[2] == 0.0
        assert plain == CiderD(self.CORPUS).score(texts, references)

    def test_single_reference_string(self):
        reward = cider_d(self.CORPUS)
        assert reward([None], ["A dog runs"], references=["A dog runs."]) == reward(
            [None], ["A dog runs"], references=[["A dog runs."]]
        )

    def test_custom_reference_column(self):
        reward = cider_d(self.CORPUS, reference_column="captions")
        assert reward(["p"], ["A dog runs"], captions=[self.CORPUS[1]]) == cider_d(self.CORPUS)(
            ["p"], ["A dog runs"], references=[self.CORPUS[1]]
        )
        with pytest.raises(ValueError, match="'captions'"):
            reward(["p"], ["A dog runs"], references=[self.CORPUS[1]])
        assert "3 reference sets" in repr(reward)

    def test_missing_references_column(self):
        with pytest.raises(ValueError, match="references"):
            cider_d(self.CORPUS)(prompts=["p"], completions=["a cat"])

    def test_kwargs_reach_the_scorer(self):
        assert cider_d(self.CORPUS, n=2, sigma=3.0).scorer.n == 2

    def test_pickles(self):
        reward = cider_d(self.CORPUS)
        restored = pickle.loads(pickle.dumps(reward))
        assert restored.__name__ == "cider_d"
        arguments = dict(prompts=["p"], completions=["a cat on the mat"], references=[self.CORPUS[0]])
        assert restored(**arguments) == reward(**arguments)


def test_simple_tokenize():
    assert simple_tokenize("A man's red T-shirt,  on the\tbeach.") == "a man s red t shirt on the beach".split()


def test_speedup_benchmark_runs_and_agrees():
    pytest.importorskip("pycocoevalcap")
    from benchmarks.cider import cider_speedup

    result = cider_speedup(num_images=6, num_candidates=3, repeats=1)
    assert set(result) == {"ours_s", "pycocoevalcap_s", "speedup", "max_abs_diff"}
    assert result["max_abs_diff"] <= 1e-6


def test_candidates_sharing_no_ngram_with_their_references_score_zero():
    # With no matched n-gram in the whole call the numerator was an int array, and the division into it failed
    # (an untrained policy's first RL step: empty, punctuation-only or unrelated captions).
    scorer = CiderD([["a red circle on a gray background.", "There is a large red circle."], ["a blue square."]])
    candidates = ["", ".", "“ ”", "zebra crossing"]
    assert scorer.score(candidates, [["a red circle on a gray background."]] * 4) == [0.0] * 4
