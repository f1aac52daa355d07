"""Both papers' claims at small scale, on the shapes world: ``make reproduce`` (``balcaprl reproduce [--quick]``).

One stage-1 checkpoint, then RL runs with equal budgets of sampled captions (same steps, prompts and G), several
seeds each, evaluated by greedy captions on held-out scenes:

- **GRPO for captioning** (arXiv 2503.01333): SCST vs GRPO (G = 5), CIDEr-D reward → held-out CIDEr-D.
- **BalCapRL** (arXiv 2605.07394): summed GRPO vs c-GDPO over the three exact world rewards → b-CapScore.
- **length control** (BalCapRL ablation): none vs a linear ``length_penalty`` vs the length-conditional mask, with
  c-GDPO → length-ratio distribution and b-CapScore.

The table reports mean ± std over seeds, whichever way it comes out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from balcaprl.demo import (
    WINDOW_TEXT,
    WORLD_REWARDS,
    DemoSettings,
    _log,
    evaluate_model,
    prepare_world,
    rl_recipe,
    run_entry_point,
    sft_recipe,
    wait_for,
    write_recipe,
)
from balcaprl.length import DEFAULT_WINDOW


@dataclass(frozen=True)
class Arm:
    """One RL configuration of an experiment."""

    name: str
    experiment: str
    label: str
    overrides: tuple  # (key, value) pairs over the demo's RL recipe


CIDER = {"reward_funcs": ["cider_d"], "length_mask_rewards": [], "num_generations": 5}
ARMS = [
    Arm("scst_cider", "cider", "SCST (sample − greedy)", tuple({**CIDER, "advantage_estimator": "scst"}.items())),
    Arm(
        "grpo_cider",
        "cider",
        "GRPO, G = 5, KL 0.04",
        tuple({**CIDER, "advantage_estimator": "grpo", "beta": 0.04}.items()),
    ),
    Arm("grpo_sum", "balcap", "summed GRPO", (("advantage_estimator", "grpo"),)),
    Arm("c_gdpo", "balcap", "c-GDPO", (("advantage_estimator", "c_gdpo"),)),
    Arm("no_length_control", "length", "no length control", (("length_mask_rewards", []),)),
    Arm(
        "length_penalty",
        "length",
        "linear length penalty",
        (("reward_funcs", [*WORLD_REWARDS, "length_penalty"]), ("length_mask_rewards", [])),
    ),
    # Same configuration as the c-GDPO arm (the demo's defaults): its runs are reused, not repeated.
    Arm("length_mask", "length", "length-conditional mask", ()),
]
EXPERIMENTS = {
    "cider": ("GRPO vs SCST, CIDEr-D reward (arXiv 2503.01333)", "cider_d"),
    "balcap": ("c-GDPO vs summed GRPO, world precision / recall / linguistic (arXiv 2605.07394)", "b_capscore"),
    "length": ("length control with c-GDPO (BalCapRL ablation)", "b_capscore"),
}
METRICS = ["precision", "recall", "linguistic", "b_capscore", "cider_d", "length_ratio", "masked_fraction"]


@dataclass
class ReproduceSettings:
    base: DemoSettings
    seeds: tuple[int, ...] = (0, 1, 2)
    parallel: int = 2


def full_settings(output_dir: str) -> ReproduceSettings:
    return ReproduceSettings(DemoSettings(output_dir=output_dir, rl_max_seconds=600.0, sft_max_seconds=600.0))


def quick_settings(output_dir: str) -> ReproduceSettings:
    base = DemoSettings(
        output_dir=output_dir, train_scenes=128, test_scenes=24, sft_steps=30, sft_batch_size=16, rl_steps=6,
        max_completion_length=24, eval_batch_size=24, rl_max_seconds=120.0, sft_max_seconds=120.0,
    )  # fmt: skip
    return ReproduceSettings(base, seeds=(0, 1))


def run_arms(settings: ReproduceSettings, train: Path, sft_dir: Path, root: Path) -> dict[tuple[str, int], Path]:
    """All (arm, seed) RL runs, ``parallel`` at a time; the mask arm reuses the c-GDPO runs (same configuration)."""
    jobs = [(arm, seed) for arm in ARMS if arm.name != "length_mask" for seed in settings.seeds]
    run_dirs: dict[tuple[str, int], Path] = {}
    for start in range(0, len(jobs), settings.parallel):
        processes, logs = {}, {}
        for arm, seed in jobs[start : start + settings.parallel]:
            run_dir = root / "runs" / f"{arm.name}_seed{seed}"
            recipe = {**rl_recipe(settings.base, train, sft_dir, run_dir, seed), **dict(arm.overrides)}
            recipe["per_device_train_batch_size"] = recipe["num_generations"] * settings.base.rl_prompts_per_step
            path = write_recipe(root / "recipes" / f"{arm.name}_seed{seed}.yaml", recipe, f"reproduce: {arm.label}")
            key = f"{arm.name} seed {seed}"
            logs[key] = root / "runs" / f"{arm.name}_seed{seed}.log"
            logs[key].parent.mkdir(parents=True, exist_ok=True)
            processes[key] = run_entry_point("train", path, logs[key])
            run_dirs[(arm.name, seed)] = run_dir
        _log(f"runs {start + 1}-{start + len(processes)} of {len(jobs)}: {', '.join(processes)}")
        wait_for(processes, logs, settings.base.rl_steps)
    for seed in settings.seeds:
        run_dirs[("length_mask", seed)] = run_dirs[("c_gdpo", seed)]
    return run_dirs


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def write_results(root: Path, settings: ReproduceSettings, sft: dict, results: dict, seconds: float) -> Path:
    """``results.md`` (tables per experiment) and ``results.json``; plots beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        "# balcaprl reproduce: both papers' claims on the shapes world",
        "",
        f"Stage 1 shared by every arm; RL arms with equal budgets ({settings.base.rl_steps} steps × "
        f"{settings.base.rl_prompts_per_step} prompts; G = 5 for the CIDEr-D arms, 8 for the others); seeds "
        f"{list(settings.seeds)}; {settings.base.test_scenes} held-out scenes, greedy captions. "
        f"{os.cpu_count()} CPU cores, {seconds / 60:.1f} min in all. Mean ± std over seeds.",
        "",
    ]
    header = "| arm | " + " | ".join(METRICS) + " |"
    for experiment, (title, key_metric) in EXPERIMENTS.items():
        lines += [f"## {title}", "", f"Key metric: `{key_metric}`.", "", header, "|---" * (len(METRICS) + 1) + "|"]
        lines.append("| stage 1 (SFT) | " + " | ".join(f"{sft[m]:.3f}" for m in METRICS) + " |")
        for arm in (arm for arm in ARMS if arm.experiment == experiment):
            runs = [results[(arm.name, seed)] for seed in settings.seeds]
            lines.append(f"| {arm.label} | " + " | ".join(_mean_std([run[m] for run in runs]) for m in METRICS) + " |")
        lines.append("")
    # length-ratio distribution of the length-control arms
    figure, axis = plt.subplots(figsize=(6, 3.2))
    for arm in (arm for arm in ARMS if arm.experiment == "length"):
        ratios = [ratio for seed in settings.seeds for ratio in results[(arm.name, seed)]["ratios"]]
        axis.hist(ratios, bins=30, range=(0, 3), histtype="step", linewidth=1.5, label=arm.label)
    axis.axvspan(*DEFAULT_WINDOW, color="green", alpha=0.08, label=f"window {WINDOW_TEXT}")
    axis.set_xlabel("caption length / reference length")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(root / "length_ratios.png", dpi=110)
    plt.close(figure)
    lines += ["![length ratios](length_ratios.png)", ""]
    path = root / "results.md"
    path.write_text("\n".join(lines))
    serialisable = {f"{arm}/seed{seed}": {k: v for k, v in run.items() if k not in ("captions", "ratios")}
                    for (arm, seed), run in results.items()}  # fmt: skip
    (root / "results.json").write_text(
        json.dumps({"settings": asdict(settings), "sft": sft, "runs": serialisable, "seconds": seconds}, indent=2)
    )
    return path


