"""No exit 0 without work: what an evaluation checks before it scores (or generates) anything, and after.

- `check_output_dir`: ``output_dir`` must be a folder this process can create and write. Checked by a real write
  (a temporary folder, removed at once) in the deepest folder that exists, so nothing is left behind; otherwise the
  report could only fail to be written after every caption had been scored.
- `check_judge`: the judge health check of ``balcaprl train`` (`balcaprl.judge.guard`) with the kinds of request
  the evaluation will send: a text request (the linguistic prompt) whenever a section asks the judge, the reference
  decomposition when recall or DCScore runs, and a request with an image (the precision prompt) when images go to
  the judge. Each must come back as schema-valid JSON, else `JudgeUnavailableError`: one line naming the judge URL
  and the fault. ``judge_health_check=False`` (``--no-judge-health-check``) skips it.
- `unscored_metrics` / `unscored_notes`: after scoring, the judged metrics that no caption could be scored for,
  although some were tried (every judge call they needed failed), and notes that give the failure counts and what a
  second health check says about the cause. ``balcaprl evaluate`` exits 1 when there is any.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["OutputDirError", "check_judge", "check_output_dir", "judge_probes", "unscored_metrics", "unscored_notes"]

SKIP_HINT = "--no-judge-health-check (Python: judge_health_check=False) skips this check"
TEXT_ONLY_HINT = (
    "The judge answers the text requests but not the request with an image: a text-only judge (e.g. llama.cpp "
    "without --mmproj) cannot score precision. Use a vision judge, or leave the images out with --judge-text-only."
)


class OutputDirError(ValueError):
    """``output_dir`` cannot be created or written; the message names the folder and the reason, in one line."""


def check_output_dir(output_dir: str | os.PathLike) -> None:
    """Raise `OutputDirError` unless ``output_dir`` is, or can be made, a folder this process can write in.

    Nothing is created: a temporary folder made (and removed) in the deepest folder of the path that exists proves
    that the write would succeed — whatever the permission bits, the user (root) or the file system (read-only).
    """
    path = Path(output_dir)
    existing = Path(os.path.abspath(path))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == Path(os.path.abspath(path)) else f"is under {existing}, which is a file"
        raise OutputDirError(f"--output-dir {path} {where}, not a folder: give a folder path.")
    try:
        probe = tempfile.mkdtemp(prefix=".balcaprl-write-check-", dir=existing)
    except OSError as error:
        made = "cannot be written" if existing == Path(os.path.abspath(path)) else f"cannot be created in {existing}"
        reason = error.strerror or type(error).__name__
        raise OutputDirError(f"--output-dir {path} {made} ({reason}): give a folder you can write.") from None
    os.rmdir(probe)


def judge_probes(
    options: Any, *, image: Any = None, references: Sequence[str] = ()
) -> tuple[list[Any], dict[str, Any]]:
    """The health-check rewards of an evaluation run as ``options`` (`EvaluationOptions`) say, and the row they are
    built from: one per kind of request the evaluation will send (none when no judge will be asked).

    ``image``: an image the judge will be shown (None when none goes to the judge); ``references``: a record's
    references. Judge-backed reward functions given as ``balcap_rewards`` are checked with their own clients.
    """
    probes = []
    if options.balcap and any(hasattr(function, "health_check") for function in options.balcap_rewards or []):
        from balcaprl.judge.guard import judge_rewards  # (imports transformers: only when there is a judge)

        probes = judge_rewards(options.balcap_rewards)
    judge = options.judge
    balcap_by_judge = options.balcap and options.balcap_rewards is None
    asks = balcap_by_judge or options.dcscore or options.captionqa_questions is not None
    if judge is not None and (asks or options.baseline_captions is not None):
        from balcaprl.rewards.judged import LinguisticReward, PrecisionReward, RecallReward

        probes.append(LinguisticReward(judge))  # a text request: every judged section sends them
        if references and (balcap_by_judge or options.dcscore):
            probes.append(RecallReward(judge))
        if image is not None and (balcap_by_judge or options.dcscore or options.baseline_captions is not None):
            probes.append(PrecisionReward(judge))
    return probes, {"image": image, "references": list(references)}


def _faults(probes: Sequence[Any], row: Mapping[str, Any]) -> tuple[list[str], bool]:
    """The probes' faults (one line each, naming reward, URL and model), and whether only the image request failed."""
    from balcaprl.judge.guard import judge_faults_by_reward

    failed = judge_faults_by_reward(probes, row)
    image_only = (
        len(failed) == 1
        and getattr(failed[0][0], "name", None) == "precision"
        and len(probes) > 1
        and all(getattr(probe, "judge", None) is getattr(failed[0][0], "judge", None) for probe in probes)
    )
    return [fault for _, fault in failed], image_only


