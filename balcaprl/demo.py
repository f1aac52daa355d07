"""The main job on a laptop CPU: ``make demo`` (``balcaprl demo``), in about five minutes on 2 cores.

On the synthetic shapes world (`balcaprl.world`), where every caption can be scored exactly:

1. data: seeded train / held-out test scenes with references that, like human captions, sometimes omit things;
2. model: a tiny Qwen2.5-VL built offline, its tokenizer trained on the world's captions;
3. stage 1: cross-entropy fine-tuning on the references (``balcaprl sft`` with a generated recipe);
4. stage 2: BalCapRL — c-GDPO over the exact precision / recall / linguistic rewards, linguistic masked outside
   the length window — for several seeds in parallel (``balcaprl train`` with generated recipes);
5. evaluation of the stage-1 model and of every RL seed on the held-out scenes (greedy captions), and
   ``report.md`` with the before/after table, the gain and its spread over seeds, sample captions and reward curves.

Stages run through the same entry points and recipes as a GPU run; the recipes are written next to the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from balcaprl.length import DEFAULT_WINDOW, length_conditional_mask, length_ratios
from balcaprl.rewards.world import WORLD_REWARDS

WINDOW_TEXT = f"[{DEFAULT_WINDOW[0]:g}, {DEFAULT_WINDOW[1]:g}]"
# The RL recipes log every RL_LOGGING_STEPS steps; the progress bar counts those log lines.
RL_LOGGING_STEPS = 5


@dataclass
class DemoSettings:
    """Sizes and budgets of the demo; the defaults fit in about five minutes on 2 CPU cores."""

    output_dir: str = "runs/demo"
    seed: int = 0
    train_scenes: int = 3000
    test_scenes: int = 200
    # model (see balcaprl.tiny.build_tiny_qwen2_5_vl)
    hidden_size: int = 128
    num_layers: int = 4
    vision_hidden_size: int = 64
    image_size: int = 112
    # stage 1
    sft_steps: int = 360
    sft_batch_size: int = 32
    sft_learning_rate: float = 2e-3
    sft_max_seconds: float = 170.0
    # stage 2
    rl_seeds: tuple[int, ...] = (0, 1)
    rl_steps: int = 120
    rl_prompts_per_step: int = 2
    num_generations: int = 8
    max_completion_length: int = 40
    rl_learning_rate: float = 5e-5
    rl_max_seconds: float = 75.0
    advantage_estimator: str = "c_gdpo"
    reward_funcs: list = field(default_factory=lambda: list(WORLD_REWARDS))
    length_mask_rewards: list = field(default_factory=lambda: ["world_linguistic"])
    # evaluation
    eval_batch_size: int = 50
    samples_in_report: int = 6


def _log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------------------- stages


def prepare_world(settings: DemoSettings, root: Path) -> tuple[Path, Path, Path]:
    """Train / test JSONL files of the world and a tiny Qwen2.5-VL whose tokenizer knows the world's words."""
    from balcaprl.tiny import build_tiny_qwen2_5_vl
    from balcaprl.world import make_split, world_corpus, write_jsonl

    train = write_jsonl(make_split("train", settings.train_scenes, seed=settings.seed), root / "data" / "train")
    test = write_jsonl(make_split("test", settings.test_scenes, seed=settings.seed), root / "data" / "test")
    model = build_tiny_qwen2_5_vl(
        root / "base_model",
        hidden_size=settings.hidden_size,
        num_layers=settings.num_layers,
        vision_hidden_size=settings.vision_hidden_size,
        image_size=settings.image_size,
        corpus=world_corpus(seed=settings.seed),
        vocab_size=400,
        seed=settings.seed,
    )
    return train, test, model


def sft_recipe(settings: DemoSettings, train: Path, model: Path, output_dir: Path) -> dict[str, Any]:
    return {
        "model_name_or_path": str(model),
        "dataset": str(train),
        "output_dir": str(output_dir),
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "use_peft": False,
        "per_device_train_batch_size": settings.sft_batch_size,
        "learning_rate": settings.sft_learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 10,
        "max_steps": settings.sft_steps,
        "max_train_seconds": settings.sft_max_seconds,
        "max_length": None,
        "sft_references": "all",
        "logging_steps": 20,
        "save_strategy": "no",
        "report_to": "none",
        "seed": settings.seed,
        "env": {"OMP_NUM_THREADS": "1"},
    }


