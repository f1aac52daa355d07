"""BalCapRL's own metrics: mean precision P, recall R, linguistic L and b-CapScore = H(P̄, R̄, L̄).

Scored by the training rewards of `balcaprl.rewards.judged` (the same objects and prompts as in training), or by any
three TRL reward functions in their place (e.g. the synthetic world's exact rewards). The length mask is NOT applied:
it is a training device.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from balcaprl.evaluate.records import CaptionRecord, as_records, non_empty_references
from balcaprl.judge.client import JudgeClient

__all__ = ["balcap_section", "harmonic_mean"]


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """n / Σ 1/v — 0 if any value is 0 (its limit), None if any value is None or the list is empty."""
    if not values or any(value is None for value in values):
        return None
    if any(value < 0 for value in values):
        raise ValueError(f"The harmonic mean is defined here for values >= 0, got {list(values)}.")
    if any(value == 0 for value in values):
        return 0.0
    return len(values) / sum(1.0 / value for value in values)


def mean_of_scored(values: Sequence[float | None]) -> dict[str, Any]:
    scored = [value for value in values if value is not None]
    return {
        "mean": sum(scored) / len(scored) if scored else None,
        "scored": len(scored),
        "unscorable": len(values) - len(scored),
    }


async def call_reward(
    function: Callable, records: Sequence[CaptionRecord], rows: Sequence[int]
) -> tuple[list[float | None], dict[str, dict[int, Any]]]:
    """Scores of ``records[rows]`` by a TRL reward function (sync or async), as a list over every record (None
    elsewhere), and what it logged through ``log_extra`` (column → {record index: value}).

    The function gets TRL's arguments: ``prompts``, ``completions`` (the captions), ``log_extra``, and the columns
    ``image``, ``references`` (the non-empty ones) and every extra column of the records, one entry per caption.
    """
    scores: list[float | None] = [None] * len(records)
    logged: dict[str, dict[int, Any]] = {}
    if not rows:
        return scores, logged
    chosen = [records[index] for index in rows]
    columns: dict[str, list] = {
        "image": [record.image for record in chosen],
        "references": [non_empty_references(record) for record in chosen],
    }
    for column in dict.fromkeys(key for record in chosen for key in record.extra):
        columns[column] = [record.extra.get(column) for record in chosen]

    def log_extra(column: str, values: Sequence[Any]) -> None:
        logged[column] = dict(zip(rows, values))

    captions = [record.caption for record in chosen]
    found = function(prompts=[None] * len(rows), completions=captions, log_extra=log_extra, **columns)
    if inspect.isawaitable(found):
        found = await found
    found = list(found)
    if len(found) != len(rows):
        name = reward_name(function)
        raise ValueError(f"The reward {name!r} returned {len(found)} scores for {len(rows)} captions.")
    for index, score in zip(rows, found):
        value = None if score is None else float(score)
        scores[index] = None if value is None or math.isnan(value) else value
    return scores, logged


def reward_name(function: Any) -> str:
    return getattr(function, "__name__", type(function).__name__)


async def balcap_section(
    records: Sequence[Mapping[str, Any]],
    judge: JudgeClient | None = None,
    recall: Any = None,
    *,
    rewards: Sequence[Callable] | None = None,
) -> dict[str, Any]:
    """Mean precision P, recall R, linguistic L and b-CapScore, scored by the training rewards.

    By default the judge rewards (`PrecisionReward`, `RecallReward`, `LinguisticReward` on ``judge``); precision
    needs the image, so records without one are not scored for it (``precision.no_image``). ``recall`` lets another
    section share the recall reward object (and its decomposed references).

    ``rewards=(precision, recall, linguistic)`` puts any three TRL reward functions in the judges' place — e.g. the
    exact rewards of the synthetic world, ``(WorldPrecision(), WorldRecall(), WorldLinguistic())``, which read each
    record's ``scene`` column. Each is called once on every record with the columns ``image``, ``references`` and
    the records' extra columns as keyword arguments; no judge is needed. ``scorers`` in the section names them.

    b-CapScore = H(P̄, R̄, L̄) over the scored captions of each metric (harmonic mean; 0 if any mean is 0; None if a
    metric scored nothing, e.g. precision when no record has an image). Per caption, ``b_capscore`` is H(P, R, L) of
    that caption, and the sub-scores the rewards log (``precision/assertions``, ``world_recall/covered``, ...) are
    kept.
    """
    records = as_records(records)
    everything = list(range(len(records)))
    if rewards is None:
        from balcaprl.rewards.judged import LinguisticReward, PrecisionReward, RecallReward

        if judge is None:
            raise ValueError("balcap_section needs a judge, or rewards=(precision, recall, linguistic) functions.")
        functions = [PrecisionReward(judge), recall if recall is not None else RecallReward(judge)]
        functions.append(LinguisticReward(judge))
        precision_rows = [index for index, record in enumerate(records) if record.image is not None]
    else:
        functions = list(rewards)
        if len(functions) != 3 or not all(callable(function) for function in functions):
            raise ValueError(f"rewards must be three reward functions (precision, recall, linguistic): {rewards!r}.")
        precision_rows = everything
    outcomes = await asyncio.gather(
        call_reward(functions[0], records, precision_rows),
        call_reward(functions[1], records, everything),
        call_reward(functions[2], records, everything),
    )
    (precision_values, _), (recall_values, _), (linguistic_values, _) = outcomes
    precision_summary = mean_of_scored([precision_values[index] for index in precision_rows])
    if rewards is None:
        precision_summary["no_image"] = len(records) - len(precision_rows)
    section = {
        "precision": precision_summary,
        "recall": mean_of_scored(recall_values),
        "linguistic": mean_of_scored(linguistic_values),
    }
    means = [section[name]["mean"] for name in ("precision", "recall", "linguistic")]
    section["b_capscore"] = harmonic_mean(means)
    section["scorers"] = dict(zip(("precision", "recall", "linguistic"), map(reward_name, functions)))
    section["prompt_version"] = getattr(functions[0], "prompt_version", None)
    per_caption: dict[str, dict[str, Any]] = {}
    for index, record in enumerate(records):
        values = [precision_values[index], recall_values[index], linguistic_values[index]]
        per_caption[record.id] = dict(
            precision=values[0], recall=values[1], linguistic=values[2], b_capscore=harmonic_mean(values)
        )
    for _, logged in outcomes:
        for column, values in logged.items():
            for index, value in values.items():
                per_caption[records[index].id][column] = value
    section["per_caption"] = per_caption
    return section


def balcap_notes(section: Mapping[str, Any]) -> list[str]:
    """What a reader of the balcap numbers must know: captions left out of a mean, and why. A metric that scored no
    caption at all is `balcaprl.evaluate.checks.unscored_notes`'s (with the judge's failure counts and fault)."""
    notes = []
    no_image = section["precision"].get("no_image", 0)
    if no_image:
        notes.append(
            f"Precision (and so b-CapScore) needs the image: {no_image} record(s) without one were not scored for "
            "precision."
        )
    for metric in ("precision", "recall", "linguistic"):
        entry = section[metric]
        if not entry["unscorable"] or not entry["scored"]:
            continue
        attempted = entry["scored"] + entry["unscorable"]
        notes.append(
            f"{metric}: {entry['unscorable']} of {attempted} caption(s) could not be scored (judge calls failed "
            "after their retries; see the log) and are left out of its mean."
        )
    return notes