def check_judge(probes: Sequence[Any], row: Mapping[str, Any], *, before: str = "scoring") -> None:
    """One real request per probe of `judge_probes`; raise `JudgeUnavailableError` (one line naming each failing
    judge's URL and the fault) unless every answer is schema-valid JSON. ``before`` says what the check precedes."""
    from balcaprl.judge.guard import JudgeUnavailableError

    if not probes:
        return
    faults, image_only = _faults(probes, row)
    if faults:
        hint = f" {TEXT_ONLY_HINT}" if image_only else ""
        raise JudgeUnavailableError(
            f"judge health check failed before {before}: {'; '.join(faults)}.{hint} Start the judge server or fix "
            f"--judge-base-url / --judge-model; {SKIP_HINT}."
        )


def _unscored(found: dict[str, dict[str, Any]], name: str, failed: int, scored: int, unit: str) -> None:
    if failed and not scored:
        found[name] = {"failed": failed, "attempted": failed, "unit": unit}


def unscored_metrics(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The metrics of ``report`` (by their ``summary`` names) that scored nothing although something was tried:
    ``{name: {"failed": n, "attempted": n, "unit": "captions" | "questions" | "battles"}}``. Their value is null,
    never 0. A metric with nothing to score (precision without images) is not one of them."""
    found: dict[str, dict[str, Any]] = {}
    balcap = report.get("balcap")
    if balcap:
        for metric in ("precision", "recall", "linguistic"):
            _unscored(found, metric, balcap[metric]["unscorable"], balcap[metric]["scored"], "captions")
    dcscore = report.get("dcscore")
    if dcscore:
        for metric, name in (("precision", "DCScore-P"), ("recall", "DCScore-R")):
            _unscored(found, name, dcscore[metric]["unscorable"], dcscore[metric]["scored"], "captions")
    captionqa = report.get("captionqa")
    if captionqa:
        _unscored(found, "CaptionQA", captionqa["failed"], captionqa["answered"], "questions")
    caparena = report.get("caparena")
    if caparena:
        _unscored(found, "CapArena", caparena["failed"], caparena["battles"], "battles")
    return found


def unscored_notes(
    probes: Sequence[Any],
    row: Mapping[str, Any],
    unscored: Mapping[str, Mapping[str, Any]],
    calls: Mapping[str, int] | None,
) -> list[str]:
    """The report's notes on ``unscored`` metrics: the failure counts, the judge calls of the run (``calls``, the
    report's ``judge.calls``) and what a health check run now (on ``probes`` and ``row``) says is wrong."""
    if not unscored:
        return []
    failed = "the judge failed on" if probes else "scoring failed for"  # (reward functions without a judge)
    notes = [
        f"{name}: no score (null, not 0): {failed} {entry['failed']} of {entry['attempted']} {entry['unit']}."
        for name, entry in unscored.items()
    ]
    if calls is not None:
        notes.append(
            f"Judge calls of this run: {calls['failures']} of {calls['asked']} failed after their retries "
            f"({calls['requests']} HTTP requests, {calls['retries']} retries)."
        )
    if probes:
        faults, image_only = _faults(probes, row)
        if faults:
            text = f"A judge health check after scoring fails: {'; '.join(faults)}."
            notes.append(f"{text} {TEXT_ONLY_HINT}" if image_only else text)
        else:
            notes.append(
                "A judge health check after scoring passes: the failures were specific to these requests, or the "
                "judge was down while scoring (see the log). A rerun with the same --judge-cache-dir asks only the "
                "calls that failed."
            )
    return notes