def rl_recipe(settings: DemoSettings, train: Path, sft_model: Path, output_dir: Path, seed: int) -> dict[str, Any]:
    return {
        "model_name_or_path": str(sft_model),
        "dataset": str(train),
        "output_dir": str(output_dir),
        "reward_funcs": list(settings.reward_funcs),
        "advantage_estimator": settings.advantage_estimator,
        "length_mask_rewards": list(settings.length_mask_rewards),
        "length_mask_window": list(DEFAULT_WINDOW),
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "use_peft": False,
        "num_generations": settings.num_generations,
        "per_device_train_batch_size": settings.num_generations * settings.rl_prompts_per_step,
        "max_completion_length": settings.max_completion_length,
        "temperature": 1.0,
        "beta": 0.0,
        "learning_rate": settings.rl_learning_rate,
        "lr_scheduler_type": "constant",
        "max_steps": settings.rl_steps,
        "max_train_seconds": settings.rl_max_seconds,
        "logging_steps": RL_LOGGING_STEPS,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": seed,
        "env": {"OMP_NUM_THREADS": "1"},
    }


def write_recipe(path: Path, recipe: dict[str, Any], comment: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {comment}\n" + yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_entry_point(module: str, recipe: Path, log_file: Path | None = None) -> subprocess.Popen:
    """``python -m balcaprl.<module> --config RECIPE`` in a child process (the path a user's launch takes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    output = open(log_file, "w") if log_file is not None else None  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", f"balcaprl.{module}", "--config", str(recipe)],
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT if output else None,
    )


def wait_for(processes: dict[str, subprocess.Popen], logs: dict[str, Path], total_steps: int) -> None:
    """Wait for parallel runs, with one progress bar over all of them (read from their logged steps)."""
    from tqdm.auto import tqdm

    with tqdm(total=total_steps * len(processes), desc="RL (all seeds)", unit="step") as bar:
        while any(process.poll() is None for process in processes.values()):
            time.sleep(0.5)
            done = sum(min(total_steps, logs[name].read_text().count("'loss'") * RL_LOGGING_STEPS) for name in logs)
            bar.update(done - bar.n)
        bar.update(bar.total - bar.n)
    failed = {name: process.returncode for name, process in processes.items() if process.returncode}
    if failed:
        details = "\n".join(f"--- {name}:\n{logs[name].read_text()[-3000:]}" for name in failed)
        raise RuntimeError(f"RL runs failed: {failed}\n{details}")


# ----------------------------------------------------------------------------------------------------- evaluation


def evaluate_model(model_path: Path, rows: list[dict], corpus: list[list[str]], batch_size: int) -> dict[str, Any]:
    """Greedy captions on the held-out rows and their exact scores (means), b-CapScore, CIDEr-D and lengths."""
    from balcaprl.evaluate import harmonic_mean
    from balcaprl.generation import generate_captions, load_for_generation
    from balcaprl.rewards import CiderD
    from balcaprl.rewards.world import score_caption

    model, processor = load_for_generation(model_path)
    captions = generate_captions(model, processor, [row["image"] for row in rows], batch_size=batch_size)
    scores = [score_caption(caption, row["scene"]) for caption, row in zip(captions, rows)]
    means = {name: statistics.fmean(score[name] for score in scores) for name in ("precision", "recall", "linguistic")}
    references = [row["references"] for row in rows]
    ratios = length_ratios(captions, references)
    return {
        **means,
        "b_capscore": harmonic_mean([means["precision"], means["recall"], means["linguistic"]]),
        "cider_d": statistics.fmean(CiderD(corpus).score(captions, references)),
        "length_ratio": float(ratios.mean()),
        "masked_fraction": float((~length_conditional_mask(ratios)).double().mean()),
        "captions": captions,
    }


# --------------------------------------------------------------------------------------------------------- report

METRICS = [
    ("precision", "precision"),
    ("recall", "recall"),
    ("linguistic", "linguistic"),
    ("b_capscore", "b-CapScore"),
    ("cider_d", "CIDEr-D"),
    ("length_ratio", "mean length ratio"),
    ("masked_fraction", f"outside {WINDOW_TEXT}"),
]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def plot_reward_curves(run_dirs: dict[int, Path], path: Path) -> Path | None:
    """Training reward curves (mean per logging step) of every RL seed, one panel per reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = {
        seed: json.loads((d / "trainer_state.json").read_text())["log_history"] for seed, d in run_dirs.items()
    }
    names = sorted({key for logs in histories.values() for log in logs for key in log if key.startswith("rewards/")})
    names = [name for name in names if name.endswith("/mean")] + ["length/masked_frac"]
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2))
    for axis, name in zip(axes, names):
        for seed, logs in histories.items():
            points = [(log["step"], log[name]) for log in logs if name in log]
            axis.plot(*zip(*points), label=f"seed {seed}") if points else None
        axis.set_title(name.removeprefix("rewards/").removesuffix("/mean"))
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].legend()
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
    axis.set_xticks(list(positions), ["precision", "recall", "linguistic", "b-CapScore"])
    axis.set_ylim(0, 1)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


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
        "Training reward curves (mean reward per logging step; the linguistic curve is after masking):",
        "",
        "![reward curves](reward_curves.png)",
        "",
        "## Sample captions (held-out scenes)",
        "",
    ]
    first_seed = settings.rl_seeds[0]
    for index in range(min(settings.samples_in_report, len(results["test_references"]))):
        lines += [
            f"**Scene {index}** — reference: “{results['test_references'][index][0]}”",
            f"- stage 1: “{before['captions'][index]}”",
            f"- BalCapRL (seed {first_seed}): “{results['rl'][first_seed]['captions'][index]}”",
            "",
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
            },
            indent=2,
        )
    )
    return path


