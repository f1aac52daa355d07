"""TRL 1.16's vLLM generation, mended for image captioning (`CaptioningVLLMGeneration`).

Vision placeholder tokens are never sampled, colocated vLLM gets one placeholder per image (TRL expands them
once already, huggingface/trl#6294), vLLM's image-token counts are checked against the trainer's on every batch
(colocate and server mode), and LoRA weights are merged for vLLM without touching the base weights.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
from accelerate.utils import is_peft_model
from trl.generation.vllm_generation import VLLMGeneration

# Config attributes naming the vision placeholder tokens of the supported families (LLaVA: `<image>`; Qwen2.5-VL:
# `<|image_pad|>`, `<|video_pad|>`, `<|vision_start|>`, `<|vision_end|>`). A caption never contains them, and a sampled
# image or video pad breaks the next forward pass ("Image features and image tokens do not match").
VISION_TOKEN_ATTRIBUTES = (
    "image_token_id",
    "image_token_index",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
)


def vision_token_ids(config) -> list[int]:
    """Ids of the vision placeholder tokens a model config declares (`VISION_TOKEN_ATTRIBUTES`), without repeats."""
    ids = (getattr(config, name, None) for name in VISION_TOKEN_ATTRIBUTES)
    return list(dict.fromkeys(token_id for token_id in ids if isinstance(token_id, int)))


# Sampling-only keys a recipe may set in `generation_kwargs` (which TRL passes to vLLM's SamplingParams after its own
# temperature): SCST's greedy baseline drops them and decodes at temperature 0.
SAMPLING_ONLY_KWARGS = ("temperature", "top_p", "top_k", "min_p")


def greedy_generation_kwargs(generation_kwargs: dict) -> dict:
    """The recipe's vLLM ``generation_kwargs`` for greedy decoding: sampling-only keys dropped, temperature 0 (vLLM
    then resets top-p / top-k / min-p itself). Other keys (``bad_words``, penalties, ``seed``) are kept."""
    kept = {key: value for key, value in generation_kwargs.items() if key not in SAMPLING_ONLY_KWARGS}
    return {**kept, "temperature": 0.0}


def _run_lengths(token_ids: list[int], token_id: int) -> list[int]:
    """Length of every run of ``token_id``, in order."""
    return [len(list(run)) for token, run in itertools.groupby(token_ids) if token == token_id]


def _resolution_mismatch(engine: str, prompt: str, engine_count: int, trainer_count: int) -> str:
    return (
        f"{engine} processed the image(s) of {prompt} into {engine_count} image tokens, the trainer's processor into "
        f"{trainer_count}: the rollouts were sampled from another image resolution than the one trained on. vLLM "
        "resizes with the checkpoint's default processor settings; resize the images once in the data (the recipe's "
        "min_pixels / max_pixels) so both see the same pixels."
    )


def _collapse_runs(token_ids: list[int], token_id: int) -> list[int]:
    """``token_ids`` with every run of ``token_id`` shortened to one token."""
    return [t for i, t in enumerate(token_ids) if t != token_id or i == 0 or token_ids[i - 1] != token_id]


@contextlib.contextmanager
def swapped_attributes(target, **attributes):
    """Sets attributes of ``target`` for the duration of the block, then restores them."""
    saved = {name: getattr(target, name) for name in attributes}
    for name, value in attributes.items():
        setattr(target, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(target, name, value)


class CaptioningVLLMGeneration(VLLMGeneration):
    """TRL 1.16's `VLLMGeneration` with three fixes for captioning; the trainer sets it as its engine's class.

    - ``generate`` (colocate): TRL sends the processor-expanded prompt with the raw image; vLLM expands the first image
      placeholder again, so each image's tokens appear twice and only one copy gets features (huggingface/trl#6294).
      Each run of image tokens is sent as one placeholder instead, and vLLM's processed prompt must then hold as many
      image tokens as the trainer's, else the rollouts saw another image resolution than the one trained on.
    - ``_place_features`` (server): the server processes each prompt's images alone and reports how many image tokens
      each became (its ``mm_placeholders``); TRL re-points them at the trainer's runs and keeps the trainer's lengths
      without comparing. They must be equal, for the same reason. (The server's generate response only echoes the
      trainer's prompt ids, so the count is taken from the image processing response.)
    - ``_iter_named_params`` (LoRA): TRL merges the adapter into the base weights and unmerges it after the sync,
      which rounds the base weights twice in bf16 and drifts them a little at every sync. The merged weights are
      computed beside the base weights instead, which stay untouched; other PEFT methods and FSDP keep TRL's path.
      Under ZeRO-3, TRL gathers the whole model for the sync; here one LoRA layer, or one other parameter, at a time.
    """

    def generate(self, prompts, images, num_generations, profiler=None):
        if self.mode != "colocate" or images is None:
            return super().generate(prompts, images, num_generations, profiler)
        image_token_id = self.processing_class.image_token_id
        collapsed = [_collapse_runs(list(ids), image_token_id) for ids in prompts]
        output = super().generate(collapsed, images, num_generations, profiler)
        for index, (ours, engines) in enumerate(zip(prompts, output[0])):
            ours_count, engine_count = list(ours).count(image_token_id), list(engines).count(image_token_id)
            if ours_count != engine_count:
                prompt = f"prompt {index} of this batch"
                raise ValueError(_resolution_mismatch("vLLM", prompt, engine_count, ours_count))
        return output

    def _place_features(self, features, prompt_ids):
        # Server mode, main process only (as TRL's own check here; `accelerate launch` then stops the other ranks).
        if features is not None:
            engine_lengths = [placeholder["length"] for placeholder in features["mm_placeholders"]["image"]]
            our_lengths = _run_lengths(list(prompt_ids), self.processing_class.image_token_id)
            # A different number of runs is TRL's error (below); the same number with other lengths is ours.
            if len(engine_lengths) == len(our_lengths) and engine_lengths != our_lengths:
                message = _resolution_mismatch(
                    "The vLLM server", "a prompt of this batch", sum(engine_lengths), sum(our_lengths)
                )
                raise ValueError(f"{message} Per image: server {engine_lengths}, trainer {our_lengths}.")
        return super()._place_features(features, prompt_ids)

    def _iter_named_params(self):
        model = self.model
        if not is_peft_model(model) or self._dist.is_fsdp:
            yield from super()._iter_named_params()
            return
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer

        tuner_layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
        if any(not isinstance(layer, LoraLayer) or layer.lora_variant for layer in tuner_layers):
            yield from super()._iter_named_params()  # DoRA and non-LoRA adapters: TRL's merge / unmerge
            return
        # The LoRA layer owning each base weight / bias whose adapter is not merged in. Merged tensors are made one
        # layer at a time, as `named_parameters` reaches the layer, so a sync holds at most one layer's merged copy
        # (merging every layer first held ~12 GiB of bf16 for a 7B model with the language_model preset).
        owners = {}
        for layer in tuner_layers:
            if not layer.merged:
                base = layer.get_base_layer()
                owners[id(base.weight)] = layer
                if getattr(base, "bias", None) is not None:
                    owners[id(base.bias)] = layer
        # Under ZeRO-3 (`gather_params` is a no-op otherwise) nothing is gathered for longer than it is needed: a LoRA
        # layer's own parameters (base weight, bias, adapters) while its merged tensors are computed, any other
        # parameter alone while it is sent, as TRL does without PEFT; TRL's PEFT path gathers the whole model for the
        # whole sync. Gathering is a collective: every process walks the same names and makes the same calls.
        zero3 = self._dist.is_zero3
        pending: dict[int, torch.Tensor] = {}  # the other tensor (weight or bias) of the layer being sent
        for name, param in model.named_parameters():
            # The parameter names TRL sends (see VLLMGeneration._iter_named_params).
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            if model.prefix in name or "original_module" in name:
                continue
            name = self._fix_param_name_to_vllm(name, extra_prefixes=["modules_to_save.default."])
            tensor = pending.pop(id(param), None)
            if tensor is None and id(param) in owners:
                layer = owners[id(param)]
                with self._dist.gather_params(list(layer.parameters())):
                    merged = _merged_lora_tensors(layer)
                    if zero3:  # a tensor still sharing the gathered storage (no adapter merged) outlives the gather
                        merged = {key: _owned_copy(value, layer) for key, value in merged.items()}
                tensor = merged.pop(id(param))
                pending.update(merged)
                del merged
            if tensor is None:
                with self._dist.gather_params([param]):
                    yield name, param.data
            else:
                yield name, tensor
                del tensor  # not kept while the engine loads the next parameter


def _owned_copy(tensor: torch.Tensor, layer) -> torch.Tensor:
    """``tensor``, copied if it shares storage with one of ``layer``'s parameters."""
    storage = tensor.untyped_storage().data_ptr()
    if any(p.untyped_storage().data_ptr() == storage for p in layer.parameters()):
        return tensor.clone()
    return tensor


def _merged_lora_tensors(layer) -> dict[int, torch.Tensor]:
    """The base weight (and bias) of a LoRA layer with its active adapters merged, by `id` of the base parameter.

    Same arithmetic as peft's ``LoraLayer.merge`` (each adapter's delta added in turn, rounded to the base dtype),
    so the values equal what ``merge_adapter`` would produce, but written to new tensors.
    """
    base = layer.get_base_layer()
    weight = base.weight.data
    bias = base.bias.data if getattr(base, "bias", None) is not None else None
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A and adapter not in getattr(layer, "lora_embedding_A", {}):
            continue
        weight = (weight + layer.get_delta_weight(adapter)).to(base.weight.dtype)
        if layer.lora_bias.get(adapter) and bias is not None:
            bias = (bias + layer.lora_B[adapter].bias * layer.scaling[adapter]).to(base.bias.dtype)
    merged = {id(base.weight): weight}
    if bias is not None:
        merged[id(base.bias)] = bias
    return merged
