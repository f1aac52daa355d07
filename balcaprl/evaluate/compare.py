"""Model-vs-model comparison of evaluation reports: a table with Δ, and grouped bars and length-ratio histograms."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from balcaprl.evaluate.records import EvaluationDataError
from balcaprl.evaluate.report import finite, plain, summary_metrics, table

__all__ = ["compare_reports"]


def _load_report(report: Mapping[str, Any] | str | os.PathLike) -> Mapping[str, Any]:
    if isinstance(report, Mapping):
        return report
    path = Path(report)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise EvaluationDataError(f"No report at {path}; give a report.json or the folder holding one.")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise EvaluationDataError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}).") from error
    if not isinstance(report, dict) or "summary" not in report:
        raise EvaluationDataError(f"{path} is not a report of `balcaprl evaluate` (a JSON object with a 'summary').")
    return report


def compare_reports(
    reports: Sequence[Mapping[str, Any] | str | os.PathLike],
    *,
    output_dir: str | os.PathLike,
    names: Sequence[str] | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Model-vs-model comparison of reports (dicts, ``report.json`` paths or their folders).

    Writes ``comparison.json`` (``{"names", "metrics": {metric: [value per report]}}``), ``comparison.md`` (a table
    with a Δ column when there are two reports) and ``comparison.png`` (grouped bars ×100 of the metrics that every
    report has, and the length-ratio histograms overlaid). To compare two caption sets, evaluate each first.
    """
    loaded = [_load_report(report) for report in reports]
    if len(loaded) < 2:
        raise ValueError("compare_reports needs at least two reports.")
    names = (
        list(names) if names is not None else [str(report.get("name", index)) for index, report in enumerate(loaded)]
    )
    if len(names) != len(loaded) or len(set(names)) != len(names):
        raise ValueError(f"names must be {len(loaded)} distinct names, got {names}.")
    summaries = [report.get("summary") or summary_metrics(report) for report in loaded]
    metric_names = [name for name in summaries[0] if all(name in summary for summary in summaries[1:])]
    metrics = {metric: [summary[metric] for summary in summaries] for metric in metric_names}
    comparison = {"names": names, "metrics": metrics}

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "comparison.json").write_text(json.dumps(finite(comparison), indent=2) + "\n", encoding="utf-8")
    header = ["metric", *names, *(["Δ (2nd − 1st)"] if len(names) == 2 else [])]
    rows = []
    for metric, values in metrics.items():
        row = [metric, *(plain(value, 4) for value in values)]
        if len(names) == 2:
            row.append("–" if None in values else plain(values[1] - values[0], 4))
        rows.append(row)
    text = ["# Caption evaluation comparison", "", "Fractions as in report.json (×100 in the plot).", ""]
    text += table(header, rows)

    if plots:
        try:
            from balcaprl.evaluate.plots import plot_comparison

            plot_comparison(loaded, names, summaries, output / "comparison.png")
        except ImportError:
            text += ["Plot skipped: matplotlib is not installed (pip install matplotlib).", ""]
        else:
            text += ["![comparison](comparison.png)", ""]
    (output / "comparison.md").write_text("\n".join(text), encoding="utf-8")
    return comparison
