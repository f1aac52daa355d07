"""``balcaprl preflight RECIPE``: will this recipe run on this hardware? Answered before any GPU spins.

    balcaprl preflight RECIPE [--accelerate-config FILE] [--gpus N --gpu-memory GB] [--model-config DIR]
                              [--stage sft|train] [--key value ...]

From the model's config (no weights) and the recipe, six checks, every problem listed in one place at the end:

- **token budget**: image tokens at the recipe's pixel bounds for the largest image of a sample of the data, plus
  the prompt's other tokens, plus the completion → against ``vllm_max_model_length`` and the model's positions;
- **memory**: a per-GPU table (weights, gradients, optimizer states by ZeRO stage and LoRA/full, activations of the
  micro-batch with or without gradient checkpointing, logits, the reference model when beta > 0, vLLM's share and
  the KV cache the rollout batch needs), the verdict ``fits`` / ``tight`` / ``does not fit`` and its largest term;
- **environment**: every package the recipe needs (``report_to`` backends, DeepSpeed, vLLM within the versions of
  the ``vllm`` extra);
- **data**: the first rows load, their images open, their references are present;
- **judge**: every judge reward's health check (`balcaprl.judge_guard.check_judges`: one real, schema-checked
  request each, with an image for precision) and its latency;
- **output**: ``output_dir`` writable; the checkpoint a re-run resumes from, if any.

Exit code 0 when every check passes, 1 otherwise. `check_before_weights` is the cheap subset (environment, output,
token budget at the recipe's pixel bound) that `balcaprl train` / `balcaprl sft` run before any weights load.

The memory figures are estimates, stated so that they can be checked by hand (see `memory_estimate`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

GIB = 1024**3
# Verdict thresholds on the per-GPU total: fragmentation, NCCL buffers and allocator caches take the rest.
FITS_BELOW, TIGHT_BELOW = 0.85, 1.0
# The CUDA context, NCCL and cuBLAS workspaces of one training process (not part of any term below).
CUDA_OVERHEAD_BYTES = 1.5 * GIB
# How many rows of the data the budget's image sizes and the data check look at.
DATA_SAMPLE_ROWS = 32
# Tokens of the chat template around the instruction when the model's tokenizer is not at hand: measured with the
# real tokenizers, Qwen2.5-VL 20 (with its default system prompt) and LLaVA-1.5 12 (with <s>), image tokens not
# counted. The instruction then counts one token per UTF-8 byte, which no tokenizer of either family exceeds.
TEMPLATE_TOKENS_BOUND = 32
# vllm_max_model_length = budget + slack, rounded up (what the recipes' comments state).
BUDGET_SLACK, BUDGET_ROUND_TO = 64, 256
# `report_to` name -> (module transformers looks for, distribution that provides it). transformers raises at
# trainer construction when the module is missing (integration_utils.is_<name>_available).
REPORT_TO_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
    "mlflow": ("mlflow", "mlflow"),
}


@dataclass
class Problem:
    """One reason the recipe would not run: the check that found it and a message saying what to do."""

    check: str
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.message}"


@dataclass
class PreflightReport:
    """What `preflight` found: printable sections (in check order) and every problem."""

    sections: list[tuple[str, str]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    memory: MemoryEstimate | None = None
    budget: TokenBudget | None = None

    def add(self, title: str, text: str) -> None:
        self.sections.append((title, text))

    def problem(self, check: str, message: str) -> None:
        self.problems.append(Problem(check, message))

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        parts = [f"== {title} ==\n{text}" for title, text in self.sections]
        if self.problems:
            lines = "\n".join(f"  {index}. {problem}" for index, problem in enumerate(self.problems, 1))
            parts.append(f"== {len(self.problems)} problem(s): the recipe would not run ==\n{lines}")
        else:
            parts.append("== all checks passed ==")
        return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Hardware: GPUs from the command line, the recipe header, and the accelerate config
# ---------------------------------------------------------------------------------------------------------------


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
    count = gpus or processes or (header[0] if header else 1)
    memory = gpu_memory_gb or (header[1] if header else None)
    if memory is None:
        raise ValueError("the recipe header names no GPU size; pass --gpus N --gpu-memory GB")
    source.append("--gpus/--gpu-memory" if gpus or gpu_memory_gb else "recipe header")
    return Hardware(count, float(memory), stage, ", ".join(source))


# ---------------------------------------------------------------------------------------------------------------
# The model, without weights
# ---------------------------------------------------------------------------------------------------------------


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

    from balcaprl.models import SUPPORTED_MODEL_TYPES, part_of

    config = AutoConfig.from_pretrained(config_source)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        supported = list(SUPPORTED_MODEL_TYPES)
        raise ValueError(f"{config_source} is a {config.model_type!r} model; balcaprl supports {supported}.")
    family = config.model_type
    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config)
    frozen = ({"vision"} if model_args.freeze_vision_tower else set()) | (
        {"projector"} if model_args.freeze_projector else set()
    )
    total = sum(p.numel() for p in model.parameters())
    if model_args.use_peft:
        trainable = lora_parameters(model, model_args, family)
        # an unfrozen vision tower or projector trains in full beside the adapters (PEFT modules_to_save)
        trained_in_full = {"vision", "projector"} - frozen
        trainable += sum(p.numel() for n, p in model.named_parameters() if part_of(n, family) in trained_in_full)
    else:
        trainable = sum(p.numel() for n, p in model.named_parameters() if part_of(n, family) not in frozen)
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
    )


def lora_parameters(model, model_args, family: str) -> int:
    """Parameters of the LoRA adapters `balcaprl.models.peft_config` would add: r x (in + out) per targeted Linear."""
    import torch

    from balcaprl.models import LORA_TARGET_PRESETS

    targets = model_args.lora_target_modules or LORA_TARGET_PRESETS[model_args.lora_preset]
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if isinstance(targets, str):  # PEFT: a string is a regex over the full module name
            matched = re.fullmatch(targets, name) is not None
        else:  # a list names module suffixes
            matched = any(name == target or name.endswith(f".{target}") for target in targets)
        if matched:
            count += model_args.lora_r * (module.in_features + module.out_features)
    return count


# ---------------------------------------------------------------------------------------------------------------
# Token budget
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TokenBudget:
    """Tokens of the longest sequence: image + other prompt tokens + completion (SFT: the caption's max_length)."""

    image_tokens: int
    prompt_tokens: int
    completion_tokens: int
    prompt_exact: bool
    image_source: str

    @property
    def total(self) -> int:
        return self.image_tokens + self.prompt_tokens + self.completion_tokens

    @property
    def suggested_vllm_max_model_length(self) -> int:
        return math.ceil((self.total + BUDGET_SLACK) / BUDGET_ROUND_TO) * BUDGET_ROUND_TO


def image_resize_bounds(family: str, model_args, config_source: str | None):
    """The data path's `ImageResize` of a Qwen2.5-VL recipe (its pixel bounds, else the checkpoint's); LLaVA: None."""
    from balcaprl.data import ImageResize

    if family != "qwen2_5_vl":
        return None
    low, high = None, None
    if config_source:
        try:
            from balcaprl.models import checkpoint_pixel_bounds

            low, high = checkpoint_pixel_bounds(config_source) or (None, None)
        except (OSError, ValueError):  # no preprocessor config beside the model config: the recipe must say
            pass
    low = model_args.min_pixels or low or 3136
    high = model_args.max_pixels or high or 12_845_056  # Qwen2.5-VL's own defaults
    return ImageResize(low, high)


def image_tokens(family: str, config, model_args, config_source: str | None, image_sizes: Sequence[tuple[int, int]]):
    """(image tokens of the largest image, how it was counted). Qwen2.5-VL: one token per 28 x 28 block after
    ``smart_resize`` within the pixel bounds, the largest over ``image_sizes`` (the bound itself when none);
    LLaVA-1.5: the fixed crop, (image_size / patch_size)^2 (the CLS feature dropped)."""
    resize = image_resize_bounds(family, model_args, config_source)
    if resize is None:
        vision = config.vision_config
        how = f"{vision.image_size}px crop / {vision.patch_size}px patches"
        return (vision.image_size // vision.patch_size) ** 2, how
    if image_sizes:
        largest = max(image_sizes, key=lambda size: resize.num_image_tokens(*size))
        tokens = resize.num_image_tokens(*largest)
        width, height = largest
        return tokens, f"largest of {len(image_sizes)} sampled: {width}x{height} at max_pixels {resize.max_pixels}"
    bound = resize.max_pixels // resize.factor**2
    return bound, f"max_pixels {resize.max_pixels} / {resize.factor}^2, no data sample"


def count_prompt_tokens(tokenizer, instruction: str, family: str, chat_template: str | None = None) -> int:
    """Tokens of the RL / evaluation prompt besides the image tokens: the chat template around the instruction, the
    image counted as its one placeholder token and then left out. LLaVA's prompts carry ``<s>`` (the tokenizer adds
    it); Qwen's template adds no special token itself."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    template = chat_template or getattr(tokenizer, "chat_template", None)
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=family == "llava")["input_ids"]
    return len(ids) - 1


def prompt_tokens(tokenizer_source: str | None, instruction: str, family: str) -> tuple[int, bool]:
    """(prompt tokens besides the image's, counted exactly?): `count_prompt_tokens` with the model folder's
    tokenizer and chat template when it has them, else the bound ``instruction bytes + TEMPLATE_TOKENS_BOUND``."""
    files = ("tokenizer.json", "vocab.json")
    if tokenizer_source and any((Path(tokenizer_source) / name).is_file() for name in files):
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
            template = getattr(tokenizer, "chat_template", None) or _chat_template(Path(tokenizer_source))
            return count_prompt_tokens(tokenizer, instruction, family, template), True
        except Exception:  # noqa: BLE001 -- any tokenizer trouble falls back to the bound, which is always safe
            pass
    return len(instruction.encode()) + TEMPLATE_TOKENS_BOUND, False


def _chat_template(folder: Path) -> str | None:
    import json

    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]
    return None


def completion_tokens(training_args) -> int:
    """RL: ``max_completion_length``; SFT: the caption fits in ``max_length`` with the prompt, so 0 extra (the check
    then compares the prompt with ``max_length``)."""
    return int(getattr(training_args, "max_completion_length", 0) or 0)


def check_budget(report: PreflightReport, budget: TokenBudget, training_args, max_positions: int) -> None:
    """The token budget against ``vllm_max_model_length`` (vLLM recipes), SFT's ``max_length``, the model's maximum."""
    exact = "exact" if budget.prompt_exact else f"upper bound without a tokenizer: bytes + {TEMPLATE_TOKENS_BOUND}"
    lines = [
        f"image tokens        {budget.image_tokens:>7}   ({budget.image_source})",
        f"other prompt tokens {budget.prompt_tokens:>7}   ({exact})",
        f"completion tokens   {budget.completion_tokens:>7}",
        f"total               {budget.total:>7}",
        f"model maximum       {max_positions:>7}",
    ]
    if budget.total > max_positions:
        report.problem(
            "token budget",
            f"the longest sequence ({budget.total} tokens) exceeds the model's {max_positions} positions; lower "
            "max_pixels or max_completion_length.",
        )
    if getattr(training_args, "use_vllm", False):
        length = getattr(training_args, "vllm_max_model_length", None)
        lines.append(f"vllm_max_model_length {length}")
        if not length:
            report.problem(
                "token budget",
                f"use_vllm without vllm_max_model_length: vLLM would reserve {max_positions} positions per sequence; "
                f"set vllm_max_model_length: {budget.suggested_vllm_max_model_length} (budget {budget.total} + "
                f"{BUDGET_SLACK}, rounded up to a multiple of {BUDGET_ROUND_TO}).",
            )
        elif length < budget.total:
            report.problem(
                "token budget",
                f"vllm_max_model_length {length} < the token budget {budget.total} (image {budget.image_tokens} + "
                f"prompt {budget.prompt_tokens} + completion {budget.completion_tokens}): vLLM would reject the "
                f"longest prompts. Set vllm_max_model_length: {budget.suggested_vllm_max_model_length}.",
            )
        elif length > max_positions:
            report.problem("token budget", f"vllm_max_model_length {length} > the model's {max_positions} positions.")
    max_length = getattr(training_args, "max_length", None) if not hasattr(training_args, "num_generations") else None
    if max_length and budget.image_tokens + budget.prompt_tokens >= max_length:
        report.problem(
            "token budget",
            f"max_length {max_length} leaves no room for the caption after the prompt's "
            f"{budget.image_tokens + budget.prompt_tokens} tokens (TRL truncates from the end); raise max_length.",
        )
    report.budget = budget
    report.add("token budget", "\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Per-GPU bytes by term, and the GPU's bytes. `verdict` is ``fits`` / ``tight`` / ``does not fit``."""

    terms: dict[str, float]
    gpu_bytes: float
    notes: list[str] = field(default_factory=list)
    # colocated vLLM: (its weights, the KV cache the rollout batch needs, its share of the GPU), in bytes
    vllm: tuple[float, float, float] | None = None

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def largest(self) -> str:
        return max(self.terms, key=self.terms.get)

    @property
    def verdict(self) -> str:
        share = self.total / self.gpu_bytes
        return "fits" if share < FITS_BELOW else "tight" if share <= TIGHT_BELOW else "does not fit"

    def table(self) -> str:
        lines = [f"{'term':<44}{'GiB':>10}"]
        lines += [f"{name:<44}{value / GIB:>10.2f}" for name, value in self.terms.items()]
        lines.append(f"{'total per GPU':<44}{self.total / GIB:>10.2f}  of {self.gpu_bytes / GIB:.0f} GiB")
        lines.append(f"verdict: {self.verdict} (largest term: {self.largest})")
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


def memory_estimate(
    shape: ModelShape, hardware: Hardware, training_args, budget: TokenBudget, *, lora: bool = False
) -> MemoryEstimate:
    """Per-GPU memory of one training process, term by term (bytes). The arithmetic, so that it can be checked:

    With P parameters, T trainable, d bytes per weight (the recipe's ``dtype``), N processes, ZeRO stage z:
    - weights P·d, divided by N under ZeRO-3;
    - gradients T·d, divided by N under ZeRO-2/3;
    - optimizer (AdamW): under DeepSpeed fp32 master weights + two moments, 12·T bytes divided by N; without
      DeepSpeed two moments in the weights' dtype, 2·T·d;
    - activations of the micro-batch (b rows of s = budget tokens, h hidden, i intermediate, k key/value width,
      L layers), counting what a decoder layer saves for backward (the norms' inputs and outputs, q/k/v, the
      attention output, the MLP's gate, up, activation and product; sdpa keeps no attention matrix):
      a = b·s·(6h + 2k + 4i)·d per layer; without gradient checkpointing L·a, with it L·b·s·h·d (the layers'
      inputs) + a (the one layer recomputed at a time);
    - logits of the completion tokens: b·c·V·(d + 8) (the logits, their float32 log-softmax and its gradient);
    - reference model (beta > 0, full fine-tuning; LoRA uses the base with adapters off): P·d, /N under ZeRO-3;
    - vLLM colocated: ``vllm_gpu_memory_utilization`` of the GPU (its weights P·d and KV cache live in it); the KV
      cache the rollout needs is 2·L·k·d bytes per token for b·steps_per_generation sequences of
      ``vllm_max_model_length`` tokens, checked against what the share leaves after the weights;
    - a fixed 1.5 GiB for the CUDA context and communication buffers.
    """
    n, stage, d = hardware.num_processes, hardware.zero_stage, shape.dtype_bytes
    P, T = shape.total_parameters, shape.trainable_parameters  # noqa: N806 -- the docstring's symbols
    h, i, L = shape.hidden_size, shape.intermediate_size, shape.num_layers  # noqa: N806
    k = shape.hidden_size // shape.num_attention_heads * shape.num_key_value_heads
    b, s, c = training_args.per_device_train_batch_size, budget.total, budget.completion_tokens
    terms: dict[str, float] = {}
    terms["weights"] = P * d / (n if stage == 3 else 1)
    terms["gradients"] = T * d / (n if stage >= 2 else 1)
    terms["optimizer states (AdamW)"] = 12 * T / n if stage >= 1 else 2 * T * d
    per_layer = b * s * (6 * h + 2 * k + 4 * i) * d
    if training_args.gradient_checkpointing:
        terms["activations (gradient checkpointing)"] = L * b * s * h * d + per_layer
    else:
        terms["activations (no gradient checkpointing)"] = L * per_layer
    if c:
        terms["logits (completion tokens)"] = b * c * shape.vocab_size * (d + 8)
    notes = [f"{hardware.num_processes} processes, {hardware.source}; {P:,} parameters, {T:,} trainable"]
    if getattr(training_args, "beta", 0.0) and not lora:
        terms["reference model (beta > 0)"] = P * d / (n if stage == 3 else 1)
    gpu_bytes = hardware.gpu_memory_gb * 1e9
    if getattr(training_args, "use_vllm", False) and training_args.vllm_mode == "colocate":
        share = training_args.vllm_gpu_memory_utilization * gpu_bytes
        terms[f"vLLM share ({training_args.vllm_gpu_memory_utilization:g} of the GPU)"] = share
        steps = getattr(training_args, "steps_per_generation", None) or training_args.gradient_accumulation_steps
        sequences = b * steps
        length = training_args.vllm_max_model_length or shape.max_positions
        kv_needed = sequences * length * 2 * L * k * d
        tensor_parallel = getattr(training_args, "vllm_tensor_parallel_size", 1) or 1
        vllm_weights = P * d / tensor_parallel
        notes.append(
            f"vLLM share {share / GIB:.2f} GiB holds its weights {vllm_weights / GIB:.2f} GiB + the KV cache of "
            f"{sequences} rollouts x {length} tokens = {kv_needed / GIB:.2f} GiB"
        )
        vllm = (vllm_weights, kv_needed, share)
    else:
        vllm = None
        if getattr(training_args, "use_vllm", False):
            notes.append("vLLM in server mode: rollouts run on the vllm-serve node, nothing on the training GPUs")
    terms["CUDA context and buffers (fixed)"] = CUDA_OVERHEAD_BYTES
    if not c:
        notes.append("SFT: sequences counted as image + prompt tokens; the caption's own tokens come on top")
    return MemoryEstimate(terms, gpu_bytes, notes, vllm)


def check_memory(report: PreflightReport, estimate: MemoryEstimate) -> None:
    report.memory = estimate
    report.add("memory per GPU (estimate)", estimate.table())
    if estimate.verdict == "does not fit":
        report.problem(
            "memory",
            f"does not fit: {estimate.total / GIB:.1f} GiB per GPU needed, {estimate.gpu_bytes / GIB:.1f} GiB there; "
            f"the largest term is {estimate.largest} ({estimate.terms[estimate.largest] / GIB:.1f} GiB). Use a higher "
            "ZeRO stage or more GPUs, LoRA, gradient checkpointing, or a smaller per_device_train_batch_size.",
        )
    if estimate.vllm is not None:
        weights, kv_needed, share = estimate.vllm
        if weights + kv_needed > share:
            report.problem(
                "memory",
                f"vLLM's share ({share / GIB:.1f} GiB) cannot hold its weights ({weights / GIB:.1f} GiB) and the KV "
                f"cache of the rollout batch ({kv_needed / GIB:.1f} GiB); raise vllm_gpu_memory_utilization, lower "
                "vllm_max_model_length, or run vLLM in server mode on its own node.",
            )


# ---------------------------------------------------------------------------------------------------------------
# Environment, output folder
# ---------------------------------------------------------------------------------------------------------------


def extra_requirements(extra: str) -> list[str]:
    """Requirement strings balcaprl's ``extra`` installs (from the installed package's metadata)."""
    try:
        requires = importlib.metadata.requires("balcaprl") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    marker = re.compile(rf"""extra\s*==\s*["']{re.escape(extra)}["']""")
    return [requirement.split(";")[0].strip() for requirement in requires if marker.search(requirement)]


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_environment(report: PreflightReport, training_args, zero_stage: int) -> None:
    """Every package the recipe needs is installed (and vLLM is one of the supported versions)."""
    from packaging.requirements import Requirement

    lines, needed = [], []
    report_to = training_args.report_to or []
    for backend in [report_to] if isinstance(report_to, str) else report_to:
        if backend in ("none", "all"):
            continue
        module, distribution = REPORT_TO_PACKAGES.get(backend, (backend, backend))
        needed.append((f"report_to {backend}", module, distribution, None))
    if zero_stage:
        needed.append((f"DeepSpeed ZeRO-{zero_stage}", "deepspeed", "deepspeed", 'pip install "balcaprl[deepspeed]"'))
    if getattr(training_args, "use_vllm", False):
        needed.append(("use_vllm", "vllm", "vllm", 'pip install "balcaprl[vllm]"'))
    for reason, module, distribution, hint in needed:
        version = _installed_version(distribution) if importlib.util.find_spec(module) else None
        lines.append(f"{reason:<24}{distribution:<14}{version or 'MISSING'}")
        if version is None:
            report.problem(
                "environment", f"{reason} needs the {distribution!r} package, which is not installed: "
                f"{hint or f'pip install {distribution}'}."
            )  # fmt: skip
    if getattr(training_args, "use_vllm", False):
        for requirement in map(Requirement, extra_requirements("vllm")):
            installed = _installed_version(requirement.name)
            if installed is None or requirement.specifier.contains(installed, prereleases=True):
                continue
            if requirement.name == "vllm":
                report.problem(
                    "environment", f"vllm {installed} is not a supported version ({requirement}): "
                    'pip install "balcaprl[vllm]".')  # fmt: skip
            else:  # the vLLM set's other pins (transformers): vLLM itself enforces them at install time
                lines.append(f"note: the vllm extra pins {requirement}; {requirement.name} {installed} is installed")
    report.add("environment", "\n".join(lines) or "no extra packages needed")


def check_output(report: PreflightReport, training_args) -> None:
    """``output_dir`` writable (its nearest existing folder, when it does not exist yet); the resume checkpoint."""
    from balcaprl.train import last_checkpoint

    folder = Path(training_args.output_dir).resolve()
    existing = next(path for path in [folder, *folder.parents] if path.exists())
    lines = [f"output_dir {training_args.output_dir}"]
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        report.problem("output", f"output_dir {training_args.output_dir}: {existing} is not a writable folder.")
    try:
        checkpoint = last_checkpoint(training_args)
    except (OSError, ValueError) as error:
        checkpoint, lines = None, [*lines, f"checkpoint detection failed: {error}"]
    if checkpoint:
        if not os.path.isdir(checkpoint):
            report.problem("output", f"resume_from_checkpoint {checkpoint} is not a folder.")
        lines.append(f"resumes from {checkpoint}")
    else:
        lines.append("no checkpoint: starts from step 0")
    report.add("output", "\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# Data and judge
# ---------------------------------------------------------------------------------------------------------------


def check_data(report: PreflightReport, data_args, seed: int) -> list[dict]:
    """Load a sample of the training rows and open their images; returns the rows (empty on failure)."""
    import copy

    from balcaprl.train import load_training_data

    sample_args = copy.copy(data_args)
    sample_args.max_train_samples = min(data_args.max_train_samples or DATA_SAMPLE_ROWS, DATA_SAMPLE_ROWS)
    sample_args.eval_split = None
    try:
        dataset, _ = load_training_data(sample_args, seed)
        rows = [dataset[index] for index in range(len(dataset))]  # decoding opens every image
    except Exception as error:  # noqa: BLE001 -- the loader's own messages name the file, row and key
        report.problem("data", " ".join(str(error).split()))
        report.add("data", f"dataset {data_args.dataset}: failed to load")
        return []
    without_references = [index for index, row in enumerate(rows) if not row.get("references")]
    if without_references:
        report.problem("data", f"rows {without_references[:5]} of the sample have no references.")
    sizes = [row["image"].size for row in rows]
    largest = max(sizes, key=lambda size: size[0] * size[1])
    report.add(
        "data", f"dataset {data_args.dataset}: {len(rows)} sampled rows load, images open (largest "
        f"{largest[0]}x{largest[1]}), references present"
    )  # fmt: skip
    return rows


def probe_row() -> dict:
    """A stand-in dataset row for the judge check when the data cannot be read (a gray photo, one reference)."""
    from PIL import Image

    return {"image": Image.new("RGB", (448, 448), (122, 116, 104)), "references": ["A gray square."]}


def check_judge(report: PreflightReport, reward_args, training_args, rows: list[dict]) -> None:
    """Every judge reward's health check (`check_judges`: one real schema-checked request each), timed."""
    from balcaprl.data import corpus_references
    from balcaprl.judge_guard import JudgeUnavailableError, check_judges, judge_rewards
    from balcaprl.train import RecipeError, build_reward_funcs

    try:
        from datasets import Dataset

        table = Dataset.from_list([{"references": row["references"]} for row in rows]) if rows else None
        references = corpus_references(table) if rows else [["a"]]
        funcs = build_reward_funcs(reward_args, training_args, references)
    except (RecipeError, ValueError) as error:
        report.problem("judge", str(error))
        return
    judged = [getattr(fn, "__name__", "?") for fn in judge_rewards(funcs)]
    if not judged:
        report.add("judge", "no judge rewards")
        return
    start = time.monotonic()
    try:
        check_judges(funcs, rows[0] if rows else probe_row())
    except JudgeUnavailableError as error:
        report.problem("judge", str(error))
        report.add("judge", f"{reward_args.judge_base_url}: FAILED for {judged}")
        return
    latency = time.monotonic() - start
    report.add("judge", f"{reward_args.judge_base_url} ({reward_args.judge_model}): schema-valid answers for "
               f"{judged} in {latency:.2f} s")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------


def _budget(family, config, model_args, data_args, training_args, config_source, image_sizes) -> TokenBudget:
    images, source = image_tokens(family, config, model_args, config_source, image_sizes)
    prompt, exact = prompt_tokens(config_source, data_args.instruction, family)
    return TokenBudget(images, prompt, completion_tokens(training_args), exact, source)


def check_before_weights(data_args, training_args, model_args) -> None:
    """The cheap checks `balcaprl train` / `balcaprl sft` run before any weights load: environment, output folder,
    token budget at the recipe's pixel bound. Raises `RecipeError` listing every problem."""
    from transformers import AutoConfig

    from balcaprl.models import adapter_base, resolve_model_path
    from balcaprl.train import RecipeError

    report = PreflightReport()
    check_environment(report, training_args, _zero_stage_of_run(training_args))
    check_output(report, training_args)
    source = resolve_model_path(model_args.model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(adapter_base(source) or source)
    except (OSError, ValueError):  # not reachable from here (e.g. a Hub name offline): loading reports it
        config = None
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

    from balcaprl.sft import SFT_CONFIG_TYPES
    from balcaprl.train import RL_CONFIG_TYPES, RecipeError, parse_config

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

    config_source = model_config or model_args.model_name_or_path
    try:
        from transformers import AutoConfig

        from balcaprl.models import adapter_base, resolve_model_path

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
            check_memory(report, memory_estimate(shape, hardware, training_args, budget, lora=model_args.use_peft))
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


if __name__ == "__main__":
    sys.exit(main())