# ----------------------------------------------------------------------------------------------------------- main


def run_demo(settings: DemoSettings) -> Path:
    """Run the whole demo; returns the path of ``report.md``."""
    from balcaprl.data import corpus_references, load_caption_dataset
    from balcaprl.world import read_jsonl

    root = Path(settings.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.monotonic()

    _log("1/5 world data and a tiny Qwen2.5-VL (built offline)")
    train, test, base_model = prepare_world(settings, root)
    timings["data + model"] = time.monotonic() - started

    _log(f"2/5 stage 1: cross-entropy on the references ({settings.sft_steps} steps max)")
    stage_start = time.monotonic()
    sft_dir = root / "sft"
    recipe = write_recipe(
        root / "recipes" / "sft.yaml", sft_recipe(settings, train, base_model, sft_dir), "demo stage 1"
    )
    if run_entry_point("sft", recipe).wait() != 0:
        raise RuntimeError(f"Stage 1 failed; run `python -m balcaprl.sft --config {recipe}` to see why.")
    timings["stage 1 (SFT)"] = time.monotonic() - stage_start

    _log(f"3/5 stage 2: BalCapRL, seeds {list(settings.rl_seeds)} in parallel ({settings.rl_steps} steps max each)")
    stage_start = time.monotonic()
    processes, logs, run_dirs = {}, {}, {}
    for seed in settings.rl_seeds:
        run_dirs[seed] = root / f"balcaprl_seed{seed}"
        recipe = write_recipe(
            root / "recipes" / f"balcaprl_seed{seed}.yaml",
            rl_recipe(settings, train, sft_dir, run_dirs[seed], seed),
            f"demo stage 2, seed {seed}",
        )
        logs[seed] = root / f"balcaprl_seed{seed}.log"
        processes[seed] = run_entry_point("train", recipe, logs[seed])
    wait_for(processes, logs, settings.rl_steps)
    timings["stage 2 (RL, all seeds)"] = time.monotonic() - stage_start

    _log("4/5 evaluation on the held-out scenes (greedy captions)")
    stage_start = time.monotonic()
    test_rows = read_jsonl(test)
    corpus = corpus_references(load_caption_dataset(train))
    results = {
        "sft": evaluate_model(sft_dir, test_rows, corpus, settings.eval_batch_size),
        "rl": {seed: evaluate_model(d, test_rows, corpus, settings.eval_batch_size) for seed, d in run_dirs.items()},
        "test_references": [row["references"] for row in test_rows],
    }
    timings["evaluation"] = time.monotonic() - stage_start

    _log("5/5 report")
    for seed, run_dir in run_dirs.items():  # the trainer state holds the reward curves
        state = run_dir / "trainer_state.json"
        if not state.is_file():
            raise RuntimeError(f"{state} is missing; the RL run of seed {seed} did not finish.")
    plot_reward_curves(run_dirs, root / "reward_curves.png")
    plot_before_after(results["sft"], [results["rl"][seed] for seed in settings.rl_seeds], root / "before_after.png")
    timings["total"] = time.monotonic() - started
    report = write_report(root, settings, results, timings)
    _log(f"done in {timings['total']:.0f} s: {report}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="balcaprl demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=DemoSettings.output_dir)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a tiny budget (seconds), for smoke tests")
    args = parser.parse_args(argv)
    settings = DemoSettings(output_dir=args.output_dir, seed=args.seed)
    if args.quick:
        settings = DemoSettings(
            output_dir=args.output_dir, seed=args.seed, train_scenes=64, test_scenes=16, sft_steps=4,
            sft_batch_size=8, rl_steps=4, rl_seeds=(0, 1), eval_batch_size=16, samples_in_report=2,
        )  # fmt: skip
    run_demo(settings)


if __name__ == "__main__":
    main()
