"""The demo's ``report.md`` and figures: before/after table, held-out curve, sample captions, smoothed reward
curves."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from balcaprl.length import DEFAULT_WINDOW

if TYPE_CHECKING:
    from balcaprl.experiments.demo import DemoSettings


WINDOW_TEXT = f"[{DEFAULT_WINDOW[0]:g}, {DEFAULT_WINDOW[1]:g}]"


METRICS = [
    ("precision", "precision"),
    ("recall", "recall"),
    ("linguistic", "linguistic"),
    ("b_capscore", "b-CapScore"),
    ("objects_named", "objects named per caption"),
    ("objects_right", "objects named rightly per caption"),
    ("cider_d", "CIDEr-D"),
    ("length_ratio", "mean length ratio"),
    ("masked_fraction", f"outside {WINDOW_TEXT}"),
    ("repeated_sentence", "captions with a repeated sentence"),
    ("repeated_4gram", "repeated 4-grams (seq-rep-4)"),
    ("distinct_2", "distinct-2 (all captions)"),
]
METRIC_LABELS = dict(METRICS)  # the one name of each metric, in the table and on the plots


# Panels of the training curves besides the rewards: the length mask's share and the reward-hacking monitors
# (balcaprl.monitors), each a per-step value of the sampled captions.
MONITOR_PANELS = ("length/masked_frac", "monitor/repeated_sentence", "monitor/distinct_2", "monitor/length_drift")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average: element i is the mean of ``values[max(0, i - window + 1) : i + 1]``.

    The first ``window - 1`` elements average the values seen so far, so the output has the input's length and
    starts at the first value; ``window=1`` returns the values unchanged. Used for the training curves of the demo
    and of `balcaprl.experiments.reproduce`. E.g. ``smooth([1, 2, 3, 4, 5], 3) == [1.0, 1.5, 2.0, 3.0, 4.0]``.
    """
    if window < 1:
        raise ValueError(f"smooth: window must be a positive number of steps, got {window}.")
    values = [float(value) for value in values]
    # each window summed afresh (not a running sum, whose rounding drifts): curves are a few thousand points at most
    return [statistics.fmean(values[max(0, index - window + 1) : index + 1]) for index in range(len(values))]


