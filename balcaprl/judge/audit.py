"""``balcaprl judge audit``: know your judge before you train on it.

A judge reward is only as good as its agreement with the truth. The audit scores labelled captions whose exact scores
are known (`balcaprl.judge.audit_set`: the shapes world's scenes with controlled errors, omissions and bad writing,
or your own JSONL) through the *same* reward functions training uses (`balcaprl.rewards.get_reward_funcs`: the
``precision``, ``recall`` and ``linguistic`` rewards of `balcaprl.rewards.judged`, their prompts and
`balcaprl.judge.JudgeClient`), and reports per reward:

- agreement with the exact scores: Spearman and Pearson correlation, mean absolute error;
- detection rate per perturbation type: the share of perturbed captions the judge scores *below* its score of the
  correct caption of the same image (ties are misses) — the comparison group-relative advantages are made of;
- monotonicity in severity: the share of images whose judge score never rises as the severity rises (0 = correct
  caption, 1, 2, 3), the share where it strictly falls, and Spearman of severity against score (−1 is perfect);
- the judge's failure rate (calls that scored None after their retries), latency per judge call (p50, p90, p99;
  retries included) and the requests, retries and prompt / completion tokens the section cost;
- a verdict — usable, marginal or not usable — against `USABLE` and `MARGINAL` (see `verdict`).

Precision needs a judge that sees the image. A judge that fails a request with an image but answers a text one
(a text-only model) gets the precision section skipped with a note; the others still run.

Outputs in ``--output-dir``: ``report.md``, ``report.json`` (every item with its expected and judge scores),
``<reward>_scatter.png`` (judge score against exact score) and, for the built-in set, ``audit_set.jsonl`` with its
``images/`` (the ``--data`` format, so the set can be edited and re-run). Exit status: 0 when a report was written,
2 for a usage or data error (one ``error:`` line naming the option, or the file, line and key), 1 when the judge
answered none of the audited rewards' health checks.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from balcaprl.judge.audit_set import (
    AUDITED_REWARDS,
    CORRECT,
    DEFAULT_IMAGE_SIZE,
    PERTURBATIONS,
    AuditDataError,
    AuditItem,
    build_audit_set,
    read_audit_data,
    write_audit_set,
)
from balcaprl.judge.config import add_judge_arguments

__all__ = [
    "MARGINAL",
    "USABLE",
    "JudgeAuditError",
    "analyse_reward",
    "build_parser",
    "judge_items",
    "main",
    "pearson",
    "run_audit",
    "spearman",
    "verdict",
    "write_report",
]

logger = logging.getLogger(__name__)


# Verdict thresholds. c-GDPO / GRPO turn rewards into advantages *within a group of captions of one image*, so a
# judge is usable when it ranks captions the way the truth does (Spearman) and sees each kind of flaw in a pair with
# the correct caption (detection). Spearman 0.7 is the usual line for a strong monotone relation and 0.4 for a
# moderate one; a detection rate of 0.5 is what a judge answering at random reaches on continuous scores (less with
# ties), so "marginal" asks for clearly better than chance (0.6) and "usable" for 4 flaws seen in 5, with no
# perturbation type below chance (a blind spot is what a policy learns to exploit). Failures leave captions
# unscored (NaN rewards, dropped from the advantage): 5% is noise, 20% is a fifth of the signal gone.
USABLE = {"spearman": 0.7, "detection_mean": 0.8, "detection_min": 0.5, "failure_rate": 0.05}
MARGINAL = {"spearman": 0.4, "detection_mean": 0.6, "failure_rate": 0.2}


COUNTERS = ("requests", "retries", "failures", "cache_hits", "bytes_sent", "prompt_tokens", "completion_tokens")


class JudgeAuditError(RuntimeError):
    """The judge answered none of the audited rewards' health checks."""


