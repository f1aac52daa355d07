"""What preflight reports: its problems and sections, and the constants its checks share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from balcaprl.preflight.budget import TokenBudget
    from balcaprl.preflight.memory import MemoryEstimate


GIB = 1024**3


# Verdict thresholds on the per-GPU total: fragmentation, NCCL buffers and allocator caches take the rest.
FITS_BELOW, TIGHT_BELOW = 0.85, 1.0


# The CUDA context, NCCL and cuBLAS workspaces of one training process (not part of any term below).
CUDA_OVERHEAD_BYTES = 1.5 * GIB


# What a GPU reports of the GB it is sold with (torch.cuda.mem_get_info's total; vendors' GB are GiB, less what the
# driver and ECC keep): an 80 GB A100 / H100 reports 79.2 GiB, a 40 GB A100 39.6 GiB, a 48 GB A6000 47.5 GiB.
DEVICE_REPORTED_FRACTION = 0.99


# CUDA graphs vLLM captures for its decode batch sizes (it logs the real figure: "Graph capturing finished ... took
# X GiB"); an assumption, stated as one.
VLLM_CUDA_GRAPH_BYTES = 1.0 * GIB


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
