"""Per-GPU memory of a recipe, term by term, at its two peaks (a training step, and a weight sync to vLLM), so that
each can be checked by hand (`memory_estimate`), and the one verdict and advice that follow (`check_memory`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from balcaprl.preflight.budget import TokenBudget
from balcaprl.preflight.hardware import Hardware, ModelShape
from balcaprl.preflight.report import (
    CUDA_OVERHEAD_BYTES,
    DEVICE_REPORTED_FRACTION,
    FITS_BELOW,
    GIB,
    TIGHT_BELOW,
    VLLM_CUDA_GRAPH_BYTES,
    PreflightReport,
)

# TRL 1.16's fused LM head (trl/kernels/chunked_logprob.py): log-probabilities computed on [4096 tokens x 32768
# vocabulary] tiles, never the full logits; gradients accumulated in float32.
LM_HEAD_TOKEN_TILE, LM_HEAD_VOCAB_TILE = 4096, 32768
# TRL 1.16 builds the colocated vLLM engine with max_num_batched_tokens=4096 (trl/generation/vllm_generation.py).
VLLM_BATCHED_TOKENS = 4096

# Terms alive only inside a training step's forward / backward (freed before the next weight sync).
STEP_TERMS = ("activations", "LM head", "ZeRO-3 gathered")


@dataclass
class VLLMNeeds:
    """What the colocated engine must fit in its share of the GPU (bytes)."""

    weights: float
    kv_cache: float
    own_peak: float  # its profiling run's activations + CUDA graphs
    share: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.own_peak

    @property
    def holds(self) -> bool:
        return self.total <= self.share

    def utilization_needed(self, gpu_bytes: float) -> float:
        """The ``vllm_gpu_memory_utilization`` that holds `total`, rounded up to the next 0.05."""
        return math.ceil(self.total / gpu_bytes * 20) / 20


@dataclass
class MemoryEstimate:
    """Per-GPU bytes by term at a training step (`terms`) and at a weight sync (`sync_terms`, the resident terms plus
    what the sync adds; empty without vLLM), the GPU's bytes as the device reports them, and the colocated engine's
    needs. `verdict` is ``fits`` / ``tight`` / ``does not fit``, taken at the higher peak and at the engine's share."""

    terms: dict[str, float]
    gpu_bytes: float
    notes: list[str] = field(default_factory=list)
    sync_terms: dict[str, float] = field(default_factory=dict)
    vllm: VLLMNeeds | None = None
    gpu_label: str = ""

    @property
    def training_total(self) -> float:
        return sum(self.terms.values())

    @property
    def sync_total(self) -> float:
        return sum(self.sync_terms.values())

    @property
    def total(self) -> float:
        """The higher of the two peaks."""
        return max(self.training_total, self.sync_total)

    @property
    def peak(self) -> str:
        return "weight sync" if self.sync_total > self.training_total else "training step"

    @property
    def peak_terms(self) -> dict[str, float]:
        return self.sync_terms if self.peak == "weight sync" else self.terms

    @property
    def largest(self) -> str:
        terms = self.peak_terms
        return max(terms, key=terms.get)

    @property
    def verdict(self) -> str:
        share = self.total / self.gpu_bytes
        if share > TIGHT_BELOW or (self.vllm is not None and not self.vllm.holds):
            return "does not fit"
        return "fits" if share < FITS_BELOW else "tight"

    def table(self) -> str:
        names = list(dict.fromkeys([*self.terms, *self.sync_terms]))
        with_sync = bool(self.sync_terms)
        header = f"{'term (GiB)':<52}{'training step':>14}" + (f"{'weight sync':>14}" if with_sync else "")
        lines = [header]
        for name in names:
            row = f"{name:<52}{_gib(self.terms.get(name)):>14}"
            lines.append(row + (f"{_gib(self.sync_terms.get(name)):>14}" if with_sync else ""))
        totals = f"{'total per GPU':<52}{_gib(self.training_total):>14}" + (
            f"{_gib(self.sync_total):>14}" if with_sync else ""
        )
        lines.append(f"{totals}  of {self.gpu_bytes / GIB:.1f} GiB ({self.gpu_label})")
        if self.vllm is not None:
            v = self.vllm
            lines.append(
                f"vLLM's share {v.share / GIB:.2f} GiB {'holds' if v.holds else 'cannot hold'} its weights "
                f"{v.weights / GIB:.2f} + KV cache {v.kv_cache / GIB:.2f} + own peak (profile, CUDA graphs) "
                f"{v.own_peak / GIB:.2f} = {v.total / GIB:.2f} GiB"
            )
        lines.append(
            f"verdict: {self.verdict} (peak {self.total / GIB:.1f} GiB at the {self.peak}, "
            f"{self.total / self.gpu_bytes:.0%} of the GPU; largest term: {self.largest})"
        )
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def gpu_capacity(gpu_memory_gb: float) -> float:
    """Bytes a GPU sold as ``gpu_memory_gb`` GB reports (``torch.cuda.mem_get_info``'s total, what vLLM's
    ``gpu_memory_utilization`` is a fraction of): vendors' GB are GiB here, less what the driver keeps
    (`DEVICE_REPORTED_FRACTION`: an 80 GB A100/H100 reports 79.2 GiB)."""
    return gpu_memory_gb * DEVICE_REPORTED_FRACTION * GIB