# ----------------------------------------------------------------------------------------------------- statistics
# scipy (spearmanr, rankdata) is not a dependency of the package; these few lines of numpy are all the audit needs.
def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given the mean of the ranks they span (as ``scipy.stats.rankdata``)."""
    ranks = np.empty(len(values), dtype=float)
    ranks[np.argsort(values, kind="mergesort")] = np.arange(1, len(values) + 1)
    _, tie_group = np.unique(values, return_inverse=True)
    return (np.bincount(tie_group, weights=ranks) / np.bincount(tie_group))[tie_group]


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's r; None when there are fewer than 3 pairs or either side is constant (r is undefined).

    >>> pearson([1, 2, 3], [2, 4, 6]), pearson([1, 2, 3], [1, 1, 1])
    (1.0, None)
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.clip(np.corrcoef(x, y)[0, 1], -1.0, 1.0))


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's ρ (Pearson's r of the tie-averaged ranks, as ``scipy.stats.spearmanr``); None when undefined.

    >>> spearman([1, 2, 3, 4], [1, 4, 9, 16]), spearman([1, 2, 3], [3, 1, 2])
    (1.0, -0.5)
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return pearson(_ranks(x), _ranks(y)) if len(x) >= 3 else None


def _percentiles(seconds: Sequence[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50": None, "p90": None, "p99": None, "calls": 0}
    values = np.percentile(np.asarray(seconds, dtype=float), [50, 90, 99])
    return {"p50": float(values[0]), "p90": float(values[1]), "p99": float(values[2]), "calls": len(seconds)}


# --------------------------------------------------------------------------------------------------------- judging
@dataclasses.dataclass
class RewardRun:
    """What the judge did for one reward: a score per item id (None = could not score), call latencies, counters."""

    name: str
    scores: dict[str, float | None] = dataclasses.field(default_factory=dict)
    latencies: list[float] = dataclasses.field(default_factory=list)
    counters: dict[str, float] = dataclasses.field(default_factory=dict)
    skipped: str | None = None


def _counters(judge: Any) -> dict[str, float]:
    # Token counters arrive with the client's usage accounting; a client without them reports 0.
    return {name: float(getattr(judge, name, 0) or 0) for name in COUNTERS}


def _probe_row(items: Sequence[AuditItem]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    with_image = next((item for item in items if item.image is not None), None)
    if with_image is not None:
        row["image"] = with_image.image
    with_reference = next((item for item in items if item.reference), None)
    if with_reference is not None:
        row["references"] = list(with_reference.reference)
    return row


async def _timed(call, semaphore: asyncio.Semaphore, latencies: list[float]):
    async with semaphore:
        start = time.perf_counter()
        result = await call
        latencies.append(time.perf_counter() - start)
        return result


async def _judge_reward(function: Any, name: str, items: Sequence[AuditItem], semaphore) -> RewardRun:
    """Score ``items`` with one reward function, one caption per call (as TRL calls it, with a batch of one)."""
    run = RewardRun(name)
    if name == "recall":  # each reference is split into units once per run, as in training: those calls first
        references = sorted({reference for item in items for reference in item.reference})
        await asyncio.gather(
            *(_timed(function.units(reference), semaphore, run.latencies) for reference in references)
        )

    async def score(item: AuditItem) -> float | None:
        columns: dict[str, Any] = {}
        if name == "precision":
            columns["image"] = [item.image]
        elif name == "recall":
            columns["references"] = [list(item.reference)]
        call = function(prompts=[None], completions=[item.caption], **columns)
        return (await _timed(call, semaphore, run.latencies))[0]

    results = await asyncio.gather(*(score(item) for item in items))
    run.scores = {item.id: (None if value is None else float(value)) for item, value in zip(items, results)}
    return run


async def judge_items(
    items: Sequence[AuditItem], rewards: Sequence[str], judge_settings: Mapping[str, Any]
) -> dict[str, RewardRun]:
    """Each of ``rewards`` scored on the items whose ``expected`` holds it, through the training reward functions
    built from ``judge_settings`` (the ``judge_*`` recipe keys); precision is skipped for a judge that cannot see
    images. Raises `JudgeAuditError` when the judge answers none of the health checks."""
    from balcaprl.rewards import get_reward_funcs
    from balcaprl.rewards.judged import LinguisticReward

    functions = dict(zip(rewards, get_reward_funcs(list(rewards), **judge_settings)))
    judge = next(iter(functions.values())).judge
    try:
        audited = {name: [item for item in items if name in item.expected] for name in functions}
        row = _probe_row(items)
        faults = {name: await functions[name].health_check(row) for name in functions if audited[name]}
        text_fault = next((fault for name, fault in faults.items() if name != "precision"), "not asked")
        if faults.get("precision") and text_fault == "not asked":
            text_fault = await LinguisticReward(judge).health_check(row)  # is it the image, or the judge?
        if faults and all(faults.values()) and text_fault:
            first = next(iter(faults.values()))
            raise JudgeAuditError(f"the judge at {judge.base_url} (model {judge.model!r}) did not answer: {first}")

        runs: dict[str, RewardRun] = {}
        semaphore = asyncio.Semaphore(judge.max_concurrency)
        for name, function in functions.items():
            if not audited[name]:
                runs[name] = RewardRun(name, skipped="skipped: no item gives an expected score for it.")
            elif faults[name] and name == "precision" and not text_fault:
                why = (
                    f"skipped: the judge answers text requests but not one with an image ({faults[name]}). "
                    "Precision needs a judge that sees the image (a multimodal model such as Qwen2.5-VL)."
                )
                runs[name] = RewardRun(name, skipped=why)
            elif faults[name]:
                runs[name] = RewardRun(name, skipped=f"skipped: the judge failed its health check ({faults[name]}).")
            else:
                before = _counters(judge)
                runs[name] = await _judge_reward(function, name, audited[name], semaphore)
                after = _counters(judge)
                runs[name].counters = {key: after[key] - before[key] for key in COUNTERS}
        return runs
    finally:
        await judge.aclose()


# -------------------------------------------------------------------------------------------------------- analysis
def verdict(
    spearman_value: float | None, detection_mean: float | None, detection_min: float | None, failure_rate: float
) -> tuple[str, list[str]]:
    """("usable" | "marginal" | "not usable", the reasons) from the thresholds `USABLE` and `MARGINAL`.

    An undefined Spearman (the judge gave every item one score) counts as 0. Without perturbation groups (a
    ``--data`` file without ``group`` / ``perturbation``) the verdict rests on agreement and failures alone.
    """
    rho = 0.0 if spearman_value is None else spearman_value
    shortfalls: dict[str, list[str]] = {"usable": [], "marginal": []}
    for level, limits in (("usable", USABLE), ("marginal", MARGINAL)):
        if rho < limits["spearman"]:
            described = "undefined (constant judge scores)" if spearman_value is None else f"{rho:.2f}"
            shortfalls[level].append(f"Spearman {described} < {limits['spearman']}")
        if detection_mean is not None and detection_mean < limits["detection_mean"]:
            shortfalls[level].append(f"mean detection rate {detection_mean:.2f} < {limits['detection_mean']}")
        if "detection_min" in limits and detection_min is not None and detection_min < limits["detection_min"]:
            shortfalls[level].append(f"weakest detection rate {detection_min:.2f} < {limits['detection_min']}")
        if failure_rate > limits["failure_rate"]:
            shortfalls[level].append(f"failure rate {failure_rate:.2f} > {limits['failure_rate']}")
    if not shortfalls["usable"]:
        return "usable", ["meets every 'usable' threshold"]
    if not shortfalls["marginal"]:
        return "marginal", [f"not usable outright: {'; '.join(shortfalls['usable'])}"]
    return "not usable", shortfalls["marginal"]


def _detection(audited: Sequence[AuditItem], name: str, scores: Mapping[str, float | None]) -> dict[str, dict]:
    """Per perturbation type: pairs (perturbed item, correct caption of its group, both scored, the perturbed one
    expected lower) and the share the judge scores strictly lower."""
    correct = {item.group: item for item in audited if item.perturbation == CORRECT}
    outcomes: dict[str, list[bool]] = defaultdict(list)
    for item in audited:
        reference = correct.get(item.group)
        if item.perturbation == CORRECT or reference is None:
            continue
        if item.expected[name] >= reference.expected[name]:
            continue  # nothing to detect: the label says this change does not lower the score
        judged, baseline = scores.get(item.id), scores.get(reference.id)
        if judged is None or baseline is None:
            continue
        outcomes[item.perturbation].append(judged < baseline)
    return {
        kind: {"rate": sum(flags) / len(flags), "detected": sum(flags), "pairs": len(flags)}
        for kind, flags in sorted(outcomes.items(), key=lambda pair: _type_order(pair[0]))
    }


def _type_order(kind: str) -> tuple[int, str]:
    order = [CORRECT, *PERTURBATIONS]
    return (order.index(kind) if kind in order else len(order), kind)


def _monotonicity(audited: Sequence[AuditItem], scores: Mapping[str, float | None]) -> dict[str, dict]:
    """Per perturbation type with at least two severities: per group, is the judge score non-increasing (strictly
    decreasing) from the correct caption through the severities; and Spearman of severity against score."""
    correct = {item.group: item for item in audited if item.perturbation == CORRECT}
    series: dict[str, dict[str, dict[int, float | None]]] = defaultdict(lambda: defaultdict(dict))
    for item in audited:
        if item.perturbation != CORRECT:
            series[item.perturbation][item.group][item.severity] = scores.get(item.id)
    result = {}
    for kind in sorted(series, key=_type_order):
        non_increasing = strictly = complete = 0
        points: list[tuple[int, float]] = []
        for group, by_severity in series[kind].items():
            if group in correct:
                by_severity = {0: scores.get(correct[group].id), **by_severity}
            if len(by_severity) < 2 or any(value is None for value in by_severity.values()):
                continue
            values = [by_severity[severity] for severity in sorted(by_severity)]
            complete += 1
            non_increasing += all(b <= a for a, b in zip(values, values[1:]))
            strictly += all(b < a for a, b in zip(values, values[1:]))
            points += [(severity, by_severity[severity]) for severity in by_severity]
        if complete:
            severities, values = zip(*points)
            result[kind] = {
                "non_increasing": non_increasing / complete,
                "strictly_decreasing": strictly / complete,
                "groups": complete,
                "severity_spearman": spearman(severities, values),
            }
    return result


def analyse_reward(
    name: str, items: Sequence[AuditItem], run: RewardRun, price_per_million_tokens: Sequence[float] | None = None
) -> dict[str, Any]:
    """The report section of one reward (see the module docstring); with the judge's (input, output) price per
    million tokens, also what the section cost."""
    audited = [item for item in items if name in item.expected]
    if run.skipped:
        return {"status": "skipped", "note": run.skipped, "items": len(audited)}
    scored = [item for item in audited if run.scores.get(item.id) is not None]
    failures = len(audited) - len(scored)
    expected = [item.expected[name] for item in scored]
    judged = [run.scores[item.id] for item in scored]
    detection = _detection(audited, name, run.scores)
    rates = [entry["rate"] for entry in detection.values()]
    detection_mean = sum(rates) / len(rates) if rates else None
    detection_min = min(rates) if rates else None
    failure_rate = failures / len(audited)
    rho = spearman(expected, judged)
    section: dict[str, Any] = {
        "status": "audited",
        "items": len(audited),
        "scored": len(scored),
        "failures": failures,
        "failure_rate": failure_rate,
        "agreement": {
            "spearman": rho,
            "pearson": pearson(expected, judged),
            "mae": float(np.mean(np.abs(np.subtract(expected, judged)))) if scored else None,
            "mean_expected": float(np.mean(expected)) if scored else None,
            "mean_judge": float(np.mean(judged)) if scored else None,
        },
        "detection": detection,
        "detection_mean": detection_mean,
        "detection_min": detection_min,
        "monotonicity": _monotonicity(audited, run.scores),
        "latency_s": _percentiles(run.latencies),
        "judge": run.counters,
    }
    requests = run.counters.get("requests") or 0
    for kind in ("prompt_tokens", "completion_tokens"):
        section["judge"][f"{kind}_per_request"] = run.counters.get(kind, 0) / requests if requests else None
    if price_per_million_tokens:
        input_price, output_price = price_per_million_tokens
        tokens = (
            run.counters.get("prompt_tokens", 0) * input_price
            + run.counters.get("completion_tokens", 0) * output_price
        )
        section["judge"]["cost"] = tokens / 1e6
    if not scored:
        section["verdict"], section["verdict_reasons"] = (
            "not usable",
            [f"the judge scored none of {len(audited)} items"],
        )
    else:
        section["verdict"], section["verdict_reasons"] = verdict(rho, detection_mean, detection_min, failure_rate)
    return section


# ---------------------------------------------------------------------------------------------------------- output
def _number(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _markdown(report: Mapping[str, Any]) -> str:
    judge, source = report["judge"], report["source"]
    lines = [
        "# Judge audit",
        "",
        f"Judge: `{judge['model']}` at `{judge['base_url']}`. Items: {source['description']}.",
        "",
        "| reward | verdict | Spearman | Pearson | MAE | detection (mean / weakest) | strictly falls with severity "
        "| failures | latency p50 / p90 / p99 (s) | tokens per request (prompt / completion) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, section in report["rewards"].items():
        if section["status"] != "audited":
            lines.append(f"| {name} | skipped | | | | | | | | |")
            continue
        agreement, latency, counters = section["agreement"], section["latency_s"], section["judge"]
        # Strictly: a judge giving every caption one score never rises with severity, yet sees nothing.
        monotone = [entry["strictly_decreasing"] for entry in section["monotonicity"].values()]
        monotone_share = sum(monotone) / len(monotone) if monotone else None
        lines.append(
            f"| {name} | **{section['verdict']}** | {_number(agreement['spearman'])} "
            f"| {_number(agreement['pearson'])} | {_number(agreement['mae'])} "
            f"| {_number(section['detection_mean'])} / {_number(section['detection_min'])} "
            f"| {_number(monotone_share)} | {section['failures']} of {section['items']} "
            f"| {_number(latency['p50'])} / {_number(latency['p90'])} / {_number(latency['p99'])} "
            f"| {_number(counters.get('prompt_tokens_per_request'), 0)} / "
            f"{_number(counters.get('completion_tokens_per_request'), 0)} |"
        )
    for name, section in report["rewards"].items():
        lines += ["", f"## {name}", ""]
        if section["status"] != "audited":
            lines.append(f"**{section['note']}**")
            continue
        lines.append(f"Verdict: **{section['verdict']}** — {'; '.join(section['verdict_reasons'])}.")
        counters = section["judge"]
        lines += [
            "",
            f"{section['scored']} of {section['items']} items scored; judge requests "
            f"{counters.get('requests', 0):.0f}, retries {counters.get('retries', 0):.0f}, cache hits "
            f"{counters.get('cache_hits', 0):.0f}, prompt tokens {counters.get('prompt_tokens', 0):.0f}, "
            f"completion tokens {counters.get('completion_tokens', 0):.0f}"
            + (f", cost {counters['cost']:.4g}. " if "cost" in counters else ". ")
            + f"Mean exact score {_number(section['agreement']['mean_expected'])}, mean judge score "
            f"{_number(section['agreement']['mean_judge'])}. Plot: `{name}_scatter.png`.",
        ]
        if section["detection"]:
            lines += [
                "",
                "| perturbation | detected | non-increasing | strictly decreasing | Spearman(severity, score) |",
                "|---|---|---|---|---|",
            ]
            for kind, entry in section["detection"].items():
                monotone = section["monotonicity"].get(kind, {})
                lines.append(
                    f"| {kind} | {entry['detected']} of {entry['pairs']} ({100 * entry['rate']:.0f}%) "
                    f"| {_number(monotone.get('non_increasing'))} | {_number(monotone.get('strictly_decreasing'))} "
                    f"| {_number(monotone.get('severity_spearman'))} |"
                )
        if section["latency_s"]["calls"] and counters.get("cache_hits"):
            lines += ["", "Some answers came from the judge's cache: their latency is not the server's."]
    thresholds = report["thresholds"]
    lines += [
        "",
        "## Thresholds",
        "",
        f"usable: Spearman ≥ {thresholds['usable']['spearman']}, mean detection ≥ "
        f"{thresholds['usable']['detection_mean']}, every type ≥ {thresholds['usable']['detection_min']}, failures ≤ "
        f"{thresholds['usable']['failure_rate']}; marginal: Spearman ≥ {thresholds['marginal']['spearman']}, "
        f"mean detection ≥ {thresholds['marginal']['detection_mean']}, failures ≤ "
        f"{thresholds['marginal']['failure_rate']}. "
        "Why: docs/judge_audit.md.",
        "",
    ]
    return "\n".join(lines)


def _scatter(name: str, items: Sequence[AuditItem], section: Mapping[str, Any], report_items, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 5), layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    by_type: dict[str, list[tuple[float, float]]] = defaultdict(list)
    rng = np.random.default_rng(0)
    for item in report_items:
        judged = item["judge"].get(name)
        if name in item["expected"] and judged is not None:
            by_type[item["perturbation"]].append((item["expected"][name], judged))
    for kind in sorted(by_type, key=_type_order):
        points = np.asarray(by_type[kind])
        jitter = rng.uniform(-0.008, 0.008, points.shape)  # identical scores would hide each other
        label = "correct caption" if kind == CORRECT else kind
        axis.scatter(points[:, 0] + jitter[:, 0], points[:, 1] + jitter[:, 1], s=18, alpha=0.7, label=label)
    axis.plot([0, 1], [0, 1], color="gray", linewidth=0.8, linestyle="--")
    agreement = section["agreement"]
    axis.set(
        xlim=(-0.05, 1.05),
        ylim=(-0.05, 1.05),
        xlabel=f"exact {name}",
        ylabel=f"judge {name}",
        title=f"{name}: Spearman {_number(agreement['spearman'])}, MAE {_number(agreement['mae'])} "
        f"({section['verdict']})",
    )
    if by_type:
        axis.legend(fontsize=7, loc="upper left")
    figure.savefig(path, dpi=100)


def write_report(report: Mapping[str, Any], items: Sequence[AuditItem], output_dir: str | Path) -> Path:
    """``report.json``, ``report.md`` and one scatter plot per audited reward; returns the path of ``report.md``."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name, section in report["rewards"].items():
        if section["status"] == "audited":
            _scatter(name, items, section, report["items"], output / f"{name}_scatter.png")
    path = output / "report.md"
    path.write_text(_markdown(report), encoding="utf-8")
    return path


