"""Tables, computed verdicts and plots of `balcaprl.experiments.reproduce`: ``results.md``, ``results.json`` and the
figures."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from balcaprl.experiments.claims import (
    Interval,
    bootstrap_difference,
    bootstrap_value,
    observed_value,
)
from balcaprl.experiments.demo_report import WINDOW_TEXT, smooth
from balcaprl.experiments.reproduce_arms import (
    ARMS_BY_NAME,
    EXPERIMENTS,
    LINGUISTIC_AS_JUDGED,
    REUSED,
    SCENE_COLUMNS,
    VALIDATION_FILE,
    ReproduceSettings,
)
from balcaprl.experiments.reproduce_verdicts import (
    MARGINS,
    arm_columns,
    compute_verdicts,
    curve,
    reward_noise,
    stage1_columns,
    training_mean,
)
from balcaprl.length import DEFAULT_WINDOW
from balcaprl.monitors import distinct_ngrams

EXPERIMENT_SHORT = {"cider": "CIDEr-D reward", "balcap": "world rewards + mask", "length": "c-GDPO, length control"}


WORLD_PANELS = ("world_precision", "world_recall", "world_linguistic")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rated(arm: str) -> bool:
    """Whether the arm trains on linguistic as a judge's rating rather than the exact score."""
    return LINGUISTIC_AS_JUDGED in dict(ARMS_BY_NAME[arm].overrides).get("reward_funcs", [])


