"""Exact rewards on the shapes world (`balcaprl.world`): verifiable analogues of BalCapRL's three judges.

A caption is parsed once under the world's grammar (`balcaprl.world.parse_caption`) into distinct claims C and
unparseable clauses U; the row's ``scene`` column (a `Scene.to_dict` graph) gives the true facts F(S).

- **world_precision** P = |C ∩ F(S)| / (|C| + |U|). A clause outside the grammar cannot be checked (not pointable),
  so it counts as one false claim. Repeated claims count once (repetition is the linguistic reward's business).
  A caption with no claims scores 0.
- **world_recall** R = Σ_{f ∈ F(S)} w(f) · covered(f) / Σ_{f ∈ F(S)} w(f). F(S) has, per object, its object fact
  (colour + shape), its size and its position; every relation (one per pair and grid axis on which the two regions
  differ); and the object count. A fact is covered when the caption claims it; a relation is also covered when the
  caption states both objects' true positions (it is then implied). Weights w are per fact kind, 1 by default —
  every fact counts once; pass ``weights={"relation": 0.5, ...}`` to change them.
- **world_linguistic** L = G · N · W ∈ [0, 1], a product so that no axis buys back another:
  G (grammaticality) = parseable clauses / clauses; N (no repetition) = 1 − (repeated words + words of redundant
  clauses) / words, floored at 0, where a word is repeated when equal to the word before it ("the the") and a
  clause is redundant when it adds no claim to the clauses before it (or repeats an earlier unparseable clause
  verbatim); W (well-formed sentences) = share of sentences made of lower-case words separated by single spaces
  (a comma may follow a word), closed by one period, and whose first letter has the same case as the caption's
  first letter (capitalised sentences, or the consistent all-lower-case style of terse captions). An empty
  caption scores 0. ``rating_scale=(1, 5)`` reports it as a judge's integer rating instead (`rate_on_scale`).

None of the three ever returns ``None``: every caption is scorable. Sub-scores go to TRL's completions table
through the ``log_extra`` hook (``world_precision/claims``, ``world_precision/true``, ``world_precision/unparseable``,
``world_recall/facts``, ``world_recall/covered``, ``world_linguistic/grammatical``, ``world_linguistic/repetition``,
``world_linguistic/form``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from balcaprl.completions import completion_text
from balcaprl.world.captions import ParsedCaption, parse_caption
from balcaprl.world.scene import FACT_KINDS, Fact, Scene

__all__ = [
    "WorldLinguistic",
    "WorldPrecision",
    "WorldRecall",
    "linguistic_scores",
    "precision_score",
    "rate_on_scale",
    "recall_score",
    "score_caption",
]

_WELL_FORMED_SENTENCE = re.compile(r"[A-Za-z][a-z]*(?:,? [a-z]+)*\.")


# ---------------------------------------------------------------------------------------------------- pure scores
def precision_score(parsed: ParsedCaption, scene: Scene) -> tuple[float, int, int]:
    """(P, true claims, claims incl. unparseable) of a parsed caption against ``scene``."""
    facts = scene.facts()
    true = sum(1 for claim in parsed.claims if claim in facts)
    total = len(parsed.claims) + len(parsed.unparseable)
    return (true / total if total else 0.0), true, total


def _check_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(FACT_KINDS))
    if unknown:
        raise ValueError(f"Unknown fact kinds {unknown} in recall weights; the kinds are {list(FACT_KINDS)}.")
    if any(value < 0 for value in weights.values()):
        raise ValueError(f"Recall weights must be >= 0, got {weights}.")
    full = {kind: float(weights.get(kind, 1.0)) for kind in FACT_KINDS}
    if sum(full.values()) == 0:
        raise ValueError("At least one recall weight must be positive.")
    return full


def recall_score(
    parsed: ParsedCaption, scene: Scene, weights: Mapping[str, float] | None = None
) -> tuple[float, float, float]:
    """(R, covered weight, total weight) of a parsed caption against ``scene``'s facts (see the module docstring)."""
    weights = _check_weights(weights)
    facts = scene.facts()
    claimed = set(parsed.claims) & facts
    placed = {fact.subject for fact in claimed if fact.kind == "position"}

    def covered(fact: Fact) -> bool:
        return fact in claimed or (fact.kind == "relation" and fact.subject in placed and fact.target in placed)

    total = float(sum(weights[fact.kind] for fact in facts))
    stated = float(sum(weights[fact.kind] for fact in facts if covered(fact)))
    return (stated / total if total else 0.0), stated, total


