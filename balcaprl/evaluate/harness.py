"""The scoring harness: captions in, every requested section run (judge calls concurrently, the Java metrics in a
thread meanwhile), ``report.json`` / ``report.md`` / plots out.

What to evaluate is ONE `EvaluationOptions` object, shared by `evaluate_captions` (sync), `evaluate_captions_async`
and `balcaprl.evaluate.generate_and_evaluate`; each takes it as ``options=`` and/or its fields as keywords.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from balcaprl.evaluate.balcap import balcap_notes, balcap_section
from balcaprl.evaluate.checks import check_judge, check_output_dir, judge_probes, unscored_metrics, unscored_notes
from balcaprl.evaluate.classic import classic_section, length_section
from balcaprl.evaluate.judge_styles import caparena_section, captionqa_section, dcscore_section
from balcaprl.evaluate.records import (
    CaptionRecord,
    EvaluationDataError,
    as_records,
    check_image_paths,
    default_name,
    load_questions,
    non_empty_references,
    normalize_question,
    read_captions,
    require_references,
)
from balcaprl.evaluate.report import finite, summary_metrics, write_report
from balcaprl.judge.client import COUNTER_NAMES, JudgeClient
from balcaprl.judge.config import token_cost

__all__ = ["EvaluationOptions", "evaluate_captions", "evaluate_captions_async"]

REPORT_FORMAT_VERSION = 1
JUDGE_FLAGS = "--judge-base-url URL --judge-model NAME"
SECTIONS = ("length", "classic", "balcap", "dcscore", "captionqa", "caparena")
Captions = Sequence[Mapping[str, Any] | CaptionRecord] | str | os.PathLike


@dataclass(frozen=True)
class EvaluationOptions:
    """What to evaluate and how; every field has the command line's default.

    Args:
        judge: the judge for the judge-based sections; without one only classic metrics and lengths run (and
            ``balcap`` with ``balcap_rewards``).
        classic: BLEU-1..4 / METEOR / ROUGE-L / CIDEr-D (/ SPICE) by pycocoevalcap (`classic_section`).
        balcap: mean precision / recall / linguistic and b-CapScore (`balcap_section`; needs ``judge`` or
            ``balcap_rewards``).
        balcap_rewards: three TRL reward functions (precision, recall, linguistic) that stand in for the judges of
            the balcap section, e.g. the synthetic world's exact ``(WorldPrecision(), WorldRecall(),
            WorldLinguistic())``; they get the records' extra columns (a world ``scene``) as keyword arguments.
        dcscore: DCScore-style P / R / F1 (`dcscore_section`; needs ``judge``).
        captionqa_questions: a questions JSONL path (`load_questions`) or their list: CaptionQA-style accuracy
            (`captionqa_section`).
        baseline_captions: records or a JSONL path of another system's captions of the same ids: CapArena-style
            battles (`caparena_section`), reported under ``baseline_name``.
        name: the evaluated system's name in tables and comparisons; default: the captions file's name
            (`default_name`), the model folder's name (`generate_and_evaluate`), else "model".
        plots: write ``length.png`` and ``metrics.png`` (needs matplotlib; without it a note replaces them).
        generation: how the captions were made (model, data, decoding settings; see `generate_and_evaluate`),
            stored as the report's ``generation`` and shown in ``report.md``.
        judge_health_check: before scoring (and before generating captions), one real request of each kind the
            evaluation will send the judge must come back as schema-valid JSON, as ``balcaprl train`` checks
            (`balcaprl.evaluate.checks.check_judge`); else `JudgeUnavailableError` names the judge URL and the fault.
    """

    judge: JudgeClient | None = None
    classic: bool = True
    balcap: bool = True
    balcap_rewards: Sequence[Callable] | None = None
    dcscore: bool = False
    captionqa_questions: str | os.PathLike | Sequence[Mapping[str, Any]] | None = None
    baseline_captions: Captions | None = None
    name: str | None = None
    baseline_name: str = "baseline"
    plots: bool = True
    generation: Mapping[str, Any] | None = None
    judge_health_check: bool = True

    @classmethod
    def build(cls, options: EvaluationOptions | None = None, **settings: Any) -> EvaluationOptions:
        """``options`` (default: all defaults) with ``settings`` replacing fields; an unknown name is a TypeError
        that lists the fields."""
        names = [option.name for option in dataclasses.fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise TypeError(f"Unknown evaluation settings {unknown}; the settings of EvaluationOptions are {names}.")
        return dataclasses.replace(options if options is not None else cls(), **settings)

    def images_needed(self) -> bool:
        """Whether something will look at the images: a judge, or reward functions standing in for one."""
        return self.judge is not None or (self.balcap and self.balcap_rewards is not None)


def _records(captions: Captions, what: str) -> list[CaptionRecord]:
    if isinstance(captions, (str, os.PathLike)):
        records = read_captions(captions, check_images=False)  # images are checked later, if something needs them
    else:
        records = as_records(captions, what=what)
    if not records:
        source = str(captions) if isinstance(captions, (str, os.PathLike)) else what
        raise EvaluationDataError(f"{source}: no captions to evaluate.")
    return records


def _judge_probes(
    records: list[CaptionRecord], baseline: list[CaptionRecord] | None, options: EvaluationOptions
) -> tuple[list[Any], dict[str, Any]]:
    """The health-check requests of this evaluation (`judge_probes`), built from its first image and references."""
    if options.judge is None and options.balcap_rewards is None:
        return [], {}
    image = next((record.image for record in [*records, *(baseline or [])] if record.image is not None), None)
    references = next((non_empty_references(record) for record in records if non_empty_references(record)), [])
    return judge_probes(options, image=image, references=references)


async def _in_a_thread(function: Callable, probes: list[Any], *arguments: Any) -> Any:
    """``function(probes, ...)``, which runs its own event loop, in a worker thread; the probes' judge clients are
    closed on this loop first (their next use reopens them), as that loop's end forgets the other loops' clients."""
    for judge in {id(probe.judge): probe.judge for probe in probes}.values():
        await judge.aclose()
    return await asyncio.to_thread(function, probes, *arguments)


def _check_inputs(records: list[CaptionRecord], options: EvaluationOptions) -> None:
    """Refuse, before any judge call, what cannot be evaluated as asked (errors name the record and the field)."""
    needs_judge = {
        "dcscore": options.dcscore,
        "captionqa_questions": options.captionqa_questions is not None,
        "baseline_captions": options.baseline_captions is not None,
    }
    wanted = [key for key, value in needs_judge.items() if value]
    if options.judge is None and wanted:
        raise ValueError(f"{wanted} need a judge: give {JUDGE_FLAGS} (Python: judge=JudgeClient(...)).")
    judge_recall = options.balcap and options.judge is not None and options.balcap_rewards is None
    needing = {"classic metrics (--no-classic)": options.classic, "BalCapRL recall (--no-balcap)": judge_recall}
    needing["DCScore (--dcscore)"] = options.dcscore
    if any(needing.values()):
        require_references(records, ", ".join(section for section, needs in needing.items() if needs))
    if options.images_needed():
        check_image_paths(records)


async def evaluate_captions_async(
    captions: Captions, *, output_dir: str | os.PathLike, options: EvaluationOptions | None = None, **settings: Any
) -> dict[str, Any]:
    """`evaluate_captions` for callers already inside an event loop; the judge is left open (the caller owns it).

    The judge health check (and the second one when a metric scored nothing) runs in a worker thread, on its own
    event loop; the judge's HTTP client on this loop is closed before it (it reopens on use)."""
    options = EvaluationOptions.build(options, **settings)
    check_output_dir(output_dir)
    records = _records(captions, "captions")
    _check_inputs(records, options)
    judge = options.judge
    questions = None
    if options.captionqa_questions is not None:
        questions = options.captionqa_questions
        questions = load_questions(questions) if isinstance(questions, (str, os.PathLike)) else questions
        questions = [normalize_question(row, f"captionqa_questions[{index}]") for index, row in enumerate(questions)]
    baseline = None
    if options.baseline_captions is not None:
        baseline = _records(options.baseline_captions, "baseline_captions")
        if options.images_needed():
            check_image_paths(baseline)
    probes, probe_row = _judge_probes(records, baseline, options)
    if probes and options.judge_health_check:
        await _in_a_thread(check_judge, probes, probe_row)

    name = options.name
    if name is None:
        name = default_name(captions) if isinstance(captions, (str, os.PathLike)) else "model"
    notes: list[str] = []
    report: dict[str, Any] = {
        "format_version": REPORT_FORMAT_VERSION,
        "name": name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "num_captions": len(records),
        "judge": None if judge is None else {"base_url": judge.base_url, "model": judge.model},
        "notes": notes,
    }
    if judge is not None:
        report["judge"]["health_check"] = "passed" if options.judge_health_check and probes else "not run"
    if options.generation is not None:
        report["generation"] = dict(options.generation)
    counted = ("calls", *COUNTER_NAMES)
    counters_before = {} if judge is None else {counter: getattr(judge, counter) for counter in counted}

    classic_task = None
    if options.classic:
        try:
            import pycocoevalcap.bleu.bleu  # noqa: F401  (a namespace package: import a real module)
        except ImportError:
            notes.append("Classic metrics skipped: pycocoevalcap is not installed (pip install pycocoevalcap).")
        else:
            classic_task = asyncio.ensure_future(asyncio.to_thread(classic_section, records))  # JVMs run meanwhile
    if options.balcap and judge is None and options.balcap_rewards is None:
        notes.append(
            f"BalCapRL metrics skipped: no judge given. Give one with {JUDGE_FLAGS} (a vision judge scores "
            "precision), or score P/R/L with --exact-world-judges or --balcap-rewards PRECISION RECALL LINGUISTIC; "
            "--no-balcap leaves the section out."
        )

    judge_tasks: dict[str, Any] = {}
    if options.balcap and options.balcap_rewards is not None:
        judge_tasks["balcap"] = balcap_section(records, rewards=options.balcap_rewards)
    if judge is not None:
        from balcaprl.rewards.judged import RecallReward

        shared_recall = RecallReward(judge)  # one object: each reference is decomposed once for both sections
        if options.balcap and options.balcap_rewards is None:
            judge_tasks["balcap"] = balcap_section(records, judge, shared_recall)
        if options.dcscore:
            judge_tasks["dcscore"] = dcscore_section(records, judge, shared_recall)
        if questions is not None:
            judge_tasks["captionqa"] = captionqa_section(records, questions, judge)
        if baseline is not None:
            judge_tasks["caparena"] = caparena_section(records, baseline, judge, options.baseline_name)
    try:
        results = dict(zip(judge_tasks, await asyncio.gather(*judge_tasks.values())))
    except BaseException:
        if classic_task is not None:
            classic_task.cancel()  # its thread finishes on its own; nobody will read its result
        raise
    if classic_task is not None:
        results["classic"] = await classic_task
        notes.extend(results["classic"].pop("notes"))
    results["length"] = length_section(records)
    if results["length"]["no_reference"]:
        notes.append(f"{results['length']['no_reference']} caption(s) have no reference: no length ratio for them.")
    if "balcap" in results:
        notes.extend(balcap_notes(results["balcap"]))
    if judge is not None:
        calls = {counter: getattr(judge, counter) - counters_before[counter] for counter in counted}
        report["judge"]["calls"] = {"asked": calls.pop("calls"), **calls}
        price = judge.price_per_million_tokens
        if price is not None:
            report["judge"]["price_per_million_tokens"] = list(price)
            report["judge"]["cost"] = token_cost(calls["prompt_tokens"], calls["completion_tokens"], price)

    per_caption: dict[str, dict[str, Any]] = {r.id: {"id": r.id, "caption": r.caption} for r in records}
    for section_name in SECTIONS:
        section = results.get(section_name)
        if section is None:
            continue
        for record_id, values in section.pop("per_caption").items():
            per_caption.setdefault(record_id, {"id": record_id}).update(values)
        report[section_name] = section
    report["unscored"] = unscored_metrics(report)  # `balcaprl evaluate` exits 1 when a metric scored nothing
    if report["unscored"]:
        calls = None if judge is None else report["judge"]["calls"]
        notes.extend(await _in_a_thread(unscored_notes, probes, probe_row, report["unscored"], calls))
    report["summary"] = summary_metrics(report)
    report["per_caption"] = list(per_caption.values())
    report = finite(report)
    write_report(report, output_dir, plots=options.plots)
    return report


