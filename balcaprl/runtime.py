"""What the entry points share (`balcaprl.train`, `balcaprl.sft`, `balcaprl.preflight`): recipe parsing and its
`RecipeError`, run set-up (seed, threads, logging, the checkpoint to resume from), data, processor and reward
loading, time limits, and the end of a launched run.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence

from balcaprl.checkpoints import (
    checkpoint_problem,
    identity_differences,
    newest_complete_checkpoint,
    write_run_identity,
)
from balcaprl.config import BalCapConfig, CaptionDataConfig, CaptionModelConfig, CaptionSFTConfig, RewardConfig
from balcaprl.recipe_file import RecipeError, read_recipe

__all__ = ["RecipeError"]  # defined in balcaprl.recipe_file (importable before torch), raised from here too

logger = logging.getLogger("balcaprl")


RL_CONFIG_TYPES = (CaptionDataConfig, RewardConfig, BalCapConfig, CaptionModelConfig)
SFT_CONFIG_TYPES = (CaptionDataConfig, CaptionSFTConfig, CaptionModelConfig)
# Where a LoRA stage 1 keeps its adapter, beside the merged checkpoint in output_dir.
LORA_ADAPTER_SUBFOLDER = "adapter"


def parse_config(config_types: tuple, argv: Sequence[str] | None = None) -> tuple:
    """Parse ``--config FILE`` plus command-line overrides into ``config_types`` instances (TRL's `TrlParser`).

    Raises `RecipeError` naming the file, line and column for a recipe that is not YAML, and the key for an unknown
    key or a bad value (argparse's own usage-and-exit is turned into the same one-line error); ``--help`` exits 0.
    """
    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        index = argv.index("--config") + 1
        if index >= len(argv):
            raise RecipeError("--config needs a recipe file, got nothing.")
        read_recipe(argv[index])  # missing file, YAML syntax error, not a mapping: one line naming file and line

    class RecipeParser(TrlParser):
        # argparse prints its whole usage (60 lines for the RL keys) and exits on a bad value; one line naming the
        # key is the error instead. No abbreviations: `--num_generation` would be taken for a key it is not.
        def error(self, message):
            raise RecipeError(f"{message} (list the keys with `balcaprl {_stage(config_types)} --list-keys [TEXT]`)")

    parser = RecipeParser(config_types, allow_abbrev=False)
    try:
        *configs, remaining = parser.parse_args_and_config(argv, return_remaining_strings=True)
    except ValueError as error:  # a dataclass __post_init__ rejected a value; its message names the field
        if isinstance(error, RecipeError):
            raise
        raise RecipeError(str(error)) from error
    if remaining:
        unknown = [item.lstrip("-") for item in remaining if item.startswith("--")] or remaining
        raise RecipeError(
            f"Unknown recipe key(s) {unknown}: not a field of {[c.__name__ for c in config_types]}. Check the "
            f"spelling, or list the keys with `balcaprl {_stage(config_types)} --list-keys [TEXT]`."
        )
    return tuple(configs)


def _stage(config_types: tuple) -> str:
    return "sft" if config_types == SFT_CONFIG_TYPES else "train"


def list_keys(config_types: tuple, text: str | None = None) -> str:
    """Every recipe key of ``config_types`` with its type, default and help, grouped by dataclass; only the keys whose
    name or help contains ``text`` when given. What `balcaprl train --list-keys` prints."""
    import dataclasses
    import re

    lines = []
    for config_type in config_types:
        entries = []
        for item in dataclasses.fields(config_type):
            if not item.init or item.name.startswith("_"):
                continue
            help_text = " ".join(str(item.metadata.get("help", "")).split())
            if (
                text
                and text.lower() not in item.name.lower()
                and not re.search(rf"\b{re.escape(text)}", help_text, re.I)
            ):
                continue  # in a key's name anywhere, in its help at the start of a word ("lora" is not "exploration")
            if item.default is not dataclasses.MISSING:
                default = item.default
            elif item.default_factory is not dataclasses.MISSING:
                default = item.default_factory()
            else:
                default = "(required)"
            type_name = getattr(item.type, "__name__", str(item.type))
            entries.append(f"  --{item.name} ({type_name}, default {default!r}): {help_text}")
        if entries:
            lines += [f"{config_type.__name__}:", *entries]
    return "\n".join(lines) if lines else f"No recipe key matches {text!r}."


def apply_thread_settings() -> None:
    """Honour ``OMP_NUM_THREADS`` (e.g. from a recipe's ``env:`` block) although torch was imported before it was set.

    On small CPU machines one thread per process is often several times faster than the default (measured on a
    2-core machine: 0.12 s vs 2.5 s per tiny RL step), so the CPU recipes set it.
    """
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and int(threads) > 0:
        import torch

        torch.set_num_threads(int(threads))


def time_limit_callbacks(training_args) -> list:
    """A callback stopping training after ``max_train_seconds`` (none when unset)."""
    if not getattr(training_args, "max_train_seconds", None):
        return []
    import time

    import torch
    from transformers import TrainerCallback

    class StopAfterSeconds(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.deadline = time.monotonic() + training_args.max_train_seconds

        def on_step_end(self, args, state, control, **kwargs):
            import torch.distributed as dist

            stop = torch.tensor([float(time.monotonic() >= self.deadline)], device=args.device)
            if dist.is_available() and dist.is_initialized():
                dist.broadcast(stop, src=0)  # every process must stop at the same step, or collectives hang
            if stop.item():
                logger.info("max_train_seconds reached at step %d; stopping.", state.global_step)
                control.should_training_stop = True

    return [StopAfterSeconds()]


def require(value, key: str) -> None:
    if value in (None, ""):
        raise RecipeError(f"The recipe must set {key!r}.")


def explicit_resume_checkpoint(training_args) -> str | None:
    """The checkpoint ``resume_from_checkpoint`` names; None when it asks for the newest (unset, true, false)."""
    value = training_args.resume_from_checkpoint
    return None if value in (None, "", True, False, "true", "True", "false", "False") else str(value)


def last_checkpoint(training_args) -> str | None:
    """The checkpoint to resume from: the one ``resume_from_checkpoint`` names, else the newest complete
    ``checkpoint-N`` in ``output_dir`` (`balcaprl.checkpoints`), with a warning for each newer one that is incomplete.

    Raises `RecipeError` when ``resume_from_checkpoint`` names an incomplete checkpoint.
    """
    explicit = explicit_resume_checkpoint(training_args)
    if explicit is not None:
        if problem := checkpoint_problem(explicit):
            raise RecipeError(
                f"resume_from_checkpoint {explicit}: {problem}. Point it at a complete checkpoint-N folder, or leave "
                "it unset to resume from the newest complete checkpoint in output_dir."
            )
        return explicit
    checkpoint, skipped = newest_complete_checkpoint(training_args.output_dir)
    for path, problem in skipped:
        logger.warning("Not resuming from %s: %s; it will be overwritten when the run saves that step again.", path,
                       problem)  # fmt: skip
    return None if checkpoint is None else str(checkpoint)


def check_resume_identity(training_args, identity: dict, checkpoint: str | None) -> None:
    """Refuse to resume a run of ``output_dir`` with another identity (model, LoRA, data, estimator, rewards). An
    explicit ``resume_from_checkpoint`` is the user's choice: the differences are logged, not refused. The identity is
    stored by `store_run_identity` once training starts (a run that fails before leaves ``output_dir`` as it was)."""
    differences = identity_differences(training_args.output_dir, identity) if checkpoint is not None else []
    if differences and explicit_resume_checkpoint(training_args) is None:
        raise RecipeError(
            f"output_dir {training_args.output_dir} holds checkpoints of another run ({'; '.join(differences)}): "
            "resuming would load them into this one. Give this run its own --output_dir, remove the checkpoint-* "
            "folders to start over, or resume a checkpoint on purpose with --resume_from_checkpoint PATH."
        )
    for difference in differences:
        logger.warning("Resuming %s from another run's identity: %s", checkpoint, difference)


def store_run_identity(training_args, identity: dict) -> None:
    """Record the identity of a run that starts training (the main process writes it)."""
    if training_args.should_save:
        write_run_identity(training_args.output_dir, identity)


def build_reward_funcs(reward_args: RewardConfig, training_args, corpus_references=None, columns=()) -> list:
    """Reward functions of the recipe, checked as a set (`check_reward_set`: names, masking, TRL's call with the
    dataset's ``columns``); weights given in the specs fill ``training_args.reward_weights``. Raises `RecipeError`."""
    from balcaprl.rewards import get_reward_funcs, get_reward_weights
    from balcaprl.trainer.reward_checks import check_reward_set

    specs = reward_args.reward_funcs
    try:
        weights = get_reward_weights(specs)
        funcs = get_reward_funcs(
            specs,
            **reward_args.judge_context(),
            reference_column=training_args.reference_column,
            corpus_references=corpus_references,
        )
    except ValueError as error:
        raise RecipeError(f"reward_funcs: {error}") from error
    if training_args.reward_weights is None:
        training_args.reward_weights = weights
    elif any(isinstance(spec, dict) and "weight" in spec for spec in specs):
        raise RecipeError("Give reward weights either in reward_funcs entries or in reward_weights, not both.")
    try:
        check_reward_set(funcs, training_args, list(columns))
    except ValueError as error:
        raise RecipeError(str(error)) from error
    return funcs


def load_training_data(data_args: CaptionDataConfig, seed: int):
    """(train, eval or None) datasets of rows {prompt, image, references, ...}."""
    from balcaprl.data.loading import load_caption_dataset

    def load(split: str, max_samples: int | None):
        return load_caption_dataset(
            data_args.dataset,
            format=data_args.dataset_format,
            split=split,
            image_root=data_args.image_root,
            image_column=data_args.image_column,
            caption_column=data_args.caption_column,
            instruction=data_args.instruction,
            max_samples=max_samples,
            on_bad_image=data_args.on_bad_image,
            seed=seed,
            restval_as_train=data_args.restval_as_train,
            hf_config_name=data_args.hf_config_name,
        )

    try:
        train = load(data_args.dataset_split, data_args.max_train_samples)
        evaluation = load(data_args.eval_split, data_args.max_eval_samples) if data_args.eval_split else None
    except (FileNotFoundError, ValueError) as error:  # the loader's messages name the file, row and key
        raise RecipeError(f"dataset {data_args.dataset!r}: {error}") from error
    return train, evaluation


def require_one_step_of_data(train_dataset, training_args) -> None:
    """A dataset with fewer prompts than one generation batch trains no step (TRL's sampler drops the partial batch):
    that is a `RecipeError`, not a run that saves an untrained model and exits 0."""
    prompts = training_args.generation_batch_size // training_args.num_generations
    if len(train_dataset) < prompts:
        raise RecipeError(
            f"The training data has {len(train_dataset)} usable row(s), fewer than the {prompts} prompts of one "
            f"generation batch (generation_batch_size {training_args.generation_batch_size} = "
            f"per_device_train_batch_size x processes x steps_per_generation, / num_generations "
            f"{training_args.num_generations}): no step would train. Add rows, or lower per_device_train_batch_size "
            "or gradient_accumulation_steps."
        )


# Deprecations raised inside other libraries' code, about calls the user cannot change: TRL 1.16
# (trl/models/utils.py) and PEFT 0.21 (peft_model.py) read `model.is_gradient_checkpointing`, which transformers 5.24
# renamed; every generation step would print it. Our own settings use the new names where they exist (config.py).
UPSTREAM_DEPRECATIONS = (r"`is_gradient_checkpointing` is deprecated",)


def silence_upstream_deprecations() -> None:
    for message in UPSTREAM_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def prepare_run(training_args) -> str | None:
    """Seed, threads and logging of a run; returns the checkpoint to resume from (open-r1 style), if any."""
    import transformers
    from transformers import set_seed

    from balcaprl.judge.client import quiet_request_logs

    set_seed(training_args.seed)
    apply_thread_settings()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    quiet_request_logs()
    silence_upstream_deprecations()
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    checkpoint = last_checkpoint(training_args)
    if checkpoint is not None:
        logger.info("Resuming from %s", checkpoint)
    return checkpoint


def load_family_and_processor(model_args) -> tuple[str, object]:
    """(family, processor) of the recipe's model, with the image resolution as configured (no weights loaded)."""
    from balcaprl.models.paths import model_family, resolve_model_path
    from balcaprl.models.processors import load_processor

    model_args.model_name_or_path = resolve_model_path(model_args.model_name_or_path)
    family = model_family(model_args.model_name_or_path)
    pixels = {key: getattr(model_args, key) for key in ("min_pixels", "max_pixels") if getattr(model_args, key)}
    return family, load_processor(model_args.model_name_or_path, **pixels)


def check_vllm_image_bounds(model_args, image_resize) -> None:
    """vLLM must not resize the data path's images again: the recipe's pixel bounds lie within the checkpoint's.

    TRL hands vLLM the raw image beside the trainer's already expanded prompt, and vLLM processes images with the
    checkpoint's own image-processor bounds. An image resized within bounds that those contain keeps its size, so both
    count the same image tokens; outside them, vLLM would resize it again and its count would not match the prompt.
    """
    from balcaprl.models.processors import checkpoint_pixel_bounds

    bounds = checkpoint_pixel_bounds(model_args.model_name_or_path) if image_resize is not None else None
    if bounds is None:
        return
    low, high = bounds
    if not low <= image_resize.min_pixels <= image_resize.max_pixels <= high:
        raise RecipeError(
            f"min_pixels={image_resize.min_pixels} / max_pixels={image_resize.max_pixels} reach outside the "
            f"checkpoint's own image bounds [{low}, {high}], which vLLM uses: it would resize the images again and "
            "count other image tokens than the trainer. Keep min_pixels and max_pixels within them."
        )


def print_parameter_breakdown(trainer, family: str) -> None:
    from balcaprl.models.loading import format_parameter_breakdown, parameter_breakdown

    if trainer.accelerator.is_main_process:
        breakdown = format_parameter_breakdown(parameter_breakdown(trainer.model, family))
        print(f"Trainable parameters ({family}):\n{breakdown}")


def end_process_group() -> None:
    """Destroy the default process group once a launched run has finished (call it on success only, as the last step).

    PyTorch's distributed docs ("Shutdown") ask every trainer process for one destroy_process_group() near the end of
    main(); NCCL otherwise warns that the group was never destroyed. A limit on CPU: once DistributedDataParallel has
    wrapped a model, the gloo group stays referenced and its worker threads survive the call, so a finished gloo rank
    can still, rarely, abort at interpreter exit ("terminate called without an active exception"). Not inside
    `main()`: accelerate's state outlives the group, so a second stage in the same process would fail.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
