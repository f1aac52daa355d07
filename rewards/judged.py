"""BalCapRL's judge-based rewards (arXiv 2605.07394): precision, recall, linguistic quality.

Each is an ``async`` TRL reward function backed by a `balcaprl.judge.JudgeClient` (any OpenAI-compatible server).
Prompts live in ``prompts/<name>_v<N>.txt`` beside this file, with the JSON answer format in the prompt; the
answers are validated against the JSON schemas below. A judge call that fails after its retries makes that
caption's reward ``None`` (unscorable), never 0.

- **precision** P = #(verified ∧ pointable) / #assertions. An MLLM judge that sees the image splits the caption
  into atomic assertions and labels each. A caption with no assertions (e.g. empty) scores 0.
- **recall** R = #covered / #units. Each reference is split into units once per run (kept in memory, and on disk
  by the judge's cache); an LLM judge then marks each unit covered or not by the caption, all of a row's references
  in one request (units numbered and grouped by reference, one boolean per unit). With several references, R is the
  mean over the references of their covered fraction.
- **linguistic** L = (mean(clarity, fluency, coherence) − 1) / 4 ∈ [0, 1], from 1–5 ratings by an LLM judge.
  An empty caption scores 0 without a call.

Requests. Identical captions of a batch (and rows of the same image) share one request; each distinct image is
encoded once per batch (`balcaprl.judge.JudgeClient.image_part`). Per GRPO step of N captions over R distinct
references: precision N requests, linguistic N, recall N + R (R only the first time a reference is seen in a run).

Prompt versions. A reward's ``prompt_version`` names a set of prompt files (`PROMPT_SETS`); a file gets a new
``_v<N>`` only when its wording changes, and old files stay, so a run can be repeated with the prompts it used:

- ``v1``: the original prompts; recall asks one verification request per caption *per reference*.
- ``v2`` (default): ``recall_verify_v2`` verifies all of a row's references in one request (facts numbered
  1..total, grouped under "From reference k:"), which turns COCO's 5 requests per caption into 1. The other prompts
  are v1's, unchanged, and keep their cache entries.

Sub-scores go to TRL's completions table through the ``log_extra`` hook (``precision/assertions``,
``precision/passing``, ``recall/units``, ``recall/covered``, ``linguistic/clarity`` …).
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any

from balcaprl.completions import completion_text
from balcaprl.judge.client import JudgeClient

PROMPT_SETS: dict[str, dict[str, str]] = {
    "v1": {"precision": "v1", "recall_decompose": "v1", "recall_verify": "v1", "linguistic": "v1"},
    "v2": {"precision": "v1", "recall_decompose": "v1", "recall_verify": "v2", "linguistic": "v1"},
}
PROMPT_VERSION = "v2"

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
HEALTH_CHECK_CAPTION = "A photograph of a scene."  # the caption the precision and linguistic health checks send


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
def load_prompt(name: str, version: str = "v1") -> str:
    """The prompt template ``prompts/<name>_<version>.txt`` shipped in ``balcaprl.rewards``."""
    path = resources.files("balcaprl.rewards").joinpath("prompts", f"{name}_{version}.txt")
    if not path.is_file():
        raise FileNotFoundError(f"No prompt {name!r} version {version!r} in balcaprl.rewards/prompts ({path}).")
    return path.read_text(encoding="utf-8")


def _column(kwargs: Mapping[str, Any], name: str, reward: str) -> list:
    if kwargs.get(name) is None:
        present = sorted(key for key in kwargs if key not in ("trainer_state", "log_extra", "log_metric"))
        raise ValueError(f"The {reward!r} reward needs the dataset column {name!r}; the columns passed are {present}.")
    return kwargs[name]


def _references_of(row_references: str | Sequence[str]) -> list[str]:
    return [row_references] if isinstance(row_references, str) else list(row_references)


async def _scored_once(keys: Sequence[Hashable], score) -> list:
    """``score(index)`` awaited once per distinct key (the first index holding it); results in the order of ``keys``.

    Identical captions of a batch (e.g. SCST's greedy caption, repeated over its group, or a collapsed group) then
    cost one judge call, not one per copy, and the ``judge/*`` counters count calls actually made.
    """
    first_index: dict[Hashable, int] = {}
    for index, key in enumerate(keys):
        first_index.setdefault(key, index)
    results = await asyncio.gather(*(score(index) for index in first_index.values()))
    by_key = dict(zip(first_index, results))
    return [by_key[key] for key in keys]


class _JudgeReward:
    """Base of the judge rewards: a judge client, a stable ``__name__`` and the prompt set (`PROMPT_SETS`)."""

    name = ""

    def __init__(self, judge: JudgeClient, prompt_version: str = PROMPT_VERSION):
        if prompt_version not in PROMPT_SETS:
            raise ValueError(
                f"Unknown prompt_version {prompt_version!r} for the {self.name!r} reward; the prompt sets are "
                f"{sorted(PROMPT_SETS)}."
            )
        self.judge = judge
        self.prompt_version = prompt_version
        self.prompt_files = PROMPT_SETS[prompt_version]
        self.__name__ = self.name

    def __repr__(self) -> str:
        return f"{self.name}(judge={self.judge!r}, prompt_version={self.prompt_version!r})"

    def _prompt(self, name: str) -> str:
        return load_prompt(name, self.prompt_files[name])

    def _cache_key_extra(self, name: str) -> str:
        # The prompt FILE's version, not the set's: prompts unchanged between sets keep their cached answers.
        return f"{name}_{self.prompt_files[name]}"

    async def health_check(self, row: Mapping[str, Any]) -> str | None:
        """One real judge request built like this reward's own from a dataset ``row``: None if a schema-valid answer
        came back, else the fault (one line). Never served from the answer cache."""
        raise NotImplementedError


class PrecisionReward(_JudgeReward):
    """P = #(verified ∧ pointable) / #assertions, judged by an MLLM that sees the image (dataset column ``image``)."""

    name = "precision"

    def __init__(self, judge: JudgeClient, image_column: str = "image", prompt_version: str = PROMPT_VERSION):
        super().__init__(judge, prompt_version)
        self.image_column = image_column
        self.template = self._prompt("precision")

    def _messages(self, caption: str, image_part: dict[str, Any]) -> list[dict[str, Any]]:
        text = {"type": "text", "text": self.template.format(caption=caption)}
        return [{"role": "user", "content": [image_part, text]}]

    async def score(self, caption: str, image: Any) -> tuple[float | None, int | None, int | None]:
        """(P, passing assertions, assertions) of one caption; (None, None, None) if the judge failed."""
        if not caption.strip():
            return 0.0, 0, 0
        return await self._score_with_part(caption, await self.judge.image_part(image))

    async def _score_with_part(
        self, caption: str, image_part: dict[str, Any]
    ) -> tuple[float | None, int | None, int | None]:
        if not caption.strip():
            return 0.0, 0, 0
        answer = await self.judge.complete_json(
            self._messages(caption, image_part), PRECISION_SCHEMA, cache_key_extra=self._cache_key_extra("precision")
        )
        if answer is None:
            return None, None, None
        assertions = answer["assertions"]
        passing = sum(1 for item in assertions if item["verified"] and item["pointable"])
        return (passing / len(assertions) if assertions else 0.0), passing, len(assertions)

    async def __call__(self, prompts, completions, log_extra=None, **kwargs) -> list[float | None]:
        images = _column(kwargs, self.image_column, self.name)
        # One encoding per image object here, one per distinct content inside the client (the G rows of a prompt
        # carry separately decoded copies of one image).
        distinct_images = {id(image): image for image in images}
        encoded = await asyncio.gather(*(self.judge.image_part(image) for image in distinct_images.values()))
        part_of = dict(zip(distinct_images, encoded))
        parts = [part_of[id(image)] for image in images]
        captions = [completion_text(c) for c in completions]
        if len(captions) != len(parts):
            raise ValueError(f"{len(captions)} completions but {len(parts)} images.")
        results = await _scored_once(
            [(caption, part["image_url"]["url"]) for caption, part in zip(captions, parts)],
            lambda index: self._score_with_part(captions[index], parts[index]),
        )
        if log_extra is not None:
            log_extra("precision/assertions", [total for _, _, total in results])
            log_extra("precision/passing", [passing for _, passing, _ in results])
        return [score for score, _, _ in results]

    async def health_check(self, row: Mapping[str, Any]) -> str | None:
        image = row.get(self.image_column)
        if image is None:
            return f"the dataset rows have no {self.image_column!r} column for the precision judge to see"
        messages = self._messages(HEALTH_CHECK_CAPTION, await self.judge.image_part(image))
        return await self.judge.check(messages, PRECISION_SCHEMA)


class RecallReward(_JudgeReward):
    """R = #covered reference units / #units (mean over a row's references), judged by a text LLM."""

    name = "recall"

    def __init__(self, judge: JudgeClient, reference_column: str = "references", prompt_version: str = PROMPT_VERSION):
        super().__init__(judge, prompt_version)
        self.reference_column = reference_column
        self.decompose_template = self._prompt("recall_decompose")
        self.verify_template = self._prompt("recall_verify")
        # One request for all of a row's references (v2 prompt), or one per reference (v1).
        self.grouped = self.prompt_files["recall_verify"] != "v1"
        # References are fixed: each is decomposed once per run (successful answers only, so failures are retried).
        self.units_by_reference: dict[str, list[str]] = {}

    def _decompose_messages(self, reference: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": self.decompose_template.format(reference=reference)}]

    async def units(self, reference: str) -> list[str] | None:
        """The reference's units, from memory or one judge call; None if the judge failed."""
        if reference in self.units_by_reference:
            return self.units_by_reference[reference]
        answer = await self.judge.complete_json(
            self._decompose_messages(reference),
            RECALL_UNITS_SCHEMA,
            cache_key_extra=self._cache_key_extra("recall_decompose"),
        )
        if answer is None:
            return None
        self.units_by_reference[reference] = answer["units"]
        return answer["units"]

    def _numbered(self, groups: Sequence[Sequence[str]]) -> str:
        """Units numbered 1..total; with several groups (v2), each under a "From reference k:" line."""
        lines, number = [], 0
        for group_index, group in enumerate(groups, start=1):
            if len(groups) > 1:
                lines.append(f"From reference {group_index}:")
            for unit in group:
                number += 1
                lines.append(f"{number}. {unit}")
        return "\n".join(lines)

    async def _verify(self, caption: str, groups: Sequence[Sequence[str]]) -> list[bool] | None:
        """One request: a boolean per unit of ``groups``, in order; None if the judge failed."""
        count = sum(len(group) for group in groups)
        prompt = self.verify_template.format(caption=caption, units=self._numbered(groups), count=count)
        answer = await self.judge.complete_json(
            [{"role": "user", "content": prompt}],
            recall_verify_schema(count),
            cache_key_extra=self._cache_key_extra("recall_verify"),
        )
        return None if answer is None else answer["covered"]

    async def covered_per_group(self, caption: str, groups: Sequence[Sequence[str]]) -> list[int] | None:
        """How many units of each non-empty group the caption covers: one request for all groups with the v2 prompt,
        one per group with v1; None if the judge failed."""
        if not caption.strip():
            return [0] * len(groups)
        if not self.grouped:
            flags = await asyncio.gather(*(self._verify(caption, [group]) for group in groups))
            return None if any(f is None for f in flags) else [sum(f) for f in flags]
        flags = await self._verify(caption, groups)
        if flags is None:
            return None
        counts, start = [], 0
        for group in groups:
            counts.append(sum(flags[start : start + len(group)]))
            start += len(group)
        return counts

    async def covered(self, caption: str, units: list[str]) -> int | None:
        """How many ``units`` the caption covers; None if the judge failed."""
        counts = await self.covered_per_group(caption, [units])
        return None if counts is None else counts[0]

    async def score(
        self, caption: str, references: list[str], units_by_reference: dict[str, list[str] | None]
    ) -> tuple[float | None, int | None, int | None]:
        """(R, covered units, units) of one caption over its references; None if any judge call failed."""
        groups = []
        for reference in references:
            units = units_by_reference[reference]
            if units is None:
                return None, None, None
            if units:  # a reference with no checkable content says nothing about recall
                groups.append(units)
        if not groups:
            return None, None, None
        counts = await self.covered_per_group(caption, groups)
        if counts is None:
            return None, None, None
        fractions = [covered / len(group) for covered, group in zip(counts, groups)]
        return sum(fractions) / len(fractions), sum(counts), sum(len(group) for group in groups)

    async def __call__(self, prompts, completions, log_extra=None, **kwargs) -> list[float | None]:
        references = [_references_of(row) for row in _column(kwargs, self.reference_column, self.name)]
        # Decompose each distinct reference once per batch (and once per run when it succeeds), before the G
        # rollouts of a prompt need it; a failed decomposition makes its rows unscorable for this batch only.
        distinct = sorted({reference for row in references for reference in row})
        units = dict(zip(distinct, await asyncio.gather(*(self.units(reference) for reference in distinct))))
        captions = [completion_text(c) for c in completions]
        if len(captions) != len(references):
            raise ValueError(f"{len(captions)} completions but {len(references)} rows of references.")
        results = await _scored_once(
            [(caption, tuple(row)) for caption, row in zip(captions, references)],
            lambda index: self.score(captions[index], references[index], units),
        )
        if log_extra is not None:
            log_extra("recall/units", [count for _, _, count in results])
            log_extra("recall/covered", [covered for _, covered, _ in results])
        return [score for score, _, _ in results]

    async def health_check(self, row: Mapping[str, Any]) -> str | None:
        references = _references_of(row.get(self.reference_column) or [])
        if not references:
            return f"the dataset rows have no {self.reference_column!r} column for the recall judge"
        return await self.judge.check(self._decompose_messages(references[0]), RECALL_UNITS_SCHEMA)


class LinguisticReward(_JudgeReward):
    """L = (mean(clarity, fluency, coherence) − 1) / 4 from 1–5 ratings by a text LLM."""

    name = "linguistic"
    aspects = ("clarity", "fluency", "coherence")

    def __init__(self, judge: JudgeClient, prompt_version: str = PROMPT_VERSION):
        super().__init__(judge, prompt_version)
        self.template = self._prompt("linguistic")

    def _messages(self, caption: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": self.template.format(caption=caption)}]

    async def score(self, caption: str) -> dict[str, int] | None:
        """The three 1–5 ratings of one caption (1s for an empty caption); None if the judge failed."""
        if not caption.strip():
            return dict.fromkeys(self.aspects, 1)
        answer = await self.judge.complete_json(
            self._messages(caption), LINGUISTIC_SCHEMA, cache_key_extra=self._cache_key_extra("linguistic")
        )
        return None if answer is None else {aspect: answer[aspect] for aspect in self.aspects}

    async def __call__(self, prompts, completions, log_extra=None, **kwargs) -> list[float | None]:
        captions = [completion_text(c) for c in completions]
        ratings = await _scored_once(captions, lambda index: self.score(captions[index]))
        if log_extra is not None:
            for aspect in self.aspects:
                log_extra(f"linguistic/{aspect}", [None if r is None else r[aspect] for r in ratings])
        return [None if r is None else (sum(r.values()) / len(r) - 1) / 4 for r in ratings]

    async def health_check(self, row: Mapping[str, Any]) -> str | None:
        return await self.judge.check(self._messages(HEALTH_CHECK_CAPTION), LINGUISTIC_SCHEMA)