def memory_estimate(
    shape: ModelShape, hardware: Hardware, training_args, budget: TokenBudget, *, lora: bool = False
) -> MemoryEstimate:
    """Per-GPU memory of one training process, term by term (bytes). The arithmetic, so that it can be checked:

    With P parameters (tied embeddings once), T trainable, d bytes per weight (the recipe's ``dtype``), N processes,
    ZeRO stage z, h hidden, i intermediate, k key/value width, L layers, V vocabulary:
    - weights P·d, divided by N under ZeRO-3;
    - ZeRO-3 gathered layers: 2·G·d with G the largest module's own parameters (the layer in use and the one
      prefetched; DeepSpeed's own estimator counts 4·G bytes);
    - gradients T·d, divided by N under ZeRO-2/3;
    - optimizer (AdamW): under DeepSpeed fp32 master weights + two moments, 12·T bytes divided by N; without
      DeepSpeed two moments in the weights' dtype, 2·T·d. (DeepSpeed also makes an fp32 gradient partition, 4·T/N,
      inside the optimizer step, when the activations are freed: not part of either peak.)
    - activations of the micro-batch (b rows of s = budget tokens), counting what a decoder layer saves for backward
      (the norms' inputs and outputs, q/k/v, the attention output, the MLP's gate, up, activation and product; sdpa
      keeps no attention matrix): a = b·s·(6h + 2k + 4i)·d per layer; without gradient checkpointing L·a, with it
      L·b·s·h·d (the layers' inputs) + a (the one layer recomputed at a time);
    - LM head, TRL's fused log-probabilities over the n = b·c completion tokens (SFT: n = b·s): one tile of
      min(n, 4096) x min(V, 32768) in d bytes and the float32 gradient of the hidden states, 4·n·h; the full logits
      never exist. With full fine-tuning, the LM head's weight gradient is accumulated in float32 (4·V·h) on top;
    - reference model (beta > 0, full fine-tuning; LoRA uses the base with adapters off): P·d, /N under ZeRO-3;
    - vLLM colocated: ``vllm_gpu_memory_utilization`` of the GPU. In it: its weights P·d, the KV cache of
      b·steps_per_generation sequences of ``vllm_max_model_length`` tokens (2·L·k·d bytes per token), and its own
      peak: the profiling run's activations (4096 batched tokens through one layer, b·(4h + 2k + 3i)·d per token, or
      the vision tower on the largest image the checkpoint's processor allows, (4h_v + 3i_v)·d per patch, the larger)
      and CUDA graphs (`VLLM_CUDA_GRAPH_BYTES`);
    - at a weight sync (vLLM), instead of the step's activations, LM head and gathered layers: with LoRA one merged
      layer (the largest targeted weight, in·out·d), and under ZeRO-3 one LoRA layer or one other parameter gathered
      at a time (the largest, ·d; `CaptioningVLLMGeneration` gathers per layer where TRL's PEFT path gathers the
      whole model);
    - a fixed 1.5 GiB for the CUDA context and communication buffers.
    GPU capacity is the device's report (`gpu_capacity`). Not modelled: fragmentation (the verdict keeps 15 % for it
    and allocator caches), the vision tower's activations in training (frozen, no gradients; small beside the
    language model's), NCCL buffers beyond the fixed term, CPU offload.
    """
    n, stage, d = hardware.num_processes, hardware.zero_stage, shape.dtype_bytes
    P, T = shape.total_parameters, shape.trainable_parameters  # noqa: N806 -- the docstring's symbols
    h, i, L, V = shape.hidden_size, shape.intermediate_size, shape.num_layers, shape.vocab_size  # noqa: N806
    k = shape.hidden_size // shape.num_attention_heads * shape.num_key_value_heads
    b, s, c = training_args.per_device_train_batch_size, budget.total, budget.completion_tokens
    terms: dict[str, float] = {}
    terms["weights"] = P * d / (n if stage == 3 else 1)
    if stage == 3:
        terms["ZeRO-3 gathered layers (in use + prefetched)"] = 2 * shape.largest_layer_parameters * d
    terms["gradients"] = T * d / (n if stage >= 2 else 1)
    terms["optimizer states (AdamW)"] = 12 * T / n if stage >= 1 else 2 * T * d
    per_layer = b * s * (6 * h + 2 * k + 4 * i) * d
    if training_args.gradient_checkpointing:
        terms["activations (gradient checkpointing)"] = L * b * s * h * d + per_layer
    else:
        terms["activations (no gradient checkpointing)"] = L * per_layer
    scored = b * (c or s)
    terms["LM head tiles (TRL's fused log-probs)"] = (
        min(scored, LM_HEAD_TOKEN_TILE) * min(V, LM_HEAD_VOCAB_TILE) * d + 4 * scored * h
    )
    if shape.lm_head_trained:
        terms["LM head weight gradient (float32)"] = 4 * V * h
    notes = [
        f"{n} processes, {hardware.source}; {P:,} parameters, {T:,} trainable; {b} rows of {s} tokens per micro-batch"
    ]
    if getattr(training_args, "beta", 0.0) and not lora:
        terms["reference model (beta > 0)"] = P * d / (n if stage == 3 else 1)
    gpu_bytes = gpu_capacity(hardware.gpu_memory_gb)
    use_vllm = getattr(training_args, "use_vllm", False)
    vllm = None
    if use_vllm and training_args.vllm_mode == "colocate":
        share = training_args.vllm_gpu_memory_utilization * gpu_bytes
        terms[f"vLLM share ({training_args.vllm_gpu_memory_utilization:g} of the GPU)"] = share
        steps = getattr(training_args, "steps_per_generation", None) or training_args.gradient_accumulation_steps
        length = training_args.vllm_max_model_length or shape.max_positions
        tensor_parallel = getattr(training_args, "vllm_tensor_parallel_size", 1) or 1
        language_peak = VLLM_BATCHED_TOKENS * (4 * h + 2 * k + 3 * i) * d
        vision_h, vision_i = shape.vision_hidden_size, shape.vision_intermediate_size
        vision_peak = shape.profile_image_patches * (4 * vision_h + 3 * vision_i) * d
        vllm = VLLMNeeds(
            weights=P * d / tensor_parallel,
            kv_cache=b * steps * length * 2 * L * k * d / tensor_parallel,
            own_peak=max(language_peak, vision_peak) + VLLM_CUDA_GRAPH_BYTES,
            share=share,
        )
        notes.append(
            f"vLLM: KV cache for {b * steps} rollouts x {length} tokens; it profiles the checkpoint's largest image "
            f"({shape.profile_image_patches:,} patches) unless bounded, and CUDA graphs are taken as "
            f"{VLLM_CUDA_GRAPH_BYTES / GIB:g} GiB (vLLM logs its own figure at start-up)"
        )
    elif use_vllm:
        notes.append("vLLM in server mode: rollouts run on the vllm-serve node; the weight sync still runs here")
    terms["CUDA context and buffers (fixed)"] = CUDA_OVERHEAD_BYTES
    sync_terms = _sync_terms(terms, shape, n, stage, d, lora) if use_vllm else {}
    if not c:
        notes.append("SFT: sequences counted as image + prompt tokens; the caption's own tokens come on top")
    label = f"a {hardware.gpu_memory_gb:g} GB GPU as the device reports it"
    return MemoryEstimate(terms, gpu_bytes, notes, sync_terms, vllm, label)


