"""BalCapRL's judge-based rewards (arXiv 2605.07394): precision, recall, linguistic quality.

Each is an ``async`` TRL reward function backed by a `balcaprl.judge.JudgeClient` (any OpenAI-compatible server).
Prompts live in ``prompts/<name>_v<N>.txt`` beside this file, with the JSON answer format in the prompt; the
answers are validated against the JSON schemas below. A judge call that fails after its retries makes that
caption's reward ``None`` (unscorable), never 0.

- **precision** P = #(verified ∧ pointable) / #assertions. An MLLM judge that sees the image splits the caption
  into atomic assertions and labels each. A caption with no assertions (e.g. empty) scores 0.
- **recall** R = #covered / #units. Each reference is split into units once per run (kept in memory, and on disk
  by the judge's cache); an LLM judge then marks each unit covered or not by the caption. With several
  references, R is the mean over the references.
- **linguistic** L = (mean(clarity, fluency, coherence) − 1) / 4 ∈ [0, 1], from 1–5 ratings by an LLM judge.
  An empty caption scores 0 without a call.

Sub-scores go to TRL's completions table through the ``log_extra`` hook (``precision/assertions``,
``precision/passing``, ``recall/units``, ``recall/covered``, ``linguistic/clarity`` …).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

from balcaprl.completions import completion_text
from balcaprl.judge import JudgeClient, image_message_part

PROMPT_VERSION = "v1"

PRECISION_SCHEMA = {
    "type": "object",
    "properties": {
        "assertions": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "text": {"type": "string"},
                    "verified": {"type": "boolean"},
                    "pointable": {"type": "boolean"},
                },
                "required": ["text", "verified", "pointable"],
            },
        }
    },
    "required": ["assertions"],
}
RECALL_UNITS_SCHEMA = {
    "type": "object",
    "properties": {"units": {"type": "array", "items": {"type": "string", "minLength": 1}}},
    "required": ["units"],
}
LINGUISTIC_SCHEMA = {
    "type": "object",
    "properties": {
        name: {"type": "integer", "minimum": 1, "maximum": 5} for name in ("clarity", "fluency", "coherence")
    },
    "required": ["clarity", "fluency", "coherence"],
}


def recall_verify_schema(num_units: int) -> dict[str, Any]:
    """Schema of the coverage answer: exactly one boolean per reference unit."""
    return {
        "type": "object",
        "properties": {
            "covered": {"type": "array", "items": {"type": "boolean"}, "minItems": num_units, "maxItems": num_units}
        },
        "required": ["covered"],
    }


@cache
def load_prompt(name: str, version: str = PROMPT_VERSION) -> str:
    """The prompt template ``prompts/<name>_<version>.txt`` shipped in ``balcaprl.rewards``."""
    path = resources.files("balcaprl.rewards").joinpath("prompts", f"{name}_{version}.txt")
    if not path.is_file():
        raise FileNotFoundError(f"No prompt {name!r} version {version!r} in balcaprl.rewards/prompts ({path}).")
    return path.read_text(encoding="utf-8")


def _column(kwargs: dict[str, Any], name: str, reward: str) -> list:
    if kwargs.get(name) is None:
        present = sorted(key for key in kwargs if key not in ("trainer_state", "log_extra", "log_metric"))
        raise ValueError(f"The {reward!r} reward needs the dataset column {name!r}; the columns passed are {present}.")
    return kwargs[name]


def _references_of(row_references: str | Sequence[str]) -> list[str]:
    return [row_references] if isinstance(row_references, str) else list(row_references)


class _JudgeReward:
    """Base of the judge rewards: a judge client, a stable ``__name__`` and the prompt version."""

    name = ""

    def __init__(self, judge: JudgeClient, prompt_version: str = PROMPT_VERSION):
        self.judge = judge
        self.prompt_version = prompt_version
        self.__name__ = self.name

    def __repr__(self) -> str:
        return f"{self.name}(judge={self.judge!r}, prompt_version={self.prompt_version!r})"


class PrecisionReward(_JudgeReward):
    """P = #(verified ∧ pointable) / #assertions, judged by an MLLM that sees the image (dataset column ``image``)."""

    name = "precision"

    def __init__(self, judge: JudgeClient, image_column: str = "image", prompt_version: str = PROMPT_VERSION):
        super().__init__(judge, prompt_version)
        self.image_column = image_column
        self.template = load_prompt("precision", prompt_version)

    async def score(self, caption: str, image: Any) -> tuple[float | None, int | None, int | None]:
        """(P, passing assertions, assertions) of one caption; (None, None, None) if the judge failed."""
        if not caption.strip():
            return 0.0, 0, 0
        messages = [
            {
                "role": "user",
                "content": [
                    image_message_part(image),
                    {"type": "text", "text": self.template.format(caption=caption)},
                ],
            }
        ]
        answer = await self.judge.complete_json(
            messages, PRECISION_SCHEMA, cache_key_extra=f"precision_{self.prompt_version}"
        )
        if answer is None:
            return None, None, None
        assertions = answer["assertions"]
        passing = sum(1 for item in assertions if item["verified"] and item["pointable"])
        return (passing / len(assertions) if assertions else 0.0), passing, len(assertions)

    async def __call__(self, prompts, completions, log_extra=None, **kwargs) -> list[float | None]:
        images = _column(kwargs, self.image_column, self.name)
        results = await asyncio.gather(
            *(self.score(completion_text(c), image) for c, image in zip(completions, images, strict=True))
        )
        if log_extra is not None:
            log_extra("precision/assertions", [total for _, _, total in results])
            log_extra("precision/passing", [passing for _, passing, _ in results])
        return [score for score, _, _ in results]


