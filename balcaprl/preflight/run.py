"""`preflight` (the whole report, ``balcaprl preflight``) and `check_before_weights` (its cheap subset, before any
weights load in ``balcaprl train`` / ``balcaprl sft``): the checks in order, as the package docstring lists them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from balcaprl.preflight.budget import TokenBudget, check_budget, completion_tokens, image_tokens, prompt_tokens
from balcaprl.preflight.checks import check_data, check_environment, check_judge, check_output
from balcaprl.preflight.hardware import model_shape, resolve_hardware, text_config
from balcaprl.preflight.memory import check_memory, memory_estimate
from balcaprl.preflight.report import PreflightReport


def _budget(family, config, model_args, data_args, training_args, config_source, image_sizes) -> TokenBudget:
    images, source = image_tokens(family, config, model_args, config_source, image_sizes)
    prompt, exact = prompt_tokens(config_source, data_args.instruction, family)
    return TokenBudget(images, prompt, completion_tokens(training_args), exact, source)


def check_before_weights(data_args, training_args, model_args) -> None:
    """The cheap checks `balcaprl train` / `balcaprl sft` run before any weights load: environment, output folder,
    token budget at the recipe's pixel bound. Raises `RecipeError` listing every problem."""
    from transformers import AutoConfig

    from balcaprl.models.paths import adapter_base, model_source_problem, resolve_model_path
    from balcaprl.runtime import RecipeError

    report = PreflightReport()
    check_environment(report, training_args, _zero_stage_of_run(training_args))
    check_output(report, training_args)
    config = None
    if problem := model_source_problem(model_args.model_name_or_path):
        report.problem("model", problem)
    else:
        source = resolve_model_path(model_args.model_name_or_path)
        try:
            config = AutoConfig.from_pretrained(adapter_base(source) or source)
        except (OSError, ValueError):  # not reachable from here (e.g. a Hub name online, no network): loading says
            pass
    if config is not None and config.model_type in ("llava", "qwen2_5_vl"):
        budget = _budget(config.model_type, config, model_args, data_args, training_args, source, [])
        check_budget(report, budget, training_args, text_config(config).max_position_embeddings)
    if report.problems:
        raise RecipeError("preflight found problems before loading weights:\n" + "\n".join(
            f"  {index}. {problem}" for index, problem in enumerate(report.problems, 1)))  # fmt: skip


def _zero_stage_of_run(training_args) -> int:
    """The ZeRO stage of the launched run (accelerate passes DeepSpeed through the environment), 0 without."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2") or 2)
    return 3 if getattr(training_args, "deepspeed", None) else 0


def is_sft_recipe(path: str | os.PathLike) -> bool:
    """A stage-1 recipe (parsed with the SFT config types) rather than an RL one."""
    import yaml

    recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    return "reward_funcs" not in recipe and "advantage_estimator" not in recipe and "num_generations" not in recipe


def preflight(
    recipe: str,
    overrides: Sequence[str] = (),
    *,
    accelerate_config: str | None = None,
    gpus: int | None = None,
    gpu_memory_gb: float | None = None,
    model_config: str | None = None,
    stage: str | None = None,
) -> PreflightReport:
    """Run every check of a recipe (see the module docstring); never loads weights."""
    import yaml

    from balcaprl.runtime import RL_CONFIG_TYPES, SFT_CONFIG_TYPES, RecipeError, parse_config

    report = PreflightReport()
    sft = stage == "sft" if stage else is_sft_recipe(recipe)
    raw = yaml.safe_load(Path(recipe).read_text(encoding="utf-8")) or {}
    argv = ["--config", recipe, *overrides]
    # bf16 / fp16 on a machine without a GPU make transformers refuse the config; preflight often runs on a login
    # node, so it parses for the CPU there (the memory estimate takes the weights' dtype from `dtype`, not bf16).
    import torch

    if not torch.cuda.is_available() and (raw.get("bf16") or raw.get("fp16")) and "--bf16" not in overrides:
        argv += ["--bf16", "false", "--fp16", "false", "--use_cpu", "true"]
    try:
        configs = parse_config(SFT_CONFIG_TYPES if sft else RL_CONFIG_TYPES, argv)
    except RecipeError as error:
        report.problem("recipe", str(error))
        return report
    if sft:
        data_args, training_args, model_args = configs
        reward_args = None
    else:
        data_args, reward_args, training_args, model_args = configs

    hardware = None
    if raw.get("use_cpu") and not (gpus or gpu_memory_gb):
        report.add("memory per GPU (estimate)", "a CPU recipe (use_cpu): no GPU to size against")
    else:
        try:
            hardware = resolve_hardware(recipe, accelerate_config, gpus, gpu_memory_gb)
        except (OSError, ValueError, KeyError) as error:
            report.problem("hardware", str(error))

    check_environment(report, training_args, hardware.zero_stage if hardware else 0)
    rows = check_data(report, data_args, training_args.seed)

    from balcaprl.models.paths import adapter_base, model_source_problem, resolve_model_path

    config_source = model_config or model_args.model_name_or_path
    try:
        from transformers import AutoConfig

        if problem := model_source_problem(config_source):
            raise ValueError(problem)
        config_source = resolve_model_path(config_source)
        config_source = adapter_base(config_source) or config_source
        config = AutoConfig.from_pretrained(config_source)
        shape = model_shape(config_source, model_args)
    except (OSError, ValueError) as error:
        report.problem(
            "model",
            f"cannot read the model config of {config_source!r} ({' '.join(str(error).split())[:200]}); pass "
            "--model-config DIR (a folder with its config.json) to check the budget and memory without it.",
        )
        config = shape = None
    if config is not None:
        sizes = [row["image"].size for row in rows]
        budget = _budget(shape.family, config, model_args, data_args, training_args, config_source, sizes)
        check_budget(report, budget, training_args, shape.max_positions)
        if hardware is not None:
            lora = model_args.use_peft
            estimate = memory_estimate(shape, hardware, training_args, budget, lora=lora)
            check_memory(report, estimate, hardware, training_args, lora)
    if reward_args is not None:
        check_judge(report, reward_args, training_args, rows)
    check_output(report, training_args)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balcaprl preflight",
        description="Check a recipe against the hardware, packages, data, judge and output folder before launching "
        "(no weights load). Exit code 0 when every check passes, 1 otherwise.",
    )
    parser.add_argument("recipe", help="recipe YAML")
    parser.add_argument("--accelerate-config", help="accelerate YAML of the launch (default: the recipe header's)")
    parser.add_argument("--gpus", type=int, help="training processes / GPUs (default: the accelerate config's)")
    parser.add_argument("--gpu-memory", type=float, help="memory of one GPU in GB (default: the recipe header's)")
    parser.add_argument("--model-config", help="folder with the model's config.json (default: model_name_or_path)")
    parser.add_argument("--stage", choices=["sft", "train"], help="default: from the recipe's keys")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``balcaprl preflight``: print the report; 0 when every check passes, 1 otherwise."""
    arguments, overrides = build_parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    report = preflight(
        arguments.recipe,
        overrides,
        accelerate_config=arguments.accelerate_config,
        gpus=arguments.gpus,
        gpu_memory_gb=arguments.gpu_memory,
        model_config=arguments.model_config,
        stage=arguments.stage,
    )
    print(report.render())
    return 0 if report.ok else 1
