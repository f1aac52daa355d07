"""``make gpu-smoke`` (``python -m balcaprl.experiments.gpu_smoke``): the GPU recipes' path, 2 steps per stage, on a
GPU node.

For each model family: stage 1 (``balcaprl.sft``), then stage 2 (``balcaprl.train``) once per advantage estimator
(SCST and GRPO with CIDEr-D, c-GDPO with the length mask), each through ``accelerate launch`` with the repo's
DeepSpeed ZeRO-2 config and TRL's real vLLM engine colocated (``use_vllm``), on a small synthetic-world dataset.
It is a thin wrapper: the same entry points and demo recipes the CPU tests run, with the GPU settings of the real
recipes on the command line. It checks that every stage exits cleanly and logs its 2 steps; it does not measure
quality.

Models: the real-interface models (real vocabulary, templates and image processing at tiny depth, built from
``tests/fixtures/reference-models`` by `balcaprl.models.reference.build_reference_interface_model`) when available,
else the self-made
tiny models; ``--model PATH_OR_HUB_NAME`` runs a real checkpoint instead. The c-GDPO stage uses the world's exact
rewards (no judge needed) unless ``--judge-url`` names an OpenAI-compatible judge, which then scores precision,
recall and linguistic quality as in the BalCapRL recipes.

Without CUDA it says so and exits 0 (nothing to check); ``--dry-run`` prints the plan anywhere. The module lives in
the package, like `balcaprl.experiments.demo`, so that it shares the package's builders and parsers and is tested as
such; it
needs the repository's ``recipes/`` folder (the demo recipes and the accelerate configs).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

FAMILIES = ("qwen2_5_vl", "llava")
ESTIMATORS = ("scst", "grpo", "c_gdpo")
WORLD_REWARDS = ["world_precision", "world_recall", "world_linguistic"]
JUDGE_REWARDS = ["precision", "recall", "linguistic"]
# The GPU recipes' settings the CPU demo recipes do not have: bf16 on GPUs, vLLM colocated next to the trainer.
GPU_SETTINGS = {
    "use_cpu": False,
    "bf16": True,
    "gradient_checkpointing": True,
    "report_to": "none",
    "save_strategy": "no",
    "logging_steps": 1,
}
VLLM_SETTINGS = {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3}
# Small images and captions: 576 LLaVA image tokens at most (<= 256 for Qwen2.5-VL at the max_pixels below), a
# ~30-token prompt and 16 completion tokens fit in 1024 with room to spare.
MAX_COMPLETION_LENGTH = 16
VLLM_MAX_MODEL_LENGTH = 1024
QWEN_PIXELS = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 256}


@dataclass
class Stage:
    """One launched stage: its entry point, the recipe written for it and the folder it must write."""

    name: str
    module: str  # balcaprl.sft or balcaprl.train
    recipe: dict
    recipe_path: Path
    launcher: list[str] = field(default_factory=list)

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe["output_dir"])

    @property
    def command(self) -> list[str]:
        return [*self.launcher, "-m", self.module, "--config", str(self.recipe_path)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m balcaprl.experiments.gpu_smoke", description=__doc__.split("\n\n")[0].split(": ", 1)[-1]
    )
    parser.add_argument("--model", help="a real checkpoint (local folder or Hub name) instead of the test models")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES), help="model families")
    parser.add_argument("--estimators", nargs="+", choices=ESTIMATORS, default=list(ESTIMATORS))
    parser.add_argument("--judge-url", help="OpenAI-compatible judge for the c-GDPO stage (default: world rewards)")
    parser.add_argument("--judge-model", default="Qwen/Qwen2.5-VL-72B-Instruct-AWQ", help="model the judge serves")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per stage")
    parser.add_argument("--num-processes", type=int, help="processes (GPUs) per launch; default: all visible GPUs")
    parser.add_argument("--accelerate-config", default="recipes/accelerate/zero2.yaml")
    parser.add_argument("--recipes-dir", default="recipes", help="the repository's recipes folder")
    parser.add_argument("--reference-dir", help="real model interface files (default: the builder's own default)")
    parser.add_argument("--output-dir", default="runs/gpu-smoke")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (works without a GPU)")
    return parser


def cuda_devices() -> int:
    """Number of CUDA devices torch sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def missing_gpu_packages() -> list[str]:
    """What the smoke needs beyond the base install, with the reason (empty when ready)."""
    import importlib.metadata

    from packaging.requirements import Requirement

    problems = []
    for package in ("vllm", "deepspeed"):
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{package} is not installed")
            continue
        # TRL declares the vLLM releases it supports in its own `vllm` extra
        for requirement in map(Requirement, importlib.metadata.requires("trl") or []):
            if package == "vllm" and requirement.name == "vllm" and version not in requirement.specifier:
                problems.append(f"vllm {version} is outside what TRL supports (vllm{requirement.specifier})")
    return problems


