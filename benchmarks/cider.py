"""Speed of `balcaprl.rewards.CiderD` against pycocoevalcap's CiderScorer on GRPO-shaped input.

``python -m benchmarks cider`` prints the result. pycocoevalcap is a dev-only dependency (``pip install
pycocoevalcap``). Both scorers get identical pre-tokenised captions; ours is timed with its document frequencies
built beforehand (they are fixed once per training run), pycocoevalcap with the batch's, as it always does.
"""

from __future__ import annotations

import random
import statistics
import time

from balcaprl.rewards.cider import CiderD

_VOCABULARY = (
    "a an the man woman child dog cat horse bird car bus train plane boat table plate pizza cake bowl street field "
    "beach water snow grass tree kitchen room bed couch sitting standing riding eating holding walking flying "
    "parked on in with next to of near under two three red blue white black green small large young old"
).split()


def _synthetic_batch(
    num_images: int, num_candidates: int, num_references: int, rng: random.Random
) -> tuple[list[list[str]], list[list[str]]]:
    """References (num_images × num_references) and candidates (num_images × num_candidates), pre-tokenised.

    Candidates are references with a third of their words resampled, so they overlap the way sampled captions do.
    """

    def caption() -> list[str]:
        return [rng.choice(_VOCABULARY) for _ in range(rng.randint(7, 14))]

    references, candidates = [], []
    for _ in range(num_images):
        image_references = [caption() for _ in range(num_references)]
        image_candidates = []
        for _ in range(num_candidates):
            words = list(rng.choice(image_references))
            for position in rng.sample(range(len(words)), len(words) // 3):
                words[position] = rng.choice(_VOCABULARY)
            image_candidates.append(" ".join(words))
        references.append([" ".join(words) for words in image_references])
        candidates.append(image_candidates)
    return references, candidates


def cider_speedup(num_images: int = 64, num_candidates: int = 8, repeats: int = 5, seed: int = 0) -> dict[str, float]:
    """Median seconds of ours vs pycocoevalcap on num_images × num_candidates captions with 5 references each.

    pycocoevalcap is run once per candidate index j (images × their j-th candidate), so that each run sees exactly the
    num_images reference sets ours takes its document frequencies from; feeding it all G candidates of an image as G
    entries would repeat the reference set G times and change the idf of n-grams absent from every reference.
    Timings are interleaved (ours, theirs, ours, ...) so drifting machine load hits both alike.

    Returns ``{"ours_s", "pycocoevalcap_s", "speedup", "max_abs_diff"}``; raises `RuntimeError` if the scores
    differ by more than 1e-6.
    """
    try:
        from pycocoevalcap.cider.cider_scorer import CiderScorer
    except ImportError as error:
        raise ImportError(
            "cider_speedup compares against pycocoevalcap, a dev-only dependency: `pip install pycocoevalcap`."
        ) from error

    references, candidates = _synthetic_batch(num_images, num_candidates, 5, random.Random(seed))
    flat_candidates = [candidate for image_candidates in candidates for candidate in image_candidates]
    flat_references = [image_references for image_references in references for _ in range(num_candidates)]
    scorer = CiderD(references, tokenize=str.split)

    def ours() -> list[float]:
        return scorer.score(flat_candidates, flat_references)

    def theirs() -> list[float]:
        scores = [[0.0] * num_candidates for _ in range(num_images)]
        for candidate_index in range(num_candidates):
            reference_scorer = CiderScorer(n=4, sigma=6.0)
            for image_references, image_candidates in zip(references, candidates):
                reference_scorer += (image_candidates[candidate_index], image_references)
            _, image_scores = reference_scorer.compute_score()
            for image, image_score in enumerate(image_scores):
                scores[image][candidate_index] = float(image_score)
        return [score for image_scores in scores for score in image_scores]

    ours(), theirs()  # warm-up: first-call costs (lazy imports, allocator) are not what we compare
    ours_times, their_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        our_scores = ours()
        ours_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        their_scores = theirs()
        their_times.append(time.perf_counter() - start)

    max_abs_diff = max(abs(a - b) for a, b in zip(our_scores, their_scores))
    if max_abs_diff > 1e-6:
        raise RuntimeError(f"CiderD and pycocoevalcap disagree by up to {max_abs_diff:.3g} on the benchmark batch.")
    ours_s, pycocoevalcap_s = statistics.median(ours_times), statistics.median(their_times)
    return {
        "ours_s": ours_s,
        "pycocoevalcap_s": pycocoevalcap_s,
        "speedup": pycocoevalcap_s / ours_s,
        "max_abs_diff": max_abs_diff,
    }