class RecallReward(_JudgeReward):
    """R = #covered reference units / #units (mean over a row's references), judged by a text LLM."""

    name = "recall"

    def __init__(self, judge: JudgeClient, reference_column: str = "references", prompt_version: str = PROMPT_VERSION):
        super().__init__(judge, prompt_version)
        self.reference_column = reference_column
        self.decompose_template = load_prompt("recall_decompose", prompt_version)
        self.verify_template = load_prompt("recall_verify", prompt_version)
        # References are fixed: each is decomposed once per run (successful answers only, so failures are retried).
        self.units_by_reference: dict[str, list[str]] = {}

    async def units(self, reference: str) -> list[str] | None:
        """The reference's units, from memory or one judge call; None if the judge failed."""
        if reference in self.units_by_reference:
            return self.units_by_reference[reference]
        messages = [{"role": "user", "content": self.decompose_template.format(reference=reference)}]
        answer = await self.judge.complete_json(
            messages, RECALL_UNITS_SCHEMA, cache_key_extra=f"recall_decompose_{self.prompt_version}"
        )
        if answer is None:
            return None
        self.units_by_reference[reference] = answer["units"]
        return answer["units"]

    async def covered(self, caption: str, units: list[str]) -> int | None:
        """How many ``units`` the caption covers; None if the judge failed."""
        if not caption.strip():
            return 0
        numbered = "\n".join(f"{index}. {unit}" for index, unit in enumerate(units, start=1))
        prompt = self.verify_template.format(caption=caption, units=numbered, count=len(units))
        answer = await self.judge.complete_json(
            [{"role": "user", "content": prompt}],
            recall_verify_schema(len(units)),
            cache_key_extra=f"recall_verify_{self.prompt_version}",
        )
        return None if answer is None else sum(answer["covered"])

    async def score(
        self, caption: str, references: list[str], units_by_reference: dict[str, list[str] | None]
    ) -> tuple[float | None, int | None, int | None]:
        """(R, covered units, units) of one caption over its references; None if any judge call failed."""
        fractions, covered_total, unit_total = [], 0, 0
        for reference in references:
            units = units_by_reference[reference]
            if units is None:
                return None, None, None
            if not units:  # a reference with no checkable content says nothing about recall
                continue
            covered = await self.covered(caption, units)
            if covered is None:
                return None, None, None
            fractions.append(covered / len(units))
            covered_total, unit_total = covered_total + covered, unit_total + len(units)
        if not fractions:
            return None, None, None
        return sum(fractions) / len(fractions), covered_total, unit_total

    async def __call__(self, prompts, completions, log_extra=None, **kwargs) -> list[float | None]:
        references = [_references_of(row) for row in _column(kwargs, self.reference_column, self.name)]
        # Decompose each distinct reference once per batch (and once per run when it succeeds), before the G
        # rollouts of a prompt need it; a failed decomposition makes its rows unscorable for this batch only.
        distinct = sorted({reference for row in references for reference in row})
        units = dict(zip(distinct, await asyncio.gather(*(self.units(reference) for reference in distinct))))
        results = await asyncio.gather(
            *(self.score(completion_text(c), row, units) for c, row in zip(completions, references, strict=True))
        )
        if log_extra is not None:
            log_extra("recall/units", [count for _, _, count in results])
            log_extra("recall/covered", [covered for _, covered, _ in results])
        return [score for score, _, _ in results]


class LinguisticReward(_JudgeReward):
    """L = (mean(clarity, fluency, coherence) − 1) / 4 from 1–5 ratings by a text LLM."""

    name = "linguistic"
    aspects = ("clarity", "fluency", "coherence")

    def __init__(self, judge: JudgeClient, prompt_version: str = PROMPT_VERSION):
        super().__init__(judge, prompt_version)
        self.template = load_prompt("linguistic", prompt_version)

    async def score(self, caption: str) -> dict[str, int] | None:
        """The three 1–5 ratings of one caption (1s for an empty caption); None if the judge failed."""
        if not caption.strip():
            return dict.fromkeys(self.aspects, 1)
        messages = [{"role": "user", "content": self.template.format(caption=caption)}]
        answer = await self.judge.complete_json(
            messages, LINGUISTIC_SCHEMA, cache_key_extra=f"linguistic_{self.prompt_version}"
        )
        return None if answer is None else {aspect: answer[aspect] for aspect in self.aspects}

    async def __call__(self, prompts, completions, log_extra=None, **kwargs) -> list[float | None]:
        ratings = await asyncio.gather(*(self.score(completion_text(c)) for c in completions))
        if log_extra is not None:
            for aspect in self.aspects:
                log_extra(f"linguistic/{aspect}", [None if r is None else r[aspect] for r in ratings])
        return [None if r is None else (sum(r.values()) / len(r) - 1) / 4 for r in ratings]