def model_for(family: str, args: argparse.Namespace, models_dir: Path, build: bool) -> tuple[str, str]:
    """(model path or name, description) of ``family``: ``--model``, else real-interface, else self-made tiny."""
    if args.model:
        return args.model, "the checkpoint given with --model"
    try:
        from balcaprl.models.reference import build_reference_interface_model
    except ImportError:
        return f"tiny:{family}", "self-made tiny model (this balcaprl has no real-interface builder)"
    folder = models_dir / f"{family}-real-interface"
    if build and not (folder / "config.json").is_file():
        try:
            build_reference_interface_model(family, folder, reference_dir=args.reference_dir)
        except FileNotFoundError as error:
            print(f"gpu-smoke: no real-interface {family} model ({error}); using the self-made tiny one.")
            return f"tiny:{family}", "self-made tiny model (the reference interface files were not found)"
    return str(folder), "real-interface model (real vocabulary, templates and image processing; tiny depth)"


def detect_families(args: argparse.Namespace) -> list[str]:
    """The families to run: ``--families``, or the family of ``--model`` (read from its config)."""
    if not args.model:
        return list(args.families)
    try:
        from balcaprl.models.paths import model_family

        return [model_family(args.model)]
    except (OSError, ValueError) as error:  # e.g. a Hub name in --dry-run without network
        if len(args.families) != 1:
            message = f"gpu-smoke: cannot read the family of {args.model!r} ({error}); pass --families X."
            raise SystemExit(message) from error
        return list(args.families)


def plan(args: argparse.Namespace, num_processes: int, build_models: bool = False) -> list[Stage]:
    """The stages to launch, in order: per family, SFT then one RL run per estimator from the SFT output.

    Each stage's recipe is the family's demo recipe with the GPU settings and the smoke's sizes written over it.
    """
    import yaml

    recipes, output = Path(args.recipes_dir), Path(args.output_dir)
    launcher = [
        "accelerate", "launch", "--config_file", args.accelerate_config, "--num_processes", str(num_processes),
        "--main_process_port", "0",
    ]  # fmt: skip
    common = {"dataset": str(output / "data" / "data.jsonl"), "max_steps": args.steps, **GPU_SETTINGS}
    stages = []
    for family in detect_families(args):
        model, _ = model_for(family, args, output / "models", build_models)
        pixels = QWEN_PIXELS if family == "qwen2_5_vl" else {}
        sft_recipe = yaml.safe_load((recipes / "demo" / f"{family}_sft.yaml").read_text())
        sft_recipe.pop("env", None)  # the CPU recipes' one-thread setting
        sft_recipe.update(common, **pixels, model_name_or_path=model, output_dir=str(output / family / "sft"))
        sft_recipe.update(per_device_train_batch_size=4)
        path = output / "recipes" / f"{family}_sft.yaml"
        stages.append(Stage(f"{family} sft", "balcaprl.sft", sft_recipe, path, launcher))
        rl_base = yaml.safe_load((recipes / "demo" / f"{family}_balcaprl.yaml").read_text())
        rl_base.pop("env", None)
        for estimator in args.estimators:
            recipe = {**rl_base, **common, **pixels, **VLLM_SETTINGS}
            if estimator == "c_gdpo":  # BalCapRL: three rewards, the linguistic one masked outside the length window
                rewards = JUDGE_REWARDS if args.judge_url else WORLD_REWARDS
                recipe.update(reward_funcs=rewards, length_mask_rewards=[rewards[-1]])
                if args.judge_url:
                    recipe.update(judge_base_url=args.judge_url, judge_model=args.judge_model)
            else:  # SCST and GRPO-CIDEr, as their recipes
                recipe.update(reward_funcs=["cider_d"], length_mask_rewards=[])
            recipe.update(
                advantage_estimator=estimator,
                model_name_or_path=sft_recipe["output_dir"],
                output_dir=str(output / family / estimator),
                use_peft=False,
                num_generations=2,
                per_device_train_batch_size=2,
                max_completion_length=MAX_COMPLETION_LENGTH,
                vllm_max_model_length=VLLM_MAX_MODEL_LENGTH,
            )
            path = output / "recipes" / f"{family}_{estimator}.yaml"
            stages.append(Stage(f"{family} {estimator}", "balcaprl.train", recipe, path, launcher))
    return stages


