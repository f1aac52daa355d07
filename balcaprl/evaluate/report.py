"""Reports: the headline numbers of a report (`summary_metrics`), ``report.json`` and ``report.md``."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from balcaprl.evaluate.classic import CLASSIC_NAMES

logger = logging.getLogger(__name__)

__all__ = ["summary_metrics", "write_report"]


def finite(value: Any) -> Any:
    """JSON-safe copy: numpy scalars become floats, NaN/inf become None."""
    if isinstance(value, Mapping):
        return {str(key): finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summary_metrics(report: Mapping[str, Any]) -> dict[str, float | int | None]:
    """The headline numbers of a report, flat: ``{"BLEU-4": ..., "b-CapScore": ..., "CapArena": ...}``."""
    summary: dict[str, Any] = {}
    classic = report.get("classic")
    if classic:
        summary.update({name: classic["metrics"][name] for name in CLASSIC_NAMES if name in classic["metrics"]})
    balcap = report.get("balcap")
    if balcap:
        summary.update(
            precision=balcap["precision"]["mean"],
            recall=balcap["recall"]["mean"],
            linguistic=balcap["linguistic"]["mean"],
        )
        summary["b-CapScore"] = balcap["b_capscore"]
    dcscore = report.get("dcscore")
    if dcscore:
        summary["DCScore-P"] = dcscore["precision"]["mean"]
        summary["DCScore-R"] = dcscore["recall"]["mean"]
        summary["DCScore-F1"] = dcscore["f1"]
    captionqa = report.get("captionqa")
    if captionqa:
        summary["CaptionQA"] = captionqa["accuracy"]
    caparena = report.get("caparena")
    if caparena:
        summary["CapArena"] = caparena["score"]
        summary["CapArena/normalized"] = caparena["normalized_score"]
    length = report.get("length")
    if length:
        summary["length/words_mean"] = length["words_mean"]
        if "ratio_mean" in length:
            summary["length/ratio_mean"] = length["ratio_mean"]
            summary["length/outside_window"] = length["outside_window"]
    return summary


def percent(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def plain(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def _markdown(report: Mapping[str, Any], plot_files: Sequence[str]) -> str:
    lines = [f"# Caption evaluation: {report['name']}", ""]
    judge = report.get("judge")
    judge_text = "no judge" if judge is None else f"judge `{judge['model']}` at {judge['base_url']}"
    lines += [f"{report['num_captions']} captions · {report['created']} · {judge_text}", ""]
    if judge is not None and "calls" in judge:
        calls = judge["calls"]
        cost = ""
        if judge.get("cost") is not None:
            input_price, output_price = judge["price_per_million_tokens"]
            cost = f"; cost {judge['cost']:.6g} at {input_price:g} / {output_price:g} per million tokens"
        lines += [
            f"Judge calls: {calls['failures']} of {calls['asked']} failed after their retries; "
            f"{calls['requests']} requests, {calls['cache_hits']} cache hits, {calls['retries']} retries.",
            "",
            f"Judge tokens: {calls['prompt_tokens']} prompt, {calls['completion_tokens']} completion{cost}.",
            "",
        ]
    generation = report.get("generation")
    if generation:
        settings = generation.get("generation", {})
        decoding = "greedy"
        if settings.get("do_sample"):
            decoding = f"sampled (temperature {settings.get('temperature')}, seed {settings.get('seed')})"
        data = generation.get("data", {})
        split = f" (split `{data['split']}`)" if data.get("split") else ""
        lines += [
            f"Captions by `{generation.get('model')}` on `{data.get('source')}`{split}, "
            f"{decoding}, at most {settings.get('max_new_tokens')} new tokens: {generation.get('generated')} "
            f"generated in this run, {generation.get('reused')} reused from an earlier one "
            f"(`{generation.get('captions_file')}`).",
            "",
        ]
    if report["notes"]:
        lines += ["## Notes", "", *[f"- {note}" for note in report["notes"]], ""]

    classic = report.get("classic")
    if classic:
        tokenizer = "PTB (Java)" if classic["tokenizer"] == "ptb" else "simple, NOT the PTB tokenizer (no Java)"
        lines += [f"## Reference-based metrics (pycocoevalcap; tokenizer: {tokenizer}; ×100)", ""]
        rows = [[name, percent(classic["metrics"][name])] for name in CLASSIC_NAMES if name in classic["metrics"]]
        rows += [[name, "skipped (see notes)"] for name in classic["skipped"]]
        lines += table(["metric", "score"], rows)

    length = report["length"]
    low, high = length["window"]
    lines += ["## Length (words)", ""]
    spread = [plain(length["words_mean"], 1), plain(length["words_median"], 1), length["words_min"]]
    rows = [["caption words (mean / median / min / max)", " / ".join(str(v) for v in [*spread, length["words_max"]])]]
    if "ratio_mean" in length:
        ratio_mean, ratio_median = length["ratio_mean"], length["ratio_median"]
        outside, below, above = (percent(length[key]) for key in ("outside_window", "below_window", "above_window"))
        rows += [
            ["reference words (mean)", plain(length["reference_words_mean"], 1)],
            ["ρ = caption / reference words (mean / median)", f"{plain(ratio_mean)} / {plain(ratio_median)}"],
            [f"% outside [{low:g}, {high:g}] (below / above)", f"{outside} ({below} / {above})"],
        ]
    lines += table(["statistic", "value"], rows)

    balcap = report.get("balcap")
    if balcap:
        scorers = balcap.get("scorers", {})
        if scorers and scorers != {"precision": "precision", "recall": "recall", "linguistic": "linguistic"}:
            lines += ["## BalCapRL metrics (×100)", "", f"Scored by {', '.join(scorers.values())}, not by judges.", ""]
        else:
            lines += ["## BalCapRL judge metrics (×100)", ""]
        rows = []
        for metric in ("precision", "recall", "linguistic"):
            entry = balcap[metric]
            extra = f", {entry['no_image']} without image" if "no_image" in entry else ""
            rows.append(
                [metric, percent(entry["mean"]), f"{entry['scored']} ({entry['unscorable']} unscorable{extra})"]
            )
        rows.append(["**b-CapScore** = H(P, R, L)", percent(balcap["b_capscore"]), ""])
        lines += table(["metric", "mean", "captions scored"], rows)

    dcscore = report.get("dcscore")
    if dcscore:
        evidence = dcscore["evidence_counts"]
        lines += [
            "## DCScore-style (×100)",
            "",
            f"Caption units verified against the image for {evidence['image']} caption(s), against the references "
            f"for {evidence['references']}.",
            "",
        ]
        rows = [
            ["precision", percent(dcscore["precision"]["mean"]), dcscore["precision"]["scored"]],
            ["recall", percent(dcscore["recall"]["mean"]), dcscore["recall"]["scored"]],
            ["**F1** = H(P, R)", percent(dcscore["f1"]), ""],
            ["mean per-caption F1", percent(dcscore["f1_mean"]), dcscore["f1_scored"]],
        ]
        lines += table(["metric", "value", "captions scored"], rows)

    captionqa = report.get("captionqa")
    if captionqa:
        lines += ["## CaptionQA-style (accuracy ×100)", ""]
        if captionqa["no_caption"]:
            lines += [f"{captionqa['no_caption']} question(s) had no caption for their image and were not asked.", ""]

        def qa_row(label: str, entry: Mapping[str, Any]) -> list[Any]:
            return [label, percent(entry["accuracy"]), entry["answered"], entry["abstained"], entry["failed"]]

        rows = [qa_row("**all**", captionqa)]
        rows += [qa_row(category, entry) for category, entry in captionqa["per_category"].items()]
        lines += table(["category", "accuracy", "answered", "abstained", "judge failed"], rows)

    caparena = report.get("caparena")
    if caparena:
        lines += [f"## CapArena-style vs {caparena['baseline']}", ""]
        keys = ["score", "battles", "wins", "losses", "draws", "failed", "position_consistent"]
        rows = [[caparena[key] for key in keys]]
        header = ["score (W − L)", "battles", "wins", "losses", "draws", "failed", "same position both orders"]
        lines += table(header, rows)

    if plot_files:
        lines += ["## Plots", "", *[f"![{Path(file).stem}]({file})" for file in plot_files], ""]
    lines += ["Per-caption values are in `report.json` (`per_caption`).", ""]
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], output_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and (if ``plots`` and matplotlib is installed) the PNGs; return paths."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if plots:
        try:
            from balcaprl.evaluate.plots import plot_report

            paths.update(plot_report(report, output))
        except ImportError:
            message = "Plots skipped: matplotlib is not installed (pip install matplotlib)."
            logger.warning(message)
            report["notes"].append(message)
    report_json = output / "report.json"
    report_json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    report_md = output / "report.md"
    report_md.write_text(_markdown(report, [path.name for path in paths.values()]), encoding="utf-8")
    return {"json": report_json, "markdown": report_md, **paths}
