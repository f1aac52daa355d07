"""The GPUs a recipe runs on (command line, the recipe header, its accelerate config) and the model's shape from its
config alone (no weights).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Hardware:
    """What the run is sized for: training processes (one GPU each), GPU memory, ZeRO stage (0: plain DDP)."""

    num_processes: int
    gpu_memory_gb: float
    zero_stage: int = 0
    source: str = ""


def recipe_header(path: str | os.PathLike) -> str:
    """The leading comment block of a recipe."""
    lines = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def header_gpus(path: str | os.PathLike) -> tuple[int, float] | None:
    """(GPUs, GB each) the recipe's header says it was sized for (``8x 80 GB GPUs``), None if it says none."""
    match = re.search(r"(\d+)\s*[x×]\s*(\d+(?:\.\d+)?)\s*GB", recipe_header(path))
    return (int(match.group(1)), float(match.group(2))) if match else None


def header_launch_processes(path: str | os.PathLike) -> int | None:
    """The ``--num_processes N`` of the header's launch command (it overrides the accelerate config's), or None."""
    match = re.search(r"--num_processes\s+(\d+)", recipe_header(path))
    return int(match.group(1)) if match else None


def header_accelerate_config(path: str | os.PathLike) -> str | None:
    """The accelerate config the header's launch command names (``--config_file FILE``), None if none."""
    match = re.search(r"--config_file\s+(\S+)", recipe_header(path))
    return match.group(1) if match else None


def _find_file(name: str, recipe: str | os.PathLike) -> Path | None:
    """``name`` as given, else relative to the repository holding the recipe (recipes name repo-relative paths)."""
    candidates = [Path(name)] + [parent / name for parent in Path(recipe).resolve().parents]
    return next((path for path in candidates if path.is_file()), None)


def read_accelerate_config(path: str | os.PathLike, recipe: str | os.PathLike = ".") -> tuple[int, int]:
    """(total processes over all machines, ZeRO stage: 0 without DeepSpeed) of an accelerate YAML config."""
    import json

    import yaml

    config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    processes = int(config.get("num_processes", 1))
    stage = 0
    if config.get("distributed_type") == "DEEPSPEED":
        deepspeed = config.get("deepspeed_config", {})
        if "deepspeed_config_file" in deepspeed:
            found = _find_file(deepspeed["deepspeed_config_file"], path) or _find_file(
                deepspeed["deepspeed_config_file"], recipe
            )
            if found is None:
                name = deepspeed["deepspeed_config_file"]
                raise FileNotFoundError(f"{path}: deepspeed_config_file {name} not found")
            stage = int(json.loads(found.read_text())["zero_optimization"]["stage"])
        else:
            stage = int(deepspeed.get("zero_stage", 2))
    return processes, stage


def resolve_hardware(
    recipe: str | os.PathLike, accelerate_config: str | None, gpus: int | None, gpu_memory_gb: float | None
) -> Hardware:
    """The hardware to size against: command line first, then the recipe header (GPU count and size, launch config)."""
    header = header_gpus(recipe)
    accelerate_config = accelerate_config or header_accelerate_config(recipe)
    processes, stage, source = None, 0, []
    if accelerate_config:
        found = _find_file(accelerate_config, recipe)
        if found is None:
            raise FileNotFoundError(f"accelerate config {accelerate_config} not found")
        processes, stage = read_accelerate_config(found, recipe)
        source.append(f"{accelerate_config} (ZeRO-{stage})" if stage else f"{accelerate_config} (DDP)")
    # the launch command's --num_processes overrides the accelerate config's (the LoRA recipes launch zero2.yaml,
    # written for 8 processes, on 4)
    count = gpus or header_launch_processes(recipe) or processes or (header[0] if header else 1)
    memory = gpu_memory_gb or (header[1] if header else None)
    if memory is None:
        raise ValueError("the recipe header names no GPU size; pass --gpus N --gpu-memory GB")
    source.append("--gpus/--gpu-memory" if gpus or gpu_memory_gb else "recipe header")
    return Hardware(count, float(memory), stage, ", ".join(source))


@dataclass
class ModelShape:
    """What the estimates need from a model's config, and its parameter counts (built on the meta device)."""

    family: str
    total_parameters: int
    trainable_parameters: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_positions: int
    dtype_bytes: int
    # for the terms beyond the model states: the largest module's own parameters (what ZeRO-3 gathers at once), the
    # largest single parameter, the largest LoRA-targeted weight (in x out; 0 without LoRA), whether the LM head
    # is trained (its fp32 weight gradient), and the vision tower's sizes with the patches of the largest image the
    # checkpoint's processor allows (what vLLM profiles)
    largest_layer_parameters: int = 0
    largest_parameter: int = 0
    largest_lora_weight: int = 0
    lm_head_trained: bool = False
    vision_hidden_size: int = 0
    vision_intermediate_size: int = 0
    profile_image_patches: int = 0