def _sync_terms(terms: dict[str, float], shape: ModelShape, n: int, stage: int, d: int, lora: bool):
    """The terms at a weight sync: what stays resident, plus what the sync itself allocates (see `memory_estimate`)."""
    resident = {name: value for name, value in terms.items() if not name.startswith(STEP_TERMS)}
    if lora:
        resident["sync: one merged LoRA layer"] = shape.largest_lora_weight * d
    if stage == 3:  # one LoRA layer (its weight) or one other parameter gathered at a time
        resident["sync: one layer gathered (ZeRO-3)"] = max(shape.largest_parameter, shape.largest_lora_weight) * d
    return resident


def advice(estimate: MemoryEstimate, hardware: Hardware, training_args, lora: bool) -> list[str]:
    """Remedies for the largest term of the peak, none already in effect (a higher ZeRO stage only below 3, gradient
    checkpointing only when off, a lower vLLM share only when vLLM needs less)."""
    largest, stage = estimate.largest, hardware.zero_stage
    remedies = []
    if largest.startswith("vLLM share") and estimate.vllm is not None:
        needed = estimate.vllm.utilization_needed(estimate.gpu_bytes)
        if needed < training_args.vllm_gpu_memory_utilization:
            remedies.append(f"lower vllm_gpu_memory_utilization to {needed:.2f} (vLLM needs {needed:.0%} of the GPU)")
        remedies += ["vllm_enable_sleep_mode: true (frees the share while training)", "vllm_mode: server"]
    elif largest.startswith("activations"):
        if not training_args.gradient_checkpointing:
            remedies.append("gradient_checkpointing: true")
        remedies.append("a smaller per_device_train_batch_size (with more gradient_accumulation_steps)")
    elif largest.startswith("LM head"):
        remedies.append("a smaller per_device_train_batch_size" + ("" if lora else ", or LoRA"))
    else:  # weights, gradients, optimizer states, reference model, gathered layers
        if stage < 3:
            remedies.append(
                f"ZeRO-3 (recipes/accelerate/zero3.yaml) instead of {'ZeRO-' + str(stage) if stage else 'DDP'}"
            )
        if not lora:
            remedies.append("LoRA (use_peft: true)")
        remedies.append("more GPUs")
    return remedies