def linguistic_scores(parsed: ParsedCaption) -> dict[str, float]:
    """G, N, W and L = G · N · W of a parsed caption, as ``grammatical``, ``repetition``, ``form``, ``linguistic``."""
    clauses = parsed.clauses
    grammatical = sum(1 for clause in clauses if clause.claims is not None) / len(clauses) if clauses else 0.0

    redundant_words, said, seen_unparseable = 0, set(), set()
    for clause in clauses:
        if clause.claims is not None:
            if clause.claims and set(clause.claims) <= said:
                redundant_words += clause.num_words
            said.update(clause.claims)
        elif clause.text:
            if clause.text in seen_unparseable:
                redundant_words += clause.num_words
            seen_unparseable.add(clause.text)
    if parsed.num_words:
        repetition = max(0.0, 1.0 - (parsed.repeated_words + redundant_words) / parsed.num_words)
    else:
        repetition = 0.0

    sentences = parsed.sentences
    if sentences:
        uppercase = sentences[0][0].isupper()
        well_formed = sum(
            1
            for sentence in sentences
            if _WELL_FORMED_SENTENCE.fullmatch(sentence) and sentence[0].isupper() == uppercase
        )
        form = well_formed / len(sentences)
    else:
        form = 0.0
    return {
        "grammatical": grammatical,
        "repetition": repetition,
        "form": form,
        "linguistic": grammatical * repetition * form,
    }


def score_caption(caption: str, scene: Scene | dict[str, Any], weights: Mapping[str, float] | None = None):
    """All three exact scores of one caption: ``{"precision": P, "recall": R, "linguistic": L, ...sub-scores}``.

    A scene of two objects has 8 facts (object, size and position of each, one relation, the count). A caption that
    states the red circle's three facts is fully precise and recalls 3 of 8; with the wrong colour none of its
    claims is true:

    >>> from balcaprl.world.scene import Scene, WorldObject
    >>> scene = Scene((WorldObject("circle", "red", "small", "left"), WorldObject("square", "blue", "large", "right")))
    >>> scores = score_caption("There is a small red circle on the left.", scene)
    >>> scores["precision"], scores["recall"], scores["facts"], scores["linguistic"]
    (1.0, 0.375, 8.0, 1.0)
    >>> score_caption("There is a small green circle on the left.", scene)["precision"]
    0.0
    """
    scene = Scene.from_dict(scene)
    parsed = parse_caption(caption)
    precision, true, claims = precision_score(parsed, scene)
    recall, covered, facts = recall_score(parsed, scene, weights)
    return {
        "precision": precision,
        "recall": recall,
        "claims": claims,
        "true_claims": true,
        "facts": facts,
        "covered": covered,
        **linguistic_scores(parsed),
    }


# ---------------------------------------------------------------------------------------------------- TRL rewards
class _WorldReward:
    """Base of the world rewards: a stable ``__name__`` and the dataset column holding the scene graphs."""

    name = ""

    def __init__(self, scene_column: str = "scene"):
        self.scene_column = scene_column
        self.__name__ = self.name

    def scenes(self, kwargs: dict[str, Any], num_completions: int) -> list[Scene]:
        """The row scenes, one per completion, from the ``scene_column`` keyword argument."""
        graphs = kwargs.get(self.scene_column)
        if graphs is None:
            present = sorted(key for key in kwargs if key not in ("trainer_state", "log_extra", "log_metric"))
            raise ValueError(
                f"The {self.name!r} reward needs the dataset column {self.scene_column!r} (scene graphs from "
                f"balcaprl.world.to_rows); the columns passed are {present}."
            )
        if len(graphs) != num_completions:
            raise ValueError(f"{self.name}: {num_completions} completions but {len(graphs)} scenes.")
        return [Scene.from_dict(graph) for graph in graphs]

    def __repr__(self) -> str:
        return f"{self.name}(scene_column={self.scene_column!r})"