def run_audit(
    items: Sequence[AuditItem],
    rewards: Sequence[str],
    judge_settings: Mapping[str, Any],
    output_dir: str | Path,
    source: Mapping[str, Any],
) -> dict[str, Any]:
    """Judge ``items``, analyse each reward, write the report into ``output_dir``; returns the report."""
    runs = asyncio.run(judge_items(items, rewards, judge_settings))
    report = {
        "judge": {"base_url": judge_settings.get("judge_base_url"), "model": judge_settings.get("judge_model")},
        "source": dict(source),
        "thresholds": {"usable": USABLE, "marginal": MARGINAL},
        "rewards": {
            name: analyse_reward(name, items, runs[name], judge_settings.get("judge_price_per_million_tokens"))
            for name in rewards
        },
        "items": [
            {
                "id": item.id,
                "group": item.group,
                "perturbation": item.perturbation,
                "severity": item.severity,
                "caption": item.caption,
                "expected": item.expected,
                "judge": {name: runs[name].scores[item.id] for name in rewards if item.id in runs[name].scores},
            }
            for item in items
        ],
    }
    write_report(report, items, output_dir)
    return report


# ------------------------------------------------------------------------------------------------------------- CLI
class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit status 2, without the usage block
        raise _UsageError(message)


def _reward_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in AUDITED_REWARDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown reward {unknown[0] if unknown else text!r}; choose from {','.join(AUDITED_REWARDS)}"
        )
    return list(dict.fromkeys(names))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser(prog: str = "balcaprl judge audit") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Score labelled captions (the shapes world's, or --data) with the judge through the training "
        "reward functions and report agreement, detection, monotonicity, failures, latency and a verdict per reward.",
    )
    parser.add_argument(
        "--rewards",
        type=_reward_list,
        default=list(AUDITED_REWARDS),
        help=f"comma-separated rewards to audit (default: {','.join(AUDITED_REWARDS)})",
    )
    parser.add_argument(
        "--n", type=_positive, default=20, help="scenes of the built-in set (default: 20; 30 items each)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in set's scenes (default: 0)")
    parser.add_argument(
        "--image-size", type=_positive, default=DEFAULT_IMAGE_SIZE, help="side of the built-in set's images in pixels"
    )
    parser.add_argument("--output-dir", default="runs/judge_audit", help="where the report goes")
    parser.add_argument(
        "--data", metavar="FILE.jsonl", help="your own labelled captions instead of the built-in set (see the docs)"
    )
    add_judge_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``balcaprl judge audit --judge-base-url URL --judge-model M [options]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "balcaprl judge audit"
    parser = build_parser(prog)
    try:
        arguments = parser.parse_args(argv)
        if not arguments.judge_base_url or not arguments.judge_model:
            raise _UsageError("a judge needs both --judge-base-url URL and --judge-model NAME.")
        judge_settings = {key: value for key, value in vars(arguments).items() if key.startswith("judge_")}
        from balcaprl.judge.client import JudgeClient

        JudgeClient.from_config(judge_settings)  # the client's own checks of its settings, before any request
        if arguments.data:
            items = read_audit_data(arguments.data)
            source = {
                "kind": "data",
                "path": str(arguments.data),
                "description": f"{len(items)} from {arguments.data}",
            }
        else:
            items = build_audit_set(arguments.n, arguments.seed, arguments.image_size)
            source = {
                "kind": "shapes world",
                "scenes": arguments.n,
                "seed": arguments.seed,
                "image_size": arguments.image_size,
                "description": f"{len(items)} built from {arguments.n} shapes-world scenes (seed {arguments.seed}, "
                f"{arguments.image_size} px); `audit_set.jsonl`",
            }
    except (_UsageError, AuditDataError, ValueError) as error:
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from balcaprl.judge.client import quiet_request_logs

    quiet_request_logs()
    output = Path(arguments.output_dir)
    try:
        output.mkdir(parents=True, exist_ok=True)
        if not arguments.data:
            write_audit_set(items, output)
    except OSError as error:
        print(f"{prog}: error: cannot write --output-dir {str(output)!r}: {error.strerror or error}", file=sys.stderr)
        return 2
    try:
        report = run_audit(items, arguments.rewards, judge_settings, output, source)
    except JudgeAuditError as error:
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    for name, section in report["rewards"].items():
        if section["status"] == "audited":
            agreement = section["agreement"]
            print(
                f"{name}: {section['verdict']} (Spearman {_number(agreement['spearman'])}, detection "
                f"{_number(section['detection_mean'])}, failures {section['failures']} of {section['items']})"
            )
        else:
            print(f"{name}: {section['note']}")
    print(output / "report.md")
    return 0