def evaluate_captions(
    captions: Captions, *, output_dir: str | os.PathLike, options: EvaluationOptions | None = None, **settings: Any
) -> dict[str, Any]:
    """Score captions already produced; write ``report.json``, ``report.md`` and plots to ``output_dir``; return the
    report.

    ``captions``: records ``{"id", "caption", "references", "image"?}`` or a JSONL path (`load_captions`). What to
    evaluate: ``options`` (`EvaluationOptions`) and/or its fields as keywords (``judge=``, ``classic=``, ``balcap=``,
    ``balcap_rewards=``, ``dcscore=``, ``captionqa_questions=``, ``baseline_captions=``, ``name=``,
    ``baseline_name=``, ``plots=``, ``generation=``), keywords winning.

    The report's ``summary`` holds the headline numbers flat (fractions; CIDEr-D as computed; ``CapArena`` as
    wins − losses), ``notes`` what was skipped and why, ``per_caption`` every per-caption value, ``unscored`` the
    metrics no caption could be scored for although some were tried (every judge call failed: null, never 0; the
    notes give the counts and the judge's fault; `balcaprl.evaluate.checks.unscored_metrics`). Image files are
    checked only when a judge or reward functions will look at them. A data problem (a missing image, a caption
    without references where a section needs one, ...) raises `EvaluationDataError` naming the record and field.

    Before anything is scored: ``output_dir`` must be writable (else `OutputDirError`), and, unless
    ``judge_health_check=False``, the judge must answer one request of each kind the evaluation sends (else
    `balcaprl.judge.guard.JudgeUnavailableError`, naming the judge URL and the fault).

    Runs its own event loop (use `evaluate_captions_async` inside one) and closes the judge's HTTP client at the end
    (it reopens on use).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "evaluate_captions was called inside a running event loop; use `await evaluate_captions_async(...)`."
        )
    options = EvaluationOptions.build(options, **settings)

    async def run() -> dict[str, Any]:
        try:
            return await evaluate_captions_async(captions, output_dir=output_dir, options=options)
        finally:
            if options.judge is not None:
                await options.judge.aclose()

    return asyncio.run(run())
