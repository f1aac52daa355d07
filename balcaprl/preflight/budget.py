"""The token budget of one rollout: image tokens at the recipe's pixel bounds + the prompt's other tokens + the
completion, against ``vllm_max_model_length`` and the model's positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from balcaprl.preflight.report import BUDGET_ROUND_TO, BUDGET_SLACK, TEMPLATE_TOKENS_BOUND, PreflightReport


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
    from balcaprl.data.images import ImageResize

    if family != "qwen2_5_vl":
        return None
    low, high = None, None
    if config_source:
        try:
            from balcaprl.models.processors import checkpoint_pixel_bounds

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