def run_reproduce(settings: ReproduceSettings) -> Path:
    from balcaprl.data import corpus_references, load_caption_dataset
    from balcaprl.length import length_ratios
    from balcaprl.world import read_jsonl

    root = Path(settings.base.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    _log("world data, tiny model, stage 1")
    train, test, base_model = prepare_world(settings.base, root)
    sft_dir = root / "sft"
    recipe = write_recipe(root / "recipes" / "sft.yaml", sft_recipe(settings.base, train, base_model, sft_dir), "sft")
    if run_entry_point("sft", recipe).wait() != 0:
        raise RuntimeError(f"Stage 1 failed; run `python -m balcaprl.sft --config {recipe}` to see why.")
    run_dirs = run_arms(settings, train, sft_dir, root)

    _log("evaluation on the held-out scenes")
    test_rows = read_jsonl(test)
    corpus = corpus_references(load_caption_dataset(train))
    references = [row["references"] for row in test_rows]

    def evaluate(path: Path) -> dict:
        result = evaluate_model(path, test_rows, corpus, settings.base.eval_batch_size)
        result["ratios"] = length_ratios(result["captions"], references).tolist()
        return result

    sft = {k: v for k, v in evaluate(sft_dir).items() if k not in ("captions", "ratios")}
    evaluated: dict[Path, dict] = {}
    results = {}
    for key, path in run_dirs.items():
        if path not in evaluated:
            evaluated[path] = evaluate(path)
        results[key] = evaluated[path]
    path = write_results(root, settings, sft, results, time.monotonic() - started)
    _log(f"done in {(time.monotonic() - started) / 60:.1f} min: {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="balcaprl reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/reproduce")
    parser.add_argument("--quick", action="store_true", help="a small budget (a few minutes), as CI runs it")
    parser.add_argument("--seeds", type=int, nargs="+", help="RL seeds (default: 0 1 2, or 0 1 with --quick)")
    args = parser.parse_args(argv)
    settings = (quick_settings if args.quick else full_settings)(args.output_dir)
    if args.seeds:
        settings = replace(settings, seeds=tuple(args.seeds))
    run_reproduce(settings)


if __name__ == "__main__":
    main()