class WorldPrecision(_WorldReward):
    """P = |claims true of the scene| / (|claims| + |unparseable clauses|); 0 for a caption with no claims."""

    name = "world_precision"

    def __call__(self, prompts, completions, log_extra=None, **kwargs) -> list[float]:
        scenes = self.scenes(kwargs, len(completions))
        results = [precision_score(parse_caption(completion_text(c)), s) for c, s in zip(completions, scenes)]
        if log_extra is not None:
            log_extra(f"{self.name}/claims", [total for _, _, total in results])
            log_extra(f"{self.name}/true", [true for _, true, _ in results])
            log_extra(
                f"{self.name}/unparseable", [len(parse_caption(completion_text(c)).unparseable) for c in completions]
            )
        return [score for score, _, _ in results]


class WorldRecall(_WorldReward):
    """R = weighted share of the scene's facts the caption covers (relations also via both true positions)."""

    name = "world_recall"

    def __init__(self, scene_column: str = "scene", weights: Mapping[str, float] | None = None):
        super().__init__(scene_column)
        self.weights = _check_weights(weights)

    def __call__(self, prompts, completions, log_extra=None, **kwargs) -> list[float]:
        scenes = self.scenes(kwargs, len(completions))
        results = [
            recall_score(parse_caption(completion_text(c)), s, self.weights) for c, s in zip(completions, scenes)
        ]
        if log_extra is not None:
            log_extra(f"{self.name}/facts", [total for _, _, total in results])
            log_extra(f"{self.name}/covered", [covered for _, covered, _ in results])
        return [score for score, _, _ in results]

    def __repr__(self) -> str:
        return f"{self.name}(scene_column={self.scene_column!r}, weights={self.weights})"


def rate_on_scale(value: float, scale: tuple[int, int]) -> float:
    """``value`` ∈ [0, 1] as an integer rating on ``scale`` = (low, high): low + round((high − low) · value).

    This is how an LLM judge reports linguistic quality (a Likert rating, e.g. 1–5): coarser and on another scale
    than a continuous precision. Halves round away from zero (``round`` would round half to even).
    """
    low, high = scale
    return float(low + math.floor((high - low) * value + 0.5))


class WorldLinguistic(_WorldReward):
    """L = grammaticality · (1 − repetition) · well-formedness, from the caption alone (no scene needed).

    ``rating_scale=(low, high)`` reports L the way a judge would, as an integer rating on that scale
    (`rate_on_scale`; e.g. ``(1, 5)``), to study advantage estimators on rewards of different scale and resolution
    (`balcaprl.experiments.reproduce`); the default is the continuous L.
    """

    name = "world_linguistic"

    def __init__(self, rating_scale: Sequence[int] | None = None):
        super().__init__(scene_column="")
        if rating_scale is not None:
            if len(rating_scale) != 2 or not all(float(v).is_integer() for v in rating_scale):
                raise ValueError(f"rating_scale must be two integers (low, high), got {rating_scale!r}.")
            if rating_scale[0] >= rating_scale[1]:
                raise ValueError(f"rating_scale must have low < high, got {rating_scale!r}.")
            rating_scale = (int(rating_scale[0]), int(rating_scale[1]))
        self.rating_scale = rating_scale

    def __repr__(self) -> str:
        return f"{self.name}(rating_scale={self.rating_scale})" if self.rating_scale else f"{self.name}()"

    def __call__(self, prompts, completions, log_extra=None, **kwargs) -> list[float]:
        scores = [linguistic_scores(parse_caption(completion_text(c))) for c in completions]
        if log_extra is not None:
            for part in ("grammatical", "repetition", "form"):
                log_extra(f"{self.name}/{part}", [score[part] for score in scores])
        if self.rating_scale is not None:
            return [rate_on_scale(score["linguistic"], self.rating_scale) for score in scores]
        return [score["linguistic"] for score in scores]


# The three exact rewards in BalCapRL's order (precision, recall, linguistic), as recipes and the demo name them.
WORLD_REWARDS = (WorldPrecision.name, WorldRecall.name, WorldLinguistic.name)