def check_memory(report: PreflightReport, estimate: MemoryEstimate, hardware: Hardware, training_args, lora: bool):
    """The table, and one problem when the verdict is ``does not fit`` (its reason and the remedies of `advice`)."""
    report.memory = estimate
    report.add("memory per GPU (estimate)", estimate.table())
    if estimate.verdict != "does not fit":
        return
    reasons = []
    if estimate.total > TIGHT_BELOW * estimate.gpu_bytes:
        largest = estimate.peak_terms[estimate.largest]
        reasons.append(
            f"{estimate.total / GIB:.1f} GiB per GPU needed at the {estimate.peak}, {estimate.gpu_bytes / GIB:.1f} "
            f"GiB there; the largest term is {estimate.largest} ({largest / GIB:.1f} GiB)"
        )
        remedies = advice(estimate, hardware, training_args, lora)
    else:
        remedies = []
    vllm = estimate.vllm
    if vllm is not None and not vllm.holds:
        reasons.append(
            f"vLLM's share ({vllm.share / GIB:.1f} GiB) cannot hold its weights ({vllm.weights / GIB:.1f} GiB), the "
            f"KV cache of the rollout batch ({vllm.kv_cache / GIB:.1f} GiB) and its own peak "
            f"({vllm.own_peak / GIB:.1f} GiB)"
        )
        needed = vllm.utilization_needed(estimate.gpu_bytes)
        spare = TIGHT_BELOW * estimate.gpu_bytes - estimate.total
        if (needed - training_args.vllm_gpu_memory_utilization) * estimate.gpu_bytes <= spare:
            remedies.append(f"raise vllm_gpu_memory_utilization to {needed:.2f}")
        remedies += ["lower vllm_max_model_length or the rollouts per step", "vllm_mode: server on its own node"]
    report.problem("memory", f"does not fit: {'; and '.join(reasons)}. Try: {'; '.join(remedies)}.")