def plot_reward_curves(run_dirs: dict[int, Path], path: Path, window: int = 10) -> Path | None:
    """Training reward curves of every RL seed, one panel per reward: the mean per logged step, faint, under its
    moving average over ``window`` logged steps (`smooth`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = {
        seed: json.loads((d / "trainer_state.json").read_text())["log_history"] for seed, d in run_dirs.items()
    }
    names = sorted({key for logs in histories.values() for log in logs for key in log if key.startswith("rewards/")})
    rewards = [name for name in names if name.endswith("/mean")]
    logged = {key for logs in histories.values() for log in logs for key in log}
    monitors = [name for name in MONITOR_PANELS if name in logged]
    columns = max(len(rewards), len(monitors), 1)
    figure, axes = plt.subplots(2, columns, figsize=(4 * columns, 6.4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis in axes.flat[len(rewards) : columns]:
        axis.set_visible(False)
    for axis in axes[1][len(monitors) :]:
        axis.set_visible(False)
    for axis, name in [*zip(axes[0], rewards), *zip(axes[1], monitors)]:
        for index, (seed, logs) in enumerate(histories.items()):
            points = [(log["step"], log[name]) for log in logs if log.get(name) is not None]
            if not points:
                continue
            steps, values = zip(*points)
            colour = colours[index % len(colours)]
            axis.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
            axis.plot(steps, smooth(values, window), color=colour, linewidth=1.8, label=f"seed {seed}")
        axis.set_title(name.removeprefix("rewards/").removesuffix("/mean"))
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0][0].legend()
    figure.suptitle(
        f"training rewards (top) and monitors (bottom): each step's samples (faint), moving average over {window} "
        "steps"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_heldout_curve(curves: dict[int, list[dict[str, Any]]], path: Path, scenes: int) -> Path:
    """Held-out precision / recall / linguistic / b-CapScore against the RL step, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["precision", "recall", "linguistic", "b_capscore", "objects_named", "objects_right", "repeated_sentence",
            "length_ratio"]  # fmt: skip
    figure, axes = plt.subplots(2, 4, figsize=(16, 6.4))
    for axis, key in zip(axes.flat, keys):
        label = METRIC_LABELS[key]
        for seed, points in curves.items():
            steps = [p["step"] for p in points if key in p]
            axis.plot(steps, [p[key] for p in points if key in p], marker="o", label=f"seed {seed}")
        axis.set_title(label)
        axis.set_xlabel("RL step (0 = stage 1)")
        axis.grid(alpha=0.3)
    axes[0][-1].legend()
    figure.suptitle(f"held-out scores during RL: greedy captions on {scenes} fixed held-out scenes")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_before_after(before: dict, after: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["precision", "recall", "linguistic", "b_capscore"]
    means = [_mean_std([run[key] for run in after]) for key in keys]
    positions = range(len(keys))
    figure, axis = plt.subplots(figsize=(6, 3.2))
    axis.bar([p - 0.2 for p in positions], [before[key] for key in keys], width=0.4, label="stage 1 (SFT)")
    axis.bar([p + 0.2 for p in positions], [m for m, _ in means], width=0.4, yerr=[s for _, s in means],
             label="BalCapRL (mean ± std over seeds)")  # fmt: skip
    axis.set_xticks(list(positions), [METRIC_LABELS[key] for key in keys])
    axis.set_ylim(0, 1)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _heldout_lines(settings: DemoSettings, curve: dict[str, Any]) -> list[str]:
    """The report's section on the held-out curve: the figure, one row per (seed, step), a summary line per seed."""
    lines = [
        "## Held-out scores during RL",
        "",
        f"Greedy captions on the first {curve['scenes']} held-out scenes (the same scenes at every point): step 0 "
        f"is the stage-1 model, then a checkpoint every {curve['checkpoint_steps']} RL steps; the last point of each "
        f"seed is its final model (step {settings.rl_steps} unless the time cap of {settings.rl_max_seconds:g} s "
        "stopped it earlier).",
        "",
        "![held-out scores during RL](heldout_curve.png)",
        "",
        "| seed | step | precision | recall | linguistic | b-CapScore | objects named (rightly) |",
        "|---|---|---|---|---|---|---|",
    ]
    for seed, points in curve["per_seed"].items():
        lines += [
            f"| {seed} | {p['step']} | {p['precision']:.3f} | {p['recall']:.3f} | {p['linguistic']:.3f} "
            f"| {p['b_capscore']:.3f} | {p['objects_named']:.2f} ({p['objects_right']:.2f}) |"
            for p in points
        ]
    lines.append("")
    for seed, points in curve["per_seed"].items():
        best = max(points, key=lambda point: point["b_capscore"])
        lines.append(
            f"- seed {seed}: b-CapScore {points[0]['b_capscore']:.3f} at step 0 → {points[-1]['b_capscore']:.3f} at "
            f"step {points[-1]['step']} (highest {best['b_capscore']:.3f}, at step {best['step']})."
        )
    return [*lines, ""]


def _sample_lines(root: Path, settings: DemoSettings, results: dict[str, Any]) -> list[str]:
    """Sample scenes: the image the model saw (copied next to the report), the reference, the stage-1 and RL
    captions, each with its exact scores, so that a reader can check the captions against the picture."""
    from balcaprl.rewards.world import score_caption

    first_seed = settings.rl_seeds[0]
    (root / "samples").mkdir(exist_ok=True)
    lines = [
        "## Sample captions (held-out scenes)",
        "",
        f"Each image is the scene the models saw ({settings.image_size} px, shown enlarged); the reference is one of "
        "the scene's human-style references, which may omit things. P / R / L: the caption's exact precision, "
        "recall and linguistic scores against the whole scene.",
        "",
    ]
    for index, sample in enumerate(results.get("samples", [])):
        copy = root / "samples" / f"scene_{index}.png"
        sample["image"].save(copy)  # the PIL image of the held-out row, as the model saw it (PNG is lossless)

        def scored(caption: str, scene: dict = sample["scene"]) -> str:
            scores = score_caption(caption, scene)
            return f"“{caption}” (P {scores['precision']:.2f}, R {scores['recall']:.2f}, L {scores['linguistic']:.2f})"

        lines += [
            f"**Scene {index}**",
            "",
            f'<img src="samples/{copy.name}" width="{2 * settings.image_size}" alt="held-out scene {index}">',
            "",
            f"- reference: “{results['test_references'][index][0]}”",
            f"- stage 1: {scored(results['sft']['captions'][index])}",
            f"- BalCapRL (seed {first_seed}): {scored(results['rl'][first_seed]['captions'][index])}",
            "",
        ]
    return lines


def _objects_text(settings: DemoSettings) -> str:
    if settings.min_objects == settings.max_objects:
        return f"{settings.min_objects} object{'s' if settings.min_objects > 1 else ''}"
    return f"{settings.min_objects}–{settings.max_objects} objects"


def write_report(root: Path, settings: DemoSettings, results: dict[str, Any], timings: dict[str, float]) -> Path:
    before, after = results["sft"], [results["rl"][seed] for seed in settings.rl_seeds]
    lines = [
        "# balcaprl demo: BalCapRL on the synthetic shapes world",
        "",
        f"Tiny Qwen2.5-VL ({settings.hidden_size}-wide, {settings.num_layers} layers, {settings.image_size} px "
        f"images), {settings.train_scenes} training scenes, {settings.test_scenes} held-out test scenes; exact "
        f"rewards (`world_precision`, `world_recall`, `world_linguistic`), {settings.advantage_estimator} advantages, "
        f"linguistic masked outside the length window {WINDOW_TEXT}. RL seeds: {list(settings.rl_seeds)}. "
        f"Machine: {os.cpu_count()} CPU cores. Greedy captions on the held-out scenes.",
        "",
        f"World: {_objects_text(settings)} per scene; references in the {', '.join(settings.reference_styles)} "
        f"style{'s' if len(settings.reference_styles) > 1 else ''}, {settings.omission_rate:.0%} of them leaving out "
        f"one {' or '.join(settings.omission_kinds)} that the exact rewards, which see the whole scene, still count"
        + ("; large shapes named before small ones." if settings.large_first else "."),
        "",
        "| metric | stage 1 (SFT) | BalCapRL, mean ± std over seeds | per seed | gain |",
        "|---|---|---|---|---|",
    ]
    for key, label in METRICS:
        mean, std = _mean_std([run[key] for run in after])
        per_seed = ", ".join(f"{run[key]:.3f}" for run in after)
        lines.append(
            f"| {label} | {before[key]:.3f} | {mean:.3f} ± {std:.3f} | {per_seed} | {mean - before[key]:+.3f} |"
        )
    gains = [run["b_capscore"] - before["b_capscore"] for run in after]
    gain_mean, gain_std = _mean_std(gains)
    if min(gains) > 0:
        verdict = "RL improved b-CapScore on every seed"
    elif max(gains) <= 0:
        verdict = "RL did not improve b-CapScore on any seed"
    else:
        verdict = "RL improved b-CapScore on some seeds only"
    lines += [
        "",
        f"**b-CapScore gain of the RL stage: {gain_mean:+.3f} ± {gain_std:.3f}** (mean ± std over {len(gains)} RL "
        f"seeds; per seed: {', '.join(f'{g:+.3f}' for g in gains)}). On this run, {verdict}.",
        "",
        "![before and after](before_after.png)",
        "",
        *_heldout_lines(settings, results["heldout_curve"]),
        "## Training reward curves",
        "",
        f"Faint: the mean reward of each step's {settings.num_generations * settings.rl_prompts_per_step} sampled "
        f"captions; bold: its moving average over {settings.smoothing_window} steps. The linguistic curve is after "
        "masking; `length/masked_frac` is the fraction of sampled captions outside the length window.",
        "",
        "![reward curves](reward_curves.png)",
        "",
        *_sample_lines(root, settings, results),
    ]
    lines += [
        "## Timings",
        "",
        *[f"- {stage}: {seconds:.0f} s" for stage, seconds in timings.items()],
        "",
        "Recipes used: `recipes/sft.yaml`, `recipes/balcaprl_seed*.yaml` in this folder. Settings: "
        f"`{json.dumps(asdict(settings))}`",
    ]
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (root / "results.json").write_text(
        json.dumps(
            {
                "settings": asdict(settings),
                "timings": timings,
                "sft": {k: v for k, v in before.items() if k != "captions"},
                "rl": {
                    str(seed): {k: v for k, v in run.items() if k != "captions"} for seed, run in results["rl"].items()
                },
                "b_capscore_gain": {"mean": gain_mean, "std": gain_std, "per_seed": gains},
                "heldout_curve": {
                    **{key: value for key, value in results["heldout_curve"].items() if key != "per_seed"},
                    "per_seed": {str(seed): points for seed, points in results["heldout_curve"]["per_seed"].items()},
                },
            },
            indent=2,
        )
    )
    return path
