"""Per-GPU memory of a recipe, term by term, so that each can be checked by hand (`memory_estimate`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from balcaprl.preflight.budget import TokenBudget
from balcaprl.preflight.hardware import Hardware, ModelShape
from balcaprl.preflight.report import CUDA_OVERHEAD_BYTES, FITS_BELOW, GIB, TIGHT_BELOW, PreflightReport


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