def write_recipes(stages: list[Stage]) -> None:
    import yaml

    for stage in stages:
        stage.recipe_path.parent.mkdir(parents=True, exist_ok=True)
        header = (
            f"# gpu-smoke stage {stage.name!r} (balcaprl.experiments.gpu_smoke). Launch:\n"
            f"#   {shlex.join(stage.command)}\n"
        )
        stage.recipe_path.write_text(header + yaml.safe_dump(stage.recipe, sort_keys=False))


def logged_steps(output_dir: Path) -> int:
    """Optimizer steps a finished stage logged (trainer_state.json next to the saved model)."""
    state_file = output_dir / "trainer_state.json"
    if not state_file.is_file():
        return 0
    history = json.loads(state_file.read_text())["log_history"]
    return len([entry for entry in history if "loss" in entry])


def print_plan(stages: list[Stage], args: argparse.Namespace) -> None:
    print(f"gpu-smoke plan ({len(stages)} launches, {args.steps} steps each):")
    for stage in stages:
        recipe = stage.recipe
        rewards = ", ".join(recipe.get("reward_funcs", [])) or "-"
        vllm = recipe.get("use_vllm", False)
        print(f"  [{stage.name}] model {recipe['model_name_or_path']}, rewards {rewards}, vLLM {vllm}")
        print(f"    {shlex.join(stage.command)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the smoke; returns the process exit code (0: every stage passed, or no CUDA device to test on)."""
    args = build_parser().parse_args(argv)
    if args.dry_run:
        print_plan(plan(args, args.num_processes or 1), args)
        return 0
    devices = cuda_devices()
    if devices == 0:
        print(
            'gpu-smoke: no CUDA device here; it needs a GPU node with the gpu extra (pip install "balcaprl[gpu]"). '
            "Nothing to check: exiting 0. (`--dry-run` prints the plan.)"
        )
        return 0
    problems = missing_gpu_packages()
    if problems:
        print(f'gpu-smoke: {"; ".join(problems)}. Install the supported set: pip install "balcaprl[gpu]".')
        return 1
    accelerate_config = Path(args.accelerate_config)
    if not accelerate_config.is_file() or not (Path(args.recipes_dir) / "demo").is_dir():
        print(f"gpu-smoke: run it from the repository root ({accelerate_config} or {args.recipes_dir}/demo missing).")
        return 1

    from balcaprl.world.splits import make_split, write_jsonl

    output = Path(args.output_dir)
    write_jsonl(make_split("train", 32, seed=0), output / "data")
    stages = plan(args, args.num_processes or devices, build_models=True)
    write_recipes(stages)
    print_plan(stages, args)
    results = []
    for stage in stages:
        started = time.monotonic()
        print(f"\n=== {stage.name}", flush=True)
        completed = subprocess.run(stage.command)
        steps = logged_steps(stage.output_dir)
        passed = completed.returncode == 0 and steps == args.steps
        results.append((stage.name, passed, completed.returncode, steps, time.monotonic() - started))
        if not passed and stage.name.endswith("sft"):  # the RL stages of this family start from its output
            break
    print("\ngpu-smoke results:")
    for name, passed, code, steps, seconds in results:
        print(f"  {'PASS' if passed else 'FAIL'}  {name:<22} exit {code}, {steps}/{args.steps} steps, {seconds:.0f} s")
    failed = len(results) < len(stages) or not all(passed for _, passed, *_ in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
