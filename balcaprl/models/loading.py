"""Policy loading for the two supported families (LLaVA-1.5, Qwen2.5-VL): adapters, LoRA presets, dtypes, merging
and the parameter breakdown.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from balcaprl.models.paths import adapter_base, model_family, resolve_model_path
from balcaprl.models.processors import load_processor

# LoRA on the language model only (attention and MLP projections). The vision towers of both families also have
# `q_proj`-like names (CLIP) or fused `qkv` layers (Qwen2.5-VL); the `language_model` prefix keeps them frozen.
LANGUAGE_MODEL_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


LORA_TARGET_PRESETS = {
    "language_model": LANGUAGE_MODEL_LORA_TARGETS,
    "language_model_attention": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
}


# Module names (as they appear in parameter names) of each family's parts, in transformers >= 5.
VISION_MODULES = {"qwen2_5_vl": "visual", "llava": "vision_tower"}


PROJECTOR_MODULES = {"qwen2_5_vl": "visual.merger", "llava": "multi_modal_projector"}


PARTS = ("vision", "projector", "language_model", "lora")


def load_model(model_name_or_path: str, base_model: str | None = None, **kwargs):
    """A captioning model from a full checkpoint, or from a LoRA adapter folder merged into its base.

    ``kwargs`` go to ``AutoModelForImageTextToText.from_pretrained`` (dtype, attn_implementation, revision).
    """
    from transformers import AutoModelForImageTextToText

    path = resolve_model_path(model_name_or_path)
    base = adapter_base(path, base_model)
    if base is None:
        return AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    from peft import PeftModel

    kwargs.pop("revision", None)  # a revision names the adapter's Hub version, not the base's
    model = AutoModelForImageTextToText.from_pretrained(base, **kwargs)
    return PeftModel.from_pretrained(model, path).merge_and_unload()


@contextmanager
def _plain_loading():
    """Load full, unpartitioned weights even inside a ZeRO-3 run (the LoRA stage 1 merges on its main process).

    While a ZeRO-3 `TrainingArguments` is alive, transformers' ``from_pretrained`` partitions the weights with
    collectives that every process must join (`transformers.integrations.deepspeed.is_deepspeed_zero3_enabled`); one
    process loading alone would wait for the others forever. Detaching transformers' global ZeRO-3 config for the
    duration of the load gives plain weights; it is restored afterwards.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def merge_adapter(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    base_model: str | None = None,
    dtype: torch.dtype | str | None = "auto",
) -> Path:
    """Write ``adapter_dir`` merged into its base as a full checkpoint (model + processor) in ``output_dir``.

    The result loads like any checkpoint (`AutoModelForImageTextToText`, vLLM ``vllm serve``, the RL recipes).
    The processor comes from the adapter folder when it holds one (the run's pixel bounds), else from the base.
    """
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    base = adapter_base(str(adapter_dir), base_model)
    if base is None:
        raise ValueError(f"{adapter_dir} holds no adapter_config.json: it is not a LoRA adapter folder.")
    with _plain_loading():
        model = load_model(str(adapter_dir), base_model, dtype=dtype)
    model.save_pretrained(output_dir)
    processor_files = ("processor_config.json", "preprocessor_config.json")
    has_processor = any((adapter_dir / name).is_file() for name in processor_files)
    load_processor(str(adapter_dir) if has_processor else base).save_pretrained(output_dir)
    return output_dir


def part_of(parameter_name: str, family: str) -> str:
    """Which part a parameter belongs to: ``vision``, ``projector``, ``language_model`` or ``lora``."""
    if "lora_" in parameter_name:
        return "lora"
    if f"{PROJECTOR_MODULES[family]}." in parameter_name:
        return "projector"
    if f"{VISION_MODULES[family]}." in parameter_name:
        return "vision"
    return "language_model"


def load_dtype(model_args) -> torch.dtype | str | None:
    """The torch dtype a recipe's ``dtype`` key names (``"auto"`` and None pass through)."""
    return model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)


def load_policy(model_args, family: str | None = None):
    """Load the policy for captioning RL / SFT, with the vision tower and projector frozen as configured.

    ``model_args`` is a `balcaprl.config.CaptionModelConfig`. dtype and attention implementation come from it. A LoRA
    adapter folder is loaded merged into its base (`load_model`).
    Freezing matters for full fine-tuning; with LoRA, PEFT freezes the base and `peft_config` decides what trains.
    """
    path = resolve_model_path(model_args.model_name_or_path)
    family = family or model_family(path)
    dtype = load_dtype(model_args)
    # A LoRA adapter folder (e.g. a LoRA RL run's output) starts the run from its base with the adapter merged.
    model = load_model(
        path,
        revision=model_args.model_revision,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
    )
    frozen_parts = {"vision"} if model_args.freeze_vision_tower else set()
    if model_args.freeze_projector:
        frozen_parts.add("projector")
    for name, parameter in model.named_parameters():
        if part_of(name, family) in frozen_parts:
            parameter.requires_grad_(False)
    return model


def peft_config(model_args, family: str):
    """The LoRA config of a run (None without ``use_peft``): LoRA on the language model, per ``lora_preset``.

    An unfrozen vision tower or projector is trained in full alongside the adapters (PEFT ``modules_to_save``).
    """
    if not model_args.use_peft:
        return None
    from peft import LoraConfig

    modules_to_save = list(model_args.lora_modules_to_save or [])
    if not model_args.freeze_projector:
        modules_to_save.append(PROJECTOR_MODULES[family].split(".")[-1])
    if not model_args.freeze_vision_tower:
        modules_to_save.append(VISION_MODULES[family])
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules or LORA_TARGET_PRESETS[model_args.lora_preset],
        modules_to_save=modules_to_save or None,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        bias="none",
    )


def parameter_breakdown(model: torch.nn.Module, family: str) -> dict[str, dict[str, int]]:
    """Trainable and total parameter counts per part (vision, projector, language_model, lora)."""
    counts = {part: {"trainable": 0, "total": 0} for part in PARTS}
    for name, parameter in model.named_parameters():
        part = counts[part_of(name, family)]
        part["total"] += parameter.numel()
        part["trainable"] += parameter.numel() if parameter.requires_grad else 0
    return counts


def format_parameter_breakdown(counts: dict[str, dict[str, int]]) -> str:
    """A small table of `parameter_breakdown`, for the start of a run."""
    lines = [f"{'part':<16}{'trainable':>14}{'total':>14}"]
    for part, count in counts.items():
        if count["total"]:
            lines.append(f"{part:<16}{count['trainable']:>14,}{count['total']:>14,}")
    trainable = sum(count["trainable"] for count in counts.values())
    total = sum(count["total"] for count in counts.values())
    lines.append(f"{'all':<16}{trainable:>14,}{total:>14,}  ({100 * trainable / max(total, 1):.2f}% trainable)")
    return "\n".join(lines)