def text_config(config):
    """The language model's config of a multimodal config (transformers 5 nests it in ``text_config``)."""
    return getattr(config, "text_config", None) or config


def model_shape(config_source: str, model_args) -> ModelShape:
    """Parameter counts (total; trainable as the recipe configures: frozen parts, LoRA) and sizes, no weights.

    The model is instantiated on the meta device, so the counts are exact and nothing is allocated.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    from balcaprl.models.loading import part_of
    from balcaprl.models.paths import SUPPORTED_MODEL_TYPES

    config = AutoConfig.from_pretrained(config_source)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        supported = list(SUPPORTED_MODEL_TYPES)
        raise ValueError(f"{config_source} is a {config.model_type!r} model; balcaprl supports {supported}.")
    family = config.model_type
    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config)
    model.tie_weights()  # a tied LM head and embedding are one tensor: counted once (3.75 B parameters for the 3B)
    frozen = ({"vision"} if model_args.freeze_vision_tower else set()) | (
        {"projector"} if model_args.freeze_projector else set()
    )
    total = sum(p.numel() for p in model.parameters())
    targets = lora_targets(model, model_args, family) if model_args.use_peft else []
    if model_args.use_peft:
        trainable = lora_parameters(targets, model_args.lora_r)
        # an unfrozen vision tower or projector trains in full beside the adapters (PEFT modules_to_save)
        trained_in_full = {"vision", "projector"} - frozen
        trainable += sum(p.numel() for n, p in model.named_parameters() if part_of(n, family) in trained_in_full)
    else:
        trainable = sum(p.numel() for n, p in model.named_parameters() if part_of(n, family) not in frozen)
    vision = getattr(config, "vision_config", None)
    text = text_config(config)
    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else str(getattr(config, "dtype", "float32"))
    dtype_bytes = getattr(torch, str(dtype).removeprefix("torch.")).itemsize
    heads = text.num_attention_heads
    return ModelShape(
        family=family,
        total_parameters=total,
        trainable_parameters=trainable,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(text, "num_key_value_heads", None) or heads,
        vocab_size=text.vocab_size,
        max_positions=text.max_position_embeddings,
        dtype_bytes=dtype_bytes,
        largest_layer_parameters=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        largest_parameter=max(p.numel() for p in model.parameters()),
        largest_lora_weight=max((m.in_features * m.out_features for m in targets), default=0),
        lm_head_trained=not model_args.use_peft,
        vision_hidden_size=getattr(vision, "hidden_size", 0),
        vision_intermediate_size=getattr(vision, "intermediate_size", 0),
        profile_image_patches=_profile_image_patches(config_source, vision),
    )


def _profile_image_patches(config_source: str, vision) -> int:
    """Patches of the largest image the checkpoint's own processor allows: what vLLM runs its memory profile with when
    no ``mm_processor_kwargs`` bound it (TRL passes none). Qwen2-VL processors: max_pixels / patch²; LLaVA: the
    tower's fixed grid plus its class token."""
    from balcaprl.models.processors import checkpoint_pixel_bounds

    patch = getattr(vision, "patch_size", 14) or 14
    try:
        bounds = checkpoint_pixel_bounds(config_source)
    except (OSError, ValueError):  # no preprocessor config (e.g. --model-config with config.json alone)
        bounds = None
    if bounds is not None:
        return bounds[1] // (patch * patch)
    image_size = getattr(vision, "image_size", 0) or 0
    return (image_size // patch) ** 2 + 1 if image_size else 0


def lora_targets(model, model_args, family: str) -> list:
    """The Linear modules `balcaprl.models.peft_config` would put LoRA adapters on."""
    import torch

    from balcaprl.models.loading import LORA_TARGET_PRESETS

    targets = model_args.lora_target_modules or LORA_TARGET_PRESETS[model_args.lora_preset]
    modules = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if isinstance(targets, str):  # PEFT: a string is a regex over the full module name
            matched = re.fullmatch(targets, name) is not None
        else:  # a list names module suffixes
            matched = any(name == target or name.endswith(f".{target}") for target in targets)
        if matched:
            modules.append(module)
    return modules


def lora_parameters(targets: list, lora_r: int) -> int:
    """Parameters of the LoRA adapters `balcaprl.models.peft_config` would add to the Linear ``targets``
    (`lora_targets`): r x (in + out) each."""
    return sum(lora_r * (m.in_features + m.out_features) for m in targets)
