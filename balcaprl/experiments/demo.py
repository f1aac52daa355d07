"""The main job on a laptop CPU: ``make demo`` (``balcaprl demo``).

On the synthetic shapes world (`balcaprl.world`), where every caption can be scored exactly:

1. data: seeded train / held-out test scenes with references that, like human captions, sometimes omit things;
2. model: a tiny Qwen2.5-VL built offline, its tokenizer trained on the world's captions;
3. stage 1: cross-entropy fine-tuning on the references (``balcaprl sft`` with a generated recipe);
4. stage 2: BalCapRL — c-GDPO over the exact precision / recall / linguistic rewards, linguistic masked outside
   the length window — for several seeds in parallel (``balcaprl train`` with generated recipes);
5. evaluation of the stage-1 model and of every RL seed on the held-out scenes (greedy captions), a held-out
   b-CapScore curve during RL (model-only checkpoints saved by the RL runs, scored on a fixed subset of the held-out
   scenes), and ``report.md`` with the before/after table, the gain and its spread over seeds, the held-out curve,
   sample captions and smoothed training reward curves.

Stages run through the same entry points and recipes as a GPU run; the recipes are written next to the results.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from balcaprl.experiments.demo_report import plot_before_after, plot_heldout_curve, plot_reward_curves, write_report
from balcaprl.length import DEFAULT_WINDOW, length_conditional_mask, length_ratios
from balcaprl.monitors import caption_monitors
from balcaprl.rewards.world import WORLD_REWARDS

# The RL recipes log every RL_LOGGING_STEPS steps; the progress bar counts those log lines. Every step, so that the
# training curves show each step's 16 samples (faint) under their moving average.
RL_LOGGING_STEPS = 1


@dataclass
class DemoSettings:
    """Sizes and budgets of the demo; the defaults are sized for 2 CPU cores (what limits the tiny model and why
    these values: docs/demo.md, "Why these settings")."""

    output_dir: str = "runs/demo"
    seed: int = 0
    train_scenes: int = 3000
    test_scenes: int = 200
    # world: two objects per scene, references that name each object with its size ("a small red circle and a
    # large blue square."); as in human captions, half of them name only one of the two objects: what RL should
    # recover, since the exact rewards see the whole scene (balcaprl.world.WorldConfig)
    min_objects: int = 2
    max_objects: int = 2
    reference_styles: tuple[str, ...] = ("terse",)
    omission_rate: float = 0.5
    omission_kinds: tuple[str, ...] = ("object",)
    # references name the large shape before the small one, as people name the most salient thing first. The size
    # word comes before the shape it describes ("a large ..."), so in random order the model had to commit to a size
    # before choosing which shape to name, and RL's second shapes got the wrong size: precision fell 0.021 over four
    # seeds; with the large shape first it held (docs/demo.md, "What RL needed")
    large_first: bool = True
    # model (see balcaprl.models.tiny.build_tiny_qwen2_5_vl); 168 px = 36 image tokens, a shape spans 2-3 patches
    hidden_size: int = 128
    num_layers: int = 4
    vision_hidden_size: int = 128
    # three vision blocks (the last attends over the whole image): with two, the second object of stage 1's sampled
    # captions was right 84 % of the time, with three 90 %
    vision_depth: int = 3
    image_size: int = 168
    # stage 1: data-parallel over `sft_processes` CPU processes (one core each), the global batch split between them
    sft_steps: int = 750
    sft_batch_size: int = 32
    sft_learning_rate: float = 2e-3
    sft_max_seconds: float = 190.0
    sft_processes: int = 2
    # stage 2
    rl_seeds: tuple[int, ...] = (0, 1)
    rl_steps: int = 60
    rl_prompts_per_step: int = 4
    num_generations: int = 8
    max_completion_length: int = 40
    # at 1e-4 RL's noisy steps also moved words it had no reason to move ("a large X and a small Y" when both shapes
    # are large): with references in random order precision fell 0.03-0.07; at 3e-5 RL makes the same switch to two
    # objects within 60 steps and precision fell 0.01-0.03 (docs/demo.md, "What RL needed")
    rl_learning_rate: float = 3e-5
    rl_max_seconds: float = 60.0
    advantage_estimator: str = "c_gdpo"
    reward_funcs: list = field(default_factory=lambda: list(WORLD_REWARDS))
    length_mask_rewards: list = field(default_factory=lambda: ["world_linguistic"])
    # evaluation
    eval_batch_size: int = 50
    samples_in_report: int = 6
    # held-out curve during RL: the stage-1 model (step 0) and `curve_points` evenly spaced checkpoints of every seed
    # (the last one is the final model), scored on the first `curve_scenes` held-out scenes. Six (every 10 steps) so
    # that a run the time cap stops early still has points after step 0; RL's main move comes within the first 10.
    curve_points: int = 6
    curve_scenes: int = 48
    keep_checkpoints: bool = False
    # training curves: moving average over this many logged steps
    smoothing_window: int = 10

    def world_config(self):
        from balcaprl.world.splits import WorldConfig

        return WorldConfig(
            min_objects=self.min_objects,
            max_objects=self.max_objects,
            styles=tuple(self.reference_styles),
            omission_rate=self.omission_rate,
            omission_kinds=tuple(self.omission_kinds),
            large_first=self.large_first,
        )

    def processes(self) -> int:
        """Stage-1 processes: `sft_processes`, at most one per CPU core."""
        return max(1, min(self.sft_processes, os.cpu_count() or 1))


def _log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepare_world(settings: DemoSettings, root: Path) -> tuple[Path, Path, Path]:
    """Train / test JSONL files of the world and a tiny Qwen2.5-VL whose tokenizer knows the world's words."""
    from balcaprl.models.tiny import build_tiny_qwen2_5_vl
    from balcaprl.world.splits import make_split, world_corpus, write_jsonl

    world = settings.world_config()
    train = write_jsonl(
        make_split("train", settings.train_scenes, settings.seed, world), root / "data" / "train", settings.image_size
    )
    test = write_jsonl(
        make_split("test", settings.test_scenes, settings.seed, world), root / "data" / "test", settings.image_size
    )
    model = build_tiny_qwen2_5_vl(
        root / "base_model",
        hidden_size=settings.hidden_size,
        num_layers=settings.num_layers,
        vision_hidden_size=settings.vision_hidden_size,
        vision_depth=settings.vision_depth,
        image_size=settings.image_size,
        corpus=world_corpus(seed=settings.seed),
        vocab_size=512,
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
        "per_device_train_batch_size": settings.sft_batch_size // settings.processes(),
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


def checkpoint_interval(settings: DemoSettings) -> int:
    """Steps between the RL checkpoints of the held-out curve: `curve_points` evenly spaced up to `rl_steps`."""
    return max(1, settings.rl_steps // max(1, settings.curve_points))


def rl_recipe(
    settings: DemoSettings,
    train: Path,
    sft_model: Path,
    output_dir: Path,
    seed: int,
    checkpoint_steps: int | None = None,
) -> dict[str, Any]:
    """The RL recipe of one seed; ``checkpoint_steps`` saves a model-only checkpoint (weights and processor, no
    optimizer state) every that many steps, for the held-out curve. None saves nothing but the final model."""
    saving = {"save_strategy": "no"}
    if checkpoint_steps:
        saving = {"save_strategy": "steps", "save_steps": checkpoint_steps, "save_only_model": True}
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
        **saving,
        "report_to": "none",
        "disable_tqdm": True,
        "seed": seed,
        "env": {"OMP_NUM_THREADS": "1"},
    }


def write_recipe(path: Path, recipe: dict[str, Any], comment: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {comment}\n" + yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_entry_point(module: str, recipe: Path, log_file: Path | None = None, processes: int = 1) -> subprocess.Popen:
    """``python -m balcaprl.<module> --config RECIPE`` in a child process (the path a user's launch takes); with
    ``processes`` > 1 under ``accelerate launch``, data-parallel on CPU (gloo), as `tests/test_launch.py` runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    output = open(log_file, "w") if log_file is not None else None  # noqa: SIM115 - closed with the process
    command = [sys.executable, "-m", f"balcaprl.{module}", "--config", str(recipe)]
    if processes > 1:
        # --multi_gpu with use_cpu: true gives N gloo processes (`--cpu --num_processes N` silently starts one)
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
            *command[1:],
        ]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT if output else None)


def wait_for(
    processes: dict[str, subprocess.Popen],
    logs: dict[str, Path],
    total_steps: int,
    logging_steps: int = RL_LOGGING_STEPS,
) -> None:
    """Wait for parallel runs, with one progress bar over all of them (read from their logged steps: one ``'loss'``
    line per ``logging_steps`` steps, the recipes' ``logging_steps``)."""
    from tqdm.auto import tqdm

    with tqdm(total=total_steps * len(processes), desc="RL (all seeds)", unit="step") as bar:
        while any(process.poll() is None for process in processes.values()):
            time.sleep(0.5)
            done = sum(min(total_steps, logs[name].read_text().count("'loss'") * logging_steps) for name in logs)
            bar.update(done - bar.n)
        bar.update(bar.total - bar.n)
    failed = {name: process.returncode for name, process in processes.items() if process.returncode}
    if failed:
        details = "\n".join(f"--- {name}:\n{logs[name].read_text()[-3000:]}" for name in failed)
        raise RuntimeError(f"RL runs failed: {failed}\n{details}")


def objects_named(caption: str, scene: dict[str, Any]) -> tuple[int, int]:
    """(objects the caption names, of which truly in the scene): its distinct object claims under the world's grammar
    ("a small red circle and a small red circle." names one object)."""
    from balcaprl.world.captions import parse_caption
    from balcaprl.world.scene import Scene

    facts = Scene.from_dict(scene).facts()
    named = [claim for claim in parse_caption(caption).claims if claim.kind == "object"]
    return len(named), sum(1 for claim in named if claim in facts)


def score_scenes(model_path: Path, rows: list[dict], corpus: list[list[str]], batch_size: int) -> dict[str, list]:
    """Greedy captions on ``rows`` and, per scene, the exact scores, the objects named (and of them, rightly),
    CIDEr-D, the length ratio and whether it is outside the length window (1.0) or not (0.0)."""
    from balcaprl.generation import generate_captions, load_for_generation
    from balcaprl.rewards import CiderD
    from balcaprl.rewards.world import score_caption

    model, processor = load_for_generation(model_path)
    captions = generate_captions(model, processor, [row["image"] for row in rows], batch_size=batch_size)
    references = [row["references"] for row in rows]
    scores = [score_caption(caption, row["scene"]) for caption, row in zip(captions, rows)]
    named = [objects_named(caption, row["scene"]) for caption, row in zip(captions, rows)]
    ratios = length_ratios(captions, references)
    return {
        "captions": captions,
        "precision": [score["precision"] for score in scores],
        "recall": [score["recall"] for score in scores],
        "linguistic": [score["linguistic"] for score in scores],
        "objects_named": [float(count) for count, _ in named],
        "objects_right": [float(right) for _, right in named],
        "cider_d": [float(value) for value in CiderD(corpus).score(captions, references)],
        "length_ratio": ratios.tolist(),
        "outside_window": (~length_conditional_mask(ratios)).double().tolist(),
    }


def evaluate_model(model_path: Path, rows: list[dict], corpus: list[list[str]], batch_size: int) -> dict[str, Any]:
    """Greedy captions on the held-out rows and their exact scores (means), b-CapScore, CIDEr-D and lengths."""
    import torch

    from balcaprl.evaluate.balcap import harmonic_mean

    scenes = score_scenes(model_path, rows, corpus, batch_size)
    means = {
        name: statistics.fmean(scenes[name])
        for name in ("precision", "recall", "linguistic", "objects_named", "objects_right")
    }
    monitors = caption_monitors(scenes["captions"])
    return {
        **means,
        "repeated_sentence": monitors["monitor/repeated_sentence"],
        "repeated_4gram": monitors["monitor/repeated_4gram"],
        "distinct_2": monitors["monitor/distinct_2"],
        "b_capscore": harmonic_mean([means["precision"], means["recall"], means["linguistic"]]),
        "cider_d": statistics.fmean(scenes["cider_d"]),
        "length_ratio": float(torch.tensor(scenes["length_ratio"], dtype=torch.float64).mean()),
        "masked_fraction": float(torch.tensor(scenes["outside_window"], dtype=torch.float64).mean()),
        "captions": scenes["captions"],
    }


# The scores a held-out curve point keeps (evaluate_model's means; its captions are not kept).
CURVE_METRICS = (
    "precision", "recall", "linguistic", "b_capscore", "cider_d", "length_ratio", "repeated_sentence", "objects_named",
    "objects_right",
)  # fmt: skip


def run_checkpoints(run_dir: Path) -> dict[int, Path]:
    """The ``checkpoint-<step>`` folders a training run saved in ``run_dir``, by step (ascending)."""
    folders = {}
    for folder in run_dir.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
        if match and folder.is_dir():
            folders[int(match.group(1))] = folder
    return dict(sorted(folders.items()))


def final_step(run_dir: Path) -> int:
    """The last optimizer step of a finished run (``global_step`` of the ``trainer_state.json`` beside its model)."""
    state = run_dir / "trainer_state.json"
    if not state.is_file():
        raise RuntimeError(f"{state} is missing; the run in {run_dir} did not finish.")
    return int(json.loads(state.read_text())["global_step"])


def heldout_curve(
    run_dir: Path, start_scores: dict[str, Any], rows: list[dict], corpus: list[list[str]], batch_size: int
) -> list[dict[str, Any]]:
    """Held-out scores of one RL run along its steps: ``[{"step", "model", precision, recall, ..., b_capscore}]``.

    Step 0 is the starting model, whose scores on ``rows`` the caller gives (``start_scores``, the same for every
    seed); then every checkpoint in ``run_dir`` before the last step; then the last step, scored from the final model
    in ``run_dir`` itself (a checkpoint of that step holds the same weights). A run stopped early by its time cap ends
    at the step it reached.
    """
    last = final_step(run_dir)
    points = [{"step": 0, "model": "stage 1", **{key: start_scores[key] for key in CURVE_METRICS}}]
    sources = [(step, folder, folder.name) for step, folder in run_checkpoints(run_dir).items() if 0 < step < last]
    if last > 0:
        sources.append((last, run_dir, "final"))
    for step, folder, name in sources:
        scores = evaluate_model(folder, rows, corpus, batch_size)
        points.append({"step": step, "model": name, **{key: scores[key] for key in CURVE_METRICS}})
    return points


def _folder_megabytes(folder: Path) -> float:
    return sum(file.stat().st_size for file in folder.rglob("*") if file.is_file()) / 1e6


def remove_checkpoints(run_dir: Path) -> float:
    """Delete the ``checkpoint-*`` folders of a run; returns the megabytes freed.

    Also used before a run starts: ``balcaprl train`` resumes from the newest checkpoint in its ``output_dir``, so a
    checkpoint left by an earlier demo would make the new run resume instead of training.
    """
    freed = 0.0
    for folder in run_checkpoints(run_dir).values():
        freed += _folder_megabytes(folder)
        shutil.rmtree(folder)
    return freed


def run_demo(settings: DemoSettings) -> Path:
    """Run the whole demo; returns the path of ``report.md``."""
    from balcaprl.data.loading import corpus_references, load_caption_dataset
    from balcaprl.world.splits import read_jsonl

    root = Path(settings.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.monotonic()

    _log("1/5 world data and a tiny Qwen2.5-VL (built offline)")
    train, test, base_model = prepare_world(settings, root)
    timings["data + model"] = time.monotonic() - started

    _log(
        f"2/5 stage 1: cross-entropy on the references ({settings.sft_steps} steps max, "
        f"{settings.processes()} processes)"
    )
    stage_start = time.monotonic()
    sft_dir = root / "sft"
    recipe = write_recipe(
        root / "recipes" / "sft.yaml", sft_recipe(settings, train, base_model, sft_dir), "demo stage 1"
    )
    if run_entry_point("sft", recipe, processes=settings.processes()).wait() != 0:
        raise RuntimeError(f"Stage 1 failed; run `python -m balcaprl.sft --config {recipe}` to see why.")
    timings["stage 1 (SFT)"] = time.monotonic() - stage_start

    _log(f"3/5 stage 2: BalCapRL, seeds {list(settings.rl_seeds)} in parallel ({settings.rl_steps} steps max each)")
    stage_start = time.monotonic()
    processes, logs, run_dirs = {}, {}, {}
    for seed in settings.rl_seeds:
        run_dirs[seed] = root / f"balcaprl_seed{seed}"
        remove_checkpoints(run_dirs[seed])  # an earlier demo's checkpoints would make this run resume, not train
        recipe = write_recipe(
            root / "recipes" / f"balcaprl_seed{seed}.yaml",
            rl_recipe(settings, train, sft_dir, run_dirs[seed], seed, checkpoint_steps=checkpoint_interval(settings)),
            f"demo stage 2, seed {seed}",
        )
        logs[seed] = root / f"balcaprl_seed{seed}.log"
        processes[seed] = run_entry_point("train", recipe, logs[seed])
    wait_for(processes, logs, settings.rl_steps)
    timings["stage 2 (RL, all seeds)"] = time.monotonic() - stage_start

    _log("4/5 evaluation on the held-out scenes (greedy captions), then the held-out curve from the checkpoints")
    stage_start = time.monotonic()
    test_rows = read_jsonl(test)
    corpus = corpus_references(load_caption_dataset(train))
    results = {
        "sft": evaluate_model(sft_dir, test_rows, corpus, settings.eval_batch_size),
        "rl": {seed: evaluate_model(d, test_rows, corpus, settings.eval_batch_size) for seed, d in run_dirs.items()},
        "test_references": [row["references"] for row in test_rows],
        "samples": [{"image": row["image"], "scene": row["scene"]} for row in test_rows[: settings.samples_in_report]],
    }
    timings["evaluation"] = time.monotonic() - stage_start
    stage_start = time.monotonic()
    curve_rows = test_rows[: settings.curve_scenes]
    curve_start = evaluate_model(sft_dir, curve_rows, corpus, settings.eval_batch_size)
    checkpoint_megabytes = {
        seed: sum(_folder_megabytes(folder) for folder in run_checkpoints(d).values()) for seed, d in run_dirs.items()
    }
    results["heldout_curve"] = {
        "scenes": len(curve_rows),
        "checkpoint_steps": checkpoint_interval(settings),
        "checkpoint_megabytes": sum(checkpoint_megabytes.values()),
        "checkpoints_kept": settings.keep_checkpoints,
        "per_seed": {
            seed: heldout_curve(d, curve_start, curve_rows, corpus, settings.eval_batch_size)
            for seed, d in run_dirs.items()
        },
    }
    if not settings.keep_checkpoints:  # the curve is all they were saved for
        for run_dir in run_dirs.values():
            remove_checkpoints(run_dir)
    timings["held-out curve"] = time.monotonic() - stage_start

    _log("5/5 report")
    for seed, run_dir in run_dirs.items():  # the trainer state holds the reward curves
        state = run_dir / "trainer_state.json"
        if not state.is_file():
            raise RuntimeError(f"{state} is missing; the RL run of seed {seed} did not finish.")
    plot_reward_curves(run_dirs, root / "reward_curves.png", window=settings.smoothing_window)
    plot_heldout_curve(results["heldout_curve"]["per_seed"], root / "heldout_curve.png", len(curve_rows))
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
        # 80 stage-1 steps of 16: enough for captions in the world's grammar (nonzero rewards, so RL has a signal and
        # its checkpoints differ; 40 steps of 8 gave all-zero rewards, no gradient), and shorter captions than a random
        # model's, which makes the evaluations faster
        settings = DemoSettings(
            output_dir=args.output_dir, seed=args.seed, train_scenes=64, test_scenes=16, sft_steps=80,
            sft_batch_size=16, rl_steps=4, rl_prompts_per_step=2, rl_learning_rate=1e-3, rl_seeds=(0, 1),
            eval_batch_size=16, samples_in_report=2, curve_scenes=8, smoothing_window=2,
        )  # fmt: skip
    run_demo(settings)


if __name__ == "__main__":
    main()