def plot_reward_curves(runs: dict, settings: ReproduceSettings, path: Path) -> Path:
    """Smoothed training curves per arm (mean over seeds), the raw per-step mean faint behind each."""
    plt = _pyplot()
    window = max(1, settings.base.rl_steps // 12)
    panels = {
        "cider": ["rewards/cider_d/mean", "advantages/distinct_per_group"],
        "world": [f"rewards/{name}/mean" for name in WORLD_PANELS] + ["advantages/distinct_per_group"],
    }
    figure, axes = plt.subplots(2, 4, figsize=(18, 7))
    for row, (group, keys) in enumerate(panels.items()):
        arms = [arm for arm in settings.arms if (ARMS_BY_NAME[arm].experiment == "cider") == (group == "cider")]
        arms = [arm for arm in arms if arm not in REUSED]
        for axis, key in zip(axes[row], keys):
            for index, arm in enumerate(arms):
                curves = [curve(runs[(arm, seed)]["log_history"], key) for seed in settings.seeds]
                if not curves[0][0]:
                    continue
                steps = curves[0][0]
                values = np.mean([values for _, values in curves], axis=0)
                if key.endswith("world_linguistic/mean") and rated(arm):
                    low, high = LINGUISTIC_AS_JUDGED["rating_scale"]
                    values = (values - low) / (high - low)  # a rating on the [0, 1] scale of the others
                colour = f"C{index}"
                axis.plot(steps, values, color=colour, alpha=0.2, linewidth=0.8)
                axis.plot(steps, smooth(list(values), window), color=colour, label=ARMS_BY_NAME[arm].label)
            title = key.removeprefix("rewards/").removesuffix("/mean")
            axis.set_title(title + (" (ratings mapped to [0, 1])" if title == "world_linguistic" else ""), fontsize=9)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7)
    axes[0][2].axis("off")
    axes[0][3].axis("off")
    figure.suptitle(
        f"training curves, mean over {len(settings.seeds)} seeds (faint: raw per step; bold: moving "
        f"average of {window} steps)",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_objective_gains(gains: dict[str, dict[str, Interval]], path: Path) -> Path:
    plt = _pyplot()
    metrics = ["precision", "recall", "linguistic", "b_capscore"]
    figure, axis = plt.subplots(figsize=(8, 3.4))
    width = 0.8 / max(1, len(gains))
    for index, (arm, intervals) in enumerate(gains.items()):
        positions = [m + (index - (len(gains) - 1) / 2) * width for m in range(len(metrics))]
        estimates = [intervals[m].estimate for m in metrics]
        errors = [
            [intervals[m].estimate - intervals[m].low for m in metrics],
            [intervals[m].high - intervals[m].estimate for m in metrics],
        ]
        axis.bar(positions, estimates, width=width, yerr=errors, capsize=2, label=ARMS_BY_NAME[arm].label)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks(range(len(metrics)), ["precision", "recall", "linguistic", "b-CapScore"])
    axis.set_ylabel("gain over stage 1")
    axis.set_title("per-objective gains on held-out scenes (95 % bootstrap intervals)", fontsize=10)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_length_ratios(runs: dict, settings: ReproduceSettings, sft: dict, path: Path) -> Path:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 3.2))
    axis.hist(
        sft["length_ratio"], bins=30, range=(0, 3), histtype="step", linewidth=1.2, color="grey", label="stage 1 (SFT)"
    )
    for arm in (arm for arm in settings.arms if ARMS_BY_NAME[arm].experiment == "length"):
        ratios = [ratio for seed in settings.seeds for ratio in runs[(arm, seed)]["evaluation"]["length_ratio"]]
        axis.hist(
            ratios,
            bins=30,
            range=(0, 3),
            histtype="step",
            linewidth=1.5,
            density=False,
            weights=np.full(len(ratios), 1 / len(settings.seeds)),
            label=ARMS_BY_NAME[arm].label,
        )
    axis.axvspan(*DEFAULT_WINDOW, color="green", alpha=0.08, label=f"window {WINDOW_TEXT}")
    axis.set_xlabel("caption length / reference length (held-out scenes, per seed)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _seed_mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"


def write_results(root: Path, settings: ReproduceSettings, sft: dict, runs: dict, sweeps: dict, summary: dict) -> Path:
    """``results.md`` (verdicts, tables), ``results.json`` and the plots; returns the path of ``results.md``."""
    draws, seeds = settings.bootstrap_draws, settings.seeds
    base = settings.base
    stage1 = stage1_columns(sft)
    verdicts = compute_verdicts(runs, settings, draws, sft)
    values = {
        arm: {
            metric: bootstrap_value(arm_columns(runs, arm, seeds), metric, draws)
            for metric in ("cider_d", "b_capscore")
        }
        for arm in settings.arms
    }
    per_seed = {
        arm: {seed: {c: float(np.mean(runs[(arm, seed)]["evaluation"][c])) for c in SCENE_COLUMNS} for seed in seeds}
        for arm in settings.arms
    }
    lines = [
        "# balcaprl reproduce: when do the papers' claims hold on the shapes world?",
        "",
        f"Run on {summary['date']} by `make reproduce`: one stage-1 model ({base.sft_steps} steps), then "
        f"RL arms of {base.rl_steps} steps × {base.rl_prompts_per_step} prompts (G = 5 for the CIDEr-D arms, "
        f"{base.num_generations} for the others; equal sampled-caption budgets within an experiment), seeds "
        f"{list(seeds)}, greedy captions on {base.test_scenes} held-out scenes. Step budgets, no wall-clock caps: "
        f"the same command gives the same numbers on one machine. "
        f"{summary['machine']['cpu_count']} CPU cores, {summary['seconds'] / 60:.1f} min wall-clock, "
        f"{summary['cpu_seconds'] / 60:.1f} CPU-minutes.",
        "",
        "Intervals are 95 % bootstrap percentile intervals over held-out scenes (paired across arms) and seeds "
        "(`balcaprl.experiments.claims`); each verdict is computed from the interval of its difference: "
        "**holds** (above 0), "
        "**does not hold** (below 0, or inside ±margin: "
        + ", ".join(f"{quantity} {margin:g}" for quantity, margin in MARGINS.items())
        + "), **cannot tell at this scale** (otherwise).",
        "",
        "## Verdicts",
        "",
        *[f"- {claim['line']}" for claim in verdicts],
        "",
    ]
    for experiment, title in EXPERIMENTS.items():
        arms = [arm for arm in settings.arms if ARMS_BY_NAME[arm].experiment == experiment]
        if not arms:
            continue
        lines += [f"## {title}", "", "Mean over seeds (± seed std for the unbracketed columns).", ""]
        lines += _metric_table(arms, sft, values, per_seed, seeds, experiment_column=False)
        lines.append("")
        if experiment == "cider":
            stage1_validation = float(np.mean(json.loads((root / "sft" / VALIDATION_FILE).read_text())["cider_d"]))
            lines += _cider_tables(runs, settings, sweeps, stage1_validation)
        if experiment == "balcap":
            gains = {
                arm: {
                    m: bootstrap_difference(arm_columns(runs, arm, seeds), stage1, m, draws)
                    for m in ("precision", "recall", "linguistic", "b_capscore")
                }
                for arm in arms
            }
            lines += _gain_table(runs, settings, arms, gains)
            plot_objective_gains(gains, root / "objective_gains.png")
            lines += ["![per-objective gains](objective_gains.png)", ""]
        if experiment == "length":
            plot_length_ratios(runs, settings, sft, root / "length_ratios.png")
            lines += ["![length ratios](length_ratios.png)", ""]
    plot_reward_curves(runs, settings, root / "reward_curves.png")
    lines += ["## Training curves", "", "![reward curves](reward_curves.png)", ""]
    lines += [
        "## Determinism",
        "",
        "Every run has a fixed step budget; data, model initialisation and sampling are seeded, and each process "
        "computes on one thread (`OMP_NUM_THREADS=1`), so two runs on one machine give identical tables (the test "
        "suite checks this on `--quick`). Across machines the numbers can still differ: float summation order "
        "depends on the CPU's vector instructions (AVX2 vs AVX-512 kernels in PyTorch and oneDNN/MKL) and on the "
        "library versions, and sampled RL amplifies a last-bit difference into different captions.",
        "",
        "Recipes: `recipes/*.yaml`; per-run logs: `logs/`; per-scene scores: `runs/*/evaluation.json`.",
    ]
    path = root / "results.md"
    path.write_text("\n".join(lines) + "\n")
    document = {
        "settings": asdict(settings),
        **{key: summary[key] for key in ("date", "machine", "seconds", "cpu_seconds")},
        "sft": {c: float(np.mean(sft[c])) for c in SCENE_COLUMNS},
        "runs": {f"{arm}/seed{seed}": per_seed[arm][seed] for arm in settings.arms for seed in seeds},
        "intervals": {arm: {m: asdict(i) for m, i in values[arm].items()} for arm in settings.arms},
        "sweeps": {
            name: {
                "validation_cider_d": {f"{lr:g}": v for lr, v in sweep["validation_cider_d"].items()},
                "chosen": sweep["chosen"],
            }
            for name, sweep in sweeps.items()
        },
        "verdicts": verdicts,
    }
    (root / "results.json").write_text(json.dumps(document, indent=2))
    section = results_section(settings, sft, values, per_seed, verdicts, sweeps, summary)
    (root / "results_section.md").write_text(section)
    return path


def _metric_table(arms: list[str], sft: dict, values: dict, per_seed: dict, seeds: tuple,
                  experiment_column: bool) -> list[str]:  # fmt: skip
    """Stage 1 and the arms: CIDEr-D and b-CapScore with intervals, the rest as mean ± seed std."""
    lead = "| experiment " if experiment_column else ""
    lines = [
        f"{lead}| arm | CIDEr-D [95 % CI] | b-CapScore [95 % CI] | precision | recall | linguistic | length ratio | "
        f"outside {WINDOW_TEXT} |",
        "|---" * (8 + experiment_column) + "|",
        ("| " if experiment_column else "")
        + f"| stage 1 (SFT) | {np.mean(sft['cider_d']):.3f} | "
        + f"{observed_value(stage1_columns(sft), 'b_capscore'):.3f} | "
        + " | ".join(f"{np.mean(sft[c]):.3f}" for c in SCENE_COLUMNS if c != "cider_d")
        + " |",
    ]
    previous = None
    for arm in arms:
        cells = [values[arm]["cider_d"].format(), values[arm]["b_capscore"].format()]
        cells += [
            _seed_mean_std([per_seed[arm][seed][c] for seed in seeds])
            for c in ("precision", "recall", "linguistic", "length_ratio", "outside_window")
        ]
        experiment = ARMS_BY_NAME[arm].experiment
        first = f"| {EXPERIMENT_SHORT[experiment] if experiment != previous else ''} " if experiment_column else ""
        previous = experiment
        lines.append(f"{first}| {ARMS_BY_NAME[arm].label} | " + " | ".join(cells) + " |")
    return lines


def results_section(settings: ReproduceSettings, sft: dict, values: dict, per_seed: dict, verdicts: list,
                   sweeps: dict, summary: dict) -> str:  # fmt: skip
    """The reproduction results of docs/reproduction.md, generated from the run (``--update-docs`` pastes it in)."""
    base = settings.base
    chosen = ", ".join(f"{name} {sweep['chosen']:g}" for name, sweep in sweeps.items())
    lines = [
        f"Measured by `make reproduce` on {summary['date']}: {summary['machine']['cpu_count']} CPU cores, "
        f"{summary['seconds'] / 60:.1f} min ({summary['cpu_seconds'] / 60:.1f} CPU-minutes); {len(settings.seeds)} "
        f"seeds per arm, {base.rl_steps} RL steps × {base.rl_prompts_per_step} prompts, {base.test_scenes} held-out "
        f"scenes, greedy captions" + (f"; learning rates chosen by the sweep: {chosen}" if chosen else "") + ".",
        "Computed verdicts (95 % bootstrap intervals over scenes and seeds):",
        "",
        *[f"- {claim['line']}" for claim in verdicts],
        "",
        *_metric_table(
            sorted(settings.arms, key=lambda arm: list(EXPERIMENTS).index(ARMS_BY_NAME[arm].experiment)),
            sft,
            values,
            per_seed,
            settings.seeds,
            True,
        ),
    ]
    return "\n".join(lines) + "\n"


RESULTS_MARKERS = ("<!-- reproduce:start -->", "<!-- reproduce:end -->")


def update_results_page(page: Path, section: str) -> None:
    """Replace the text between the page's reproduce markers with ``section`` (the rest of the page is kept)."""
    text = page.read_text()
    start, end = RESULTS_MARKERS
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{page} needs exactly one {start} ... {end} block for the reproduction results.")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    page.write_text(f"{head}{start}\n{section}{end}{tail}")


def _cider_tables(runs: dict, settings: ReproduceSettings, sweeps: dict, stage1_validation: float) -> list[str]:
    seeds = settings.seeds
    arms = [arm for arm in settings.arms if ARMS_BY_NAME[arm].experiment == "cider"]
    lines = []
    if sweeps:
        rates = settings.sweep_learning_rates
        lines += [
            f"Learning-rate sweep (validation CIDEr-D, {settings.sweep_steps} steps, seeds "
            f"{list(settings.sweep_seeds)}, {settings.validation_scenes} validation scenes; the best is used):",
            "",
            "| swept configuration | stage 1 | " + " | ".join(f"lr {lr:g}" for lr in rates) + " | chosen |",
            "|---" * (len(rates) + 3) + "|",
        ]
        for name, sweep in sweeps.items():
            cells = [f"{stage1_validation:.3f}", *(f"{sweep['validation_cider_d'][lr]:.3f}" for lr in rates)]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {sweep['chosen']:g} |")
        lines.append("")
    lines += [
        "Stability and diversity (mean over seeds; seed std of CIDEr-D; training-reward noise = std of the per-step "
        "change of the mean training CIDEr-D / √2; distinct-n over the held-out captions):",
        "",
        "| arm | learning rate | seed std of CIDEr-D | training-reward noise | distinct-1 | distinct-2 |",
        "|---|---|---|---|---|---|",
    ]
    for arm in arms:
        group = [runs[(arm, seed)] for seed in seeds]
        ciders = [float(np.mean(run["evaluation"]["cider_d"])) for run in group]
        sweep = ARMS_BY_NAME[arm].sweep
        lr = sweeps[sweep]["chosen"] if sweep in sweeps else settings.base.rl_learning_rate
        lines.append(
            f"| {ARMS_BY_NAME[arm].label} | {lr:g} | {np.std(ciders, ddof=1) if len(ciders) > 1 else 0:.3f} | "
            f"{np.mean([reward_noise(r['log_history'], 'rewards/cider_d/mean') for r in group]):.4f} | "
            f"{np.mean([distinct_ngrams(r['evaluation']['captions'], 1) for r in group]):.3f} | "
            f"{np.mean([distinct_ngrams(r['evaluation']['captions'], 2) for r in group]):.3f} |"
        )
    return [*lines, ""]


def _gain_table(runs: dict, settings: ReproduceSettings, arms: list[str], gains: dict) -> list[str]:
    lines = [
        "Per-objective gains over stage 1 [95 % CI] and, over training, the mean of `advantages/distinct_per_group` "
        "(distinct advantage values per group: how finely the estimator ranks a group's captions) and of "
        "`frac_reward_zero_std`:",
        "",
        "| arm | Δ precision | Δ recall | Δ linguistic | Δ b-CapScore | distinct_per_group | frac_reward_zero_std |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        history = [runs[(arm, seed)]["log_history"] for seed in settings.seeds]
        cells = [gains[arm][m].format(signed=True) for m in ("precision", "recall", "linguistic", "b_capscore")]
        cells += [
            f"{np.mean([training_mean(h, key) for h in history]):.2f}"
            for key in ("advantages/distinct_per_group", "frac_reward_zero_std")
        ]
        lines.append(f"| {ARMS_BY_NAME[arm].label} | " + " | ".join(cells) + " |")
    return [*lines, ""]
