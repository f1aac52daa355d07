"""Plots of reports and comparisons, drawn on matplotlib's Agg canvas without pyplot (no global state, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from balcaprl.evaluate.classic import CLASSIC_NAMES, LENGTH_WINDOW

__all__ = ["plot_comparison", "plot_report"]


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas, without pyplot (no global state, safe in threads and headless)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def percent_metrics(summary: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """(reference-based, judge-based) headline metrics ×100; CapArena as (W − L) / N × 100."""
    reference_based = {name: 100 * summary[name] for name in CLASSIC_NAMES if summary.get(name) is not None}
    judge_names = ["precision", "recall", "linguistic", "b-CapScore", "DCScore-P", "DCScore-R", "DCScore-F1"]
    judge_based = {name: 100 * summary[name] for name in [*judge_names, "CaptionQA"] if summary.get(name) is not None}
    if summary.get("CapArena/normalized") is not None:
        judge_based["CapArena (W−L)/N"] = 100 * summary["CapArena/normalized"]
    return reference_based, judge_based


def plot_report(report: Mapping[str, Any], output: Path) -> dict[str, Path]:
    paths = {"length_plot": output / "length.png"}
    rows = report["per_caption"]
    words = [row["words"] for row in rows if row.get("words") is not None]
    ratios = [row["ratio"] for row in rows if row.get("ratio") is not None]
    reference_words = [row["reference_words"] for row in rows if row.get("reference_words") is not None]
    low, high = report["length"]["window"]

    figure = _figure(10, 3.8)
    words_axis, ratio_axis = figure.subplots(1, 2)
    top = max(words + reference_words + [1])
    bins = list(range(0, int(top) + 2, max(1, int(top) // 30 + 1)))
    words_axis.hist(words, bins=bins, alpha=0.7, label="captions")
    if reference_words:
        words_axis.hist(reference_words, bins=bins, alpha=0.5, label="references (mean per image)")
    words_axis.set(xlabel="words", ylabel="captions", title="Caption length")
    words_axis.legend()
    _ratio_histogram(ratio_axis, {report["name"]: ratios}, low, high)
    if ratios:
        ratio_axis.set_title(
            f"Length ratio ρ ({100 * report['length']['outside_window']:.1f}% outside [{low:g}, {high:g}])"
        )
    figure.savefig(paths["length_plot"], dpi=100)

    reference_based, judge_based = percent_metrics(report["summary"])
    panels = [("Reference-based (×100)", reference_based), ("Judge-based (×100)", judge_based)]
    panels = [(title, values) for title, values in panels if values]
    if panels:
        paths["metrics_plot"] = output / "metrics.png"
        figure = _figure(5 * len(panels), 0.35 * max(len(values) for _, values in panels) + 1.5)
        axes = figure.subplots(1, len(panels), squeeze=False)[0]
        for axis, (title, values) in zip(axes, panels):
            bars = axis.barh(list(values), list(values.values()), color="tab:blue")
            axis.bar_label(bars, fmt="%.1f", padding=2)
            axis.invert_yaxis()
            axis.axvline(0, color="black", linewidth=0.8)
            axis.set_title(f"{report['name']}: {title}")
            axis.margins(x=0.15)
        figure.savefig(paths["metrics_plot"], dpi=100)
    return paths


def _ratio_histogram(axis: Any, ratios_by_name: Mapping[str, Sequence[float]], low: float, high: float) -> None:
    values = [ratio for ratios in ratios_by_name.values() for ratio in ratios]
    right = max([high * 1.25, *values]) * 1.02
    bins = [right * step / 40 for step in range(41)]
    axis.axvspan(low, high, color="tab:green", alpha=0.12, label=f"window [{low:g}, {high:g}]")
    for bound in (low, high):
        axis.axvline(bound, color="tab:green", linestyle="--", linewidth=1)
    for name, ratios in ratios_by_name.items():
        if ratios:
            histtype = "step" if len(ratios_by_name) > 1 else "bar"
            axis.hist(ratios, bins=bins, histtype=histtype, alpha=0.8, linewidth=1.5, label=name)
    axis.set(xlabel="ρ = caption words / mean reference words", ylabel="captions")
    axis.legend(fontsize="small")


def plot_comparison(
    reports: Sequence[Mapping[str, Any]], names: Sequence[str], summaries: Sequence[Mapping[str, Any]], path: Path
) -> None:
    percent = [percent_metrics(summary) for summary in summaries]
    merged = [{**reference, **judged} for reference, judged in percent]
    shared = [metric for metric in merged[0] if all(metric in values for values in merged[1:])]
    ratios = {
        name: [row["ratio"] for row in report.get("per_caption", []) if row.get("ratio") is not None]
        for name, report in zip(names, reports)
    }
    has_ratios = any(ratios.values())
    figure = _figure(6 + 5 * has_ratios, 0.45 * max(len(shared), 4) + 1.5)
    axes = figure.subplots(1, 1 + has_ratios, squeeze=False)[0]
    height = 0.8 / len(names)
    for index, name in enumerate(names):
        positions = [position + index * height for position in range(len(shared))]
        bars = axes[0].barh(positions, [merged[index][metric] for metric in shared], height=height, label=name)
        axes[0].bar_label(bars, fmt="%.1f", padding=2, fontsize="x-small")
    axes[0].set_yticks([position + 0.4 - height / 2 for position in range(len(shared))], shared)
    axes[0].invert_yaxis()
    axes[0].axvline(0, color="black", linewidth=0.8)
    axes[0].set_title("Metrics (×100)")
    axes[0].margins(x=0.15)
    axes[0].legend(fontsize="small")
    if has_ratios:
        low, high = reports[0].get("length", {}).get("window", LENGTH_WINDOW)
        _ratio_histogram(axes[1], ratios, low, high)
        axes[1].set_title("Length ratio ρ")
    figure.savefig(path, dpi=100)
