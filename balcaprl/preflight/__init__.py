"""``balcaprl preflight RECIPE``: will this recipe run on this hardware? Answered before any GPU spins.

    balcaprl preflight RECIPE [--accelerate-config FILE] [--gpus N --gpu-memory GB] [--model-config DIR]
                              [--stage sft|train] [--key value ...]

From the model's config (no weights) and the recipe, six checks, every problem listed in one place at the end:

- **token budget**: image tokens at the recipe's pixel bounds for the largest image of a sample of the data, plus
  the prompt's other tokens, plus the completion → against ``vllm_max_model_length`` and the model's positions;
- **memory**: a per-GPU table at a training step and at a weight sync to vLLM (weights, ZeRO-3's gathered layers,
  gradients, optimizer states by ZeRO stage and LoRA/full, activations, TRL's fused LM head, the reference model when
  beta > 0, vLLM's share and what it must hold, the sync's merged / gathered weights), one verdict ``fits`` /
  ``tight`` / ``does not fit`` at the higher peak, its largest term and that term's remedies (docs/launching.md);
- **environment**: every package the recipe needs (``report_to`` backends, DeepSpeed, vLLM within the versions of
  the ``vllm`` extra);
- **data**: the first rows load, their images open, their references are present;
- **judge**: every judge reward's health check (`balcaprl.judge.guard.check_judges`: one real, schema-checked
  request each, with an image for precision) and its latency;
- **output**: ``output_dir`` writable; the checkpoint a re-run resumes from, if any.

Exit code 0 when every check passes, 1 otherwise. `check_before_weights` is the cheap subset (environment, output,
token budget at the recipe's pixel bound) that `balcaprl train` / `balcaprl sft` run before any weights load.

The memory figures are estimates, stated so that they can be checked by hand (see `memory_estimate`).
"""

from balcaprl._lazy import lazy_exports

__all__ = [
    "GIB",
    "MemoryEstimate",
    "PreflightReport",
    "Problem",
    "TokenBudget",
    "check_before_weights",
    "main",
    "memory_estimate",
    "preflight",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "preflight": "run",
        "main": "run",
        "check_before_weights": "run",
        "memory_estimate": "memory",
        "MemoryEstimate": "memory",
        "TokenBudget": "budget",
        "PreflightReport": "report",
        "Problem": "report",
        "GIB": "report",
    },
)
