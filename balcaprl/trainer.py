"""`BalCapGRPOTrainer`: TRL's `GRPOTrainer` with BalCapRL's reward masking and advantage estimators.

Generation, the clipped policy loss, KL, PEFT, vLLM and DeepSpeed stay TRL's. This subclass touches the reward matrix
(length-conditional masking) and the advantages (`balcaprl.advantages.compute_advantages`), and mends TRL 1.16's vLLM
path for image captioning (`_CaptioningVLLMGeneration`): vision placeholder tokens are never sampled, colocated vLLM
gets one placeholder per image, and LoRA weights are merged for vLLM without touching the base weights.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import numbers
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather, is_peft_model
from torch import nn
from trl import GRPOTrainer
from trl.generation.vllm_generation import VLLMGeneration
from trl.trainer.utils import get_callable_name, is_async_callable

from balcaprl.advantages import compute_advantages, distinct_per_group, nanstd
from balcaprl.completions import completion_text
from balcaprl.config import BalCapConfig
from balcaprl.length import apply_length_mask, length_conditional_mask, length_ratios, word_length


class RewardFunctionError(RuntimeError):
    """A reward function raised, or returned something other than one finite float or None per completion."""


class _CheckedReward:
    """Wraps a reward function so that a bad output or an exception fails with the reward's name and the step.

    NaN and inf are errors, not "unscorable": a reward that cannot score a caption must say so with ``None``; a NaN
    from arithmetic is a bug that would otherwise be silently dropped from the group statistics.
    """

    def __init__(self, reward_func: Callable):
        self.reward_func = reward_func
        self.__name__ = get_callable_name(reward_func)
        functools.update_wrapper(self, reward_func, assigned=("__doc__", "__module__", "__qualname__"), updated=())

    def __getattr__(self, name):  # expose the wrapped function's attributes (e.g. its judge client)
        if name == "reward_func":
            raise AttributeError(name)
        return getattr(self.reward_func, name)

    def _where(self, kwargs, completions) -> str:
        state = kwargs.get("trainer_state")
        step = f"step {state.global_step}" if state is not None else "an unknown step"
        return f"at {step}, on a batch of {len(completions)} completions"

    def _failed(self, error: Exception, kwargs, completions) -> RewardFunctionError:
        return RewardFunctionError(
            f"Reward function {self.__name__!r} raised {type(error).__name__} {self._where(kwargs, completions)}: "
            f"{error}"
        )

    def _check(self, values, kwargs, completions) -> list:
        where = self._where(kwargs, completions)
        if values is None or len(values) != len(completions):
            count = "None" if values is None else len(values)
            raise RewardFunctionError(
                f"Reward function {self.__name__!r} returned {count} values {where}; it must return one float (or "
                "None when it cannot score) per completion."
            )
        checked = []
        for index, value in enumerate(values):
            if isinstance(value, torch.Tensor) and value.dim() == 0:
                value = value.item()  # a 0-d tensor, as TRL accepts
            if value is not None and not (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))):
                value = math.nan  # reported below: not a number
            if value is not None and not math.isfinite(value):
                raise RewardFunctionError(
                    f"Reward function {self.__name__!r} returned {values[index]!r} for completion {index} {where}; "
                    "return a finite float, or None for a completion it cannot score."
                )
            checked.append(None if value is None else float(value))  # numpy scalars become floats
        return checked

    def __call__(self, prompts, completions, **kwargs):
        try:
            values = self.reward_func(prompts=prompts, completions=completions, **kwargs)
        except Exception as error:
            raise self._failed(error, kwargs, completions) from error
        return self._check(values, kwargs, completions)


class _AsyncCheckedReward(_CheckedReward):
    async def __call__(self, prompts, completions, **kwargs):
        try:
            values = await self.reward_func(prompts=prompts, completions=completions, **kwargs)
        except Exception as error:
            raise self._failed(error, kwargs, completions) from error
        return self._check(values, kwargs, completions)


def checked_reward(reward_func):
    """`reward_func` wrapped by `_CheckedReward` (async kept async); reward models and model names pass through."""
    if isinstance(reward_func, (str, nn.Module, _CheckedReward)):
        return reward_func
    return (_AsyncCheckedReward if is_async_callable(reward_func) else _CheckedReward)(reward_func)


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


def _collapse_runs(token_ids: list[int], token_id: int) -> list[int]:
    """``token_ids`` with every run of ``token_id`` shortened to one token."""
    return [t for i, t in enumerate(token_ids) if t != token_id or i == 0 or token_ids[i - 1] != token_id]


@contextlib.contextmanager
def _swapped_attributes(target, **attributes):
    """Sets attributes of ``target`` for the duration of the block, then restores them."""
    saved = {name: getattr(target, name) for name in attributes}
    for name, value in attributes.items():
        setattr(target, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(target, name, value)


class _CaptioningVLLMGeneration(VLLMGeneration):
    """TRL 1.16's `VLLMGeneration` with two fixes for captioning; the trainer sets it as its engine's class.

    - ``generate`` (colocate): TRL sends the processor-expanded prompt with the raw image; vLLM expands the first image
      placeholder again, so each image's tokens appear twice and only one copy gets features (huggingface/trl#6294).
      Each run of image tokens is sent as one placeholder instead, and vLLM's processed prompt must then hold as many
      image tokens as the trainer's, else the rollouts saw another image resolution than the one trained on.
    - ``_iter_named_params`` (LoRA): TRL merges the adapter into the base weights and unmerges it after the sync,
      which rounds the base weights twice in bf16 and drifts them a little at every sync. The merged weights are
      computed beside the base weights instead, which stay untouched; other PEFT methods and FSDP keep TRL's path.
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
                raise ValueError(
                    f"vLLM processed the image(s) of prompt {index} of this batch into {engine_count} image tokens, "
                    f"the trainer's processor into {ours_count}: the rollouts were sampled from another image "
                    "resolution than the one trained on. vLLM resizes with the checkpoint's default processor "
                    "settings; resize the images once in the data (the recipe's min_pixels / max_pixels) so both see "
                    "the same pixels."
                )
        return output

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
        with self._dist.gather_params(list(model.parameters())):
            merged = {}
            for layer in tuner_layers:
                if not layer.merged:
                    merged.update(_merged_lora_tensors(layer))
            for name, param in model.named_parameters():
                # The parameter names TRL sends (see VLLMGeneration._iter_named_params).
                name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                if model.prefix in name or "original_module" in name:
                    continue
                name = self._fix_param_name_to_vllm(name, extra_prefixes=["modules_to_save.default."])
                yield name, merged.get(id(param), param.data)


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


def _fraction_in_constant_groups(rewards: torch.Tensor, num_generations: int) -> float:
    """Fraction of completions whose group has every reward constant (zero or undefined std: nothing to learn)."""
    grouped = rewards.view(-1, num_generations, rewards.shape[1])
    spread = torch.nan_to_num(nanstd(grouped.double(), dim=1), nan=0.0)  # (groups, K); < 2 scored: no spread
    return (spread == 0).all(dim=1).double().mean().item()


def _pad_prompts_on_the_left(processing_class) -> None:
    """Left padding and truncation, as TRL sets them on a processor it loads itself (but not on one it is given).

    TRL left-pads the prompt ids, but pads per-token processor outputs such as Qwen2.5-VL's ``mm_token_type_ids`` with
    the processor's own padding side. With right padding, a batch whose images differ in size (so its prompts differ
    in length) gets its M-RoPE positions from misaligned token types: a shape-mismatch crash in ``get_rope_index``.
    """
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if tokenizer is not None and hasattr(tokenizer, "padding_side"):
        tokenizer.padding_side = "left"
        tokenizer.truncation_side = "left"


class BalCapGRPOTrainer(GRPOTrainer):
    """GRPO trainer for captioning with c-GDPO / GRPO / SCST advantages and length-conditional reward masking.

    Takes the arguments of `trl.GRPOTrainer`; ``args`` must be a `BalCapConfig`. Metrics added to TRL's, every
    step: ``length/ratio_mean``, ``length/masked_frac``, ``advantages/distinct_per_group``, for SCST
    ``scst/baseline_reward``, and with judge rewards ``judge/requests``, ``judge/retries``, ``judge/failures``,
    ``judge/cache_hits``, ``judge/bytes_sent`` (summed over processes, SCST's greedy-caption scoring included).
    Under c-GDPO, TRL's ``frac_reward_zero_std`` is replaced by the fraction of completions whose group has every
    reward constant. The processor it is given pads prompts on the left, as TRL sets on a processor it loads.

    Reward functions are checked: one finite float or None per completion, else `RewardFunctionError` naming the
    reward and the step; an exception inside a reward is re-raised the same way.

    Vision placeholder tokens (`vision_token_ids`) are never sampled: with vLLM through its ``bad_words`` sampling
    parameter (honoured in colocate and server mode), with transformers through ``suppress_tokens``. With vLLM,
    SCST's greedy baseline is decoded by the vLLM engine too (temperature 0).
    """

    def __init__(self, model, reward_funcs, args: BalCapConfig | None = None, **kwargs):
        if reward_funcs is None:
            reward_funcs = []
        elif not isinstance(reward_funcs, list):
            reward_funcs = [reward_funcs]
        if not isinstance(args, BalCapConfig):
            raise TypeError(f"BalCapGRPOTrainer needs args of type BalCapConfig, got {type(args).__name__}.")
        _pad_prompts_on_the_left(kwargs.get("processing_class"))
        super().__init__(model, [checked_reward(fn) for fn in reward_funcs], args, **kwargs)
        duplicates = sorted({name for name in self.reward_func_names if self.reward_func_names.count(name) > 1})
        if duplicates:
            # Metrics, masking and reward weights are addressed by name: two functions of one name would be confused.
            raise ValueError(
                f"Reward functions must have distinct names; {duplicates} appear more than once in "
                f"{self.reward_func_names}. Give each its own __name__ (e.g. a factory that sets it)."
            )
        unknown = [name for name in self.args.length_mask_rewards if name not in self.reward_func_names]
        if unknown:
            raise ValueError(
                f"length_mask_rewards names {unknown}, which are not reward functions of this run; "
                f"the reward functions are {self.reward_func_names}."
            )
        self._masked_reward_columns = [self.reward_func_names.index(name) for name in self.args.length_mask_rewards]
        self._length_fn = word_length if self.args.length_unit == "words" else self._token_length
        # Judge clients of the reward functions (shared clients counted once), for the judge/* metrics.
        judges = (getattr(fn, "judge", None) for fn in self.reward_funcs)
        self._judges = list({id(judge): judge for judge in judges if hasattr(judge, "pop_metrics")}.values())
        self._last_scored: dict[str, Any] = {}
        self._forbid_vision_tokens()

    def _forbid_vision_tokens(self) -> None:
        """Keeps vision placeholder tokens out of sampled captions, on the vLLM and on the transformers path."""
        token_ids = vision_token_ids(self.model.config) if self._is_vlm else []
        if not self.use_vllm:
            if token_ids:  # TRL suppresses the image token only
                suppressed = list(self.generation_config.suppress_tokens or [])
                self.generation_config.suppress_tokens = suppressed + [t for t in token_ids if t not in suppressed]
            return
        self.vllm_generation.__class__ = _CaptioningVLLMGeneration
        # vLLM's `bad_words` are strings (JSON-safe for server mode, unlike logit_bias's int keys) that vLLM tokenizes
        # without special tokens; a one-token bad word gets logit -inf at every step, which no model output can beat.
        words = self._tokenizer.convert_ids_to_tokens(token_ids)
        for word, token_id in zip(words, token_ids):
            encoded = self._tokenizer.encode(word, add_special_tokens=False)
            if encoded != [token_id]:
                raise ValueError(
                    f"The vision token {word!r} (id {token_id}) tokenizes to {encoded}, not to itself, so vLLM's "
                    "bad_words cannot forbid it; the tokenizer must declare it as a special (added) token."
                )
        kwargs = dict(self.vllm_generation.generation_kwargs)  # a copy: never edit the user's config in place
        bad_words = list(kwargs.get("bad_words") or [])
        kwargs["bad_words"] = bad_words + [word for word in words if word not in bad_words]
        self.vllm_generation.generation_kwargs = kwargs

    def _token_length(self, text: str) -> int:
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """Masks the gathered reward matrix by caption length: TRL's only hook that holds the whole matrix."""
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        column = self.args.reference_column
        ratios = keep = None
        if self._masked_reward_columns or self._all_rows_have_references(inputs, column):
            if column not in inputs[0]:
                raise ValueError(
                    f"Length masking of {self.args.length_mask_rewards} needs the reference column "
                    f"{column!r} (reference_column), but the dataset rows have only {sorted(inputs[0])}. "
                    "Add the column, set reference_column, or set length_mask_rewards to []."
                )
            local_ratios = length_ratios(
                [completion_text(c) for c in completions], [row[column] for row in inputs], self._length_fn
            )
            ratios = gather(local_ratios.to(rewards.device))
            keep = length_conditional_mask(ratios, *self.args.length_mask_window)
            rewards = apply_length_mask(rewards, keep, self._masked_reward_columns)
        self._last_scored = {"rewards": rewards, "ratios": ratios, "keep": keep, "prompts": prompts}
        return rewards

    def _all_rows_have_references(self, inputs, column: str) -> bool:
        """Whether the rows of every process have references to measure length ratios against (a collective check:
        every process must take the same branch, as the ratios are gathered). Only asked with masking off, where
        ratios are a metric, not a reason to stop a run."""
        local = all(isinstance(row.get(column), (str, list, tuple)) and len(row[column]) > 0 for row in inputs)
        flags = gather(torch.tensor([float(local)], device=self.accelerator.device))
        return bool(flags.min().item())

    def _generate_and_score_completions(self, inputs):
        """Replaces TRL's advantages with `compute_advantages` on the masked reward matrix; logs our metrics."""
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        scored = self._last_scored
        rewards = scored["rewards"]
        baseline = None
        if self.args.advantage_estimator == "scst":
            baseline = self._greedy_baseline_rewards(inputs, scored["prompts"], num_generations)
            # Weighted baseline reward over the greedy captions with at least one reward scored (unscored ≠ 0).
            weighted = torch.nansum(baseline * self.reward_weights.to(baseline.device), dim=1)
            weighted[torch.isnan(baseline).all(dim=1)] = torch.nan
            self._metrics[mode]["scst/baseline_reward"].append(torch.nanmean(weighted[::num_generations]).item())
        advantages = compute_advantages(
            rewards,
            num_generations,
            estimator=self.args.advantage_estimator,
            weights=self.reward_weights.to(rewards.device),
            baseline_rewards=baseline,
        )
        local = slice(self.accelerator.process_index * len(inputs), (self.accelerator.process_index + 1) * len(inputs))
        output["advantages"] = advantages[local].to(output["advantages"])

        # TRL logged its own advantages for the completions table; show the ones the loss receives instead.
        logged = self._logs["advantages"]
        for _ in range(min(len(advantages), len(logged))):
            logged.pop()
        logged.extend(advantages.tolist())

        self._metrics[mode]["advantages/distinct_per_group"].append(distinct_per_group(advantages, num_generations))
        if self.args.advantage_estimator in ("c_gdpo", "gdpo"):
            # TRL's frac_reward_zero_std under normalize_then_sum says whether the whole batch's sum is constant; the
            # quantity that means "no learning signal" is per group: every reward constant inside the group.
            self._metrics[mode]["frac_reward_zero_std"][-1] = _fraction_in_constant_groups(rewards, num_generations)
        self._log_judge_metrics(mode)
        if scored["ratios"] is not None:
            self._metrics[mode]["length/ratio_mean"].append(scored["ratios"].mean().item())
            self._metrics[mode]["length/masked_frac"].append((~scored["keep"]).double().mean().item())
        return output

    def _log_judge_metrics(self, mode: str) -> None:
        """Adds the judge clients' request / retry / failure / cache-hit counts of this step, summed over processes."""
        if not self._judges:
            return
        totals: dict[str, float] = defaultdict(float)
        for judge in self._judges:
            for name, value in judge.pop_metrics().items():
                totals[name] += value
        names = sorted(totals)
        summed = self.accelerator.reduce(
            torch.tensor([totals[name] for name in names], device=self.accelerator.device), reduction="sum"
        )
        for name, value in zip(names, summed.tolist()):
            self._metrics[mode][name].append(value)

    def _greedy_baseline_rewards(self, inputs, prompts, num_generations: int) -> torch.Tensor:
        """SCST baseline: rewards (gathered, masked) of one greedy caption per prompt, repeated over its group.

        Each process decodes and scores one greedy caption per group its rows touch (a group straddling two
        processes is decoded by both, identically), padded to the same count on every process, since decoding with
        vLLM and gathering the rewards are collective. The reward functions see each greedy caption once.
        """
        rows, processes = len(inputs), self.accelerator.num_processes

        def groups_of(process: int) -> list[int]:
            """The groups process ``process``'s rows touch, padded with the first to the same count everywhere."""
            first, last = process * rows // num_generations, (process * rows + rows - 1) // num_generations
            return list(range(first, last + 1))

        most_groups = max(len(groups_of(process)) for process in range(processes))
        padded_groups = [
            (groups + groups[:1] * most_groups)[:most_groups] for groups in map(groups_of, range(processes))
        ]
        first_global_row = self.accelerator.process_index * rows
        local_rows = [
            max(group * num_generations - first_global_row, 0)
            for group in padded_groups[self.accelerator.process_index]
        ]

        greedy_ids = self._generate_greedy([prompts[row] for row in local_rows])
        texts = self.processing_class.batch_decode(greedy_ids, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": text}] for text in texts]
        # Reward functions may log per-completion extras; the baseline's must not shift the sampled table.
        saved_extra, saved_metrics = self._pending_extra_logs, self._pending_metrics
        self._pending_extra_logs, self._pending_metrics = defaultdict(list), defaultdict(list)
        try:
            scored = self._calculate_rewards(
                [inputs[row] for row in local_rows], [prompts[row] for row in local_rows], completions, greedy_ids
            )
        finally:
            self._pending_extra_logs, self._pending_metrics = saved_extra, saved_metrics
        # Gathered in process order: entry k of process p is group padded_groups[p][k].
        entry_of_group = {}
        for process, groups in enumerate(padded_groups):
            for k, group in enumerate(groups):
                entry_of_group.setdefault(group, process * most_groups + k)
        index = [entry_of_group[row // num_generations] for row in range(rows * processes)]
        return scored[torch.tensor(index, device=scored.device)]

    def _generate_greedy(self, prompts: list) -> list[list[int]]:
        """One greedy completion per prompt: by the vLLM engine (temperature 0) when TRL samples with vLLM, else by
        TRL's transformers path. Every process must pass the same number of prompts (vLLM's gathers are collective
        in server mode and in tensor-parallel groups)."""
        if not self.use_vllm:
            return self._generate_greedy_transformers(prompts)
        prompt_ids, images, _ = self._tokenize_prompts(prompts)
        if self.state.global_step != self._last_loaded_step:  # as TRL does before sampling
            self.vllm_generation.sync_weights()
            self._last_loaded_step = self.state.global_step
        with _swapped_attributes(self.vllm_generation, temperature=0.0):
            _, completion_ids, _, _ = self.vllm_generation.generate(
                prompts=prompt_ids, images=images, num_generations=1
            )
        return completion_ids

    def _generate_greedy_transformers(self, prompts: list) -> list[list[int]]:
        """Greedy decoding through TRL's own transformers generation path, in eval mode (no LoRA / model dropout:
        the baseline is the policy's deterministic caption), the training mode restored after."""
        prompt_ids, images, multimodal_fields = self._tokenize_prompts(prompts)
        greedy_config = copy.deepcopy(self.generation_config)
        greedy_config.do_sample = False
        for sampling_only in ("temperature", "top_p", "top_k", "min_p"):
            setattr(greedy_config, sampling_only, None)
        transformers_path = {"use_vllm": False, "use_transformers_continuous_batching": False}
        was_training = self.model.training
        self.model.eval()
        try:
            with _swapped_attributes(self, generation_config=greedy_config, **transformers_path):
                completion_ids, _ = self._generate_single_turn(
                    prompt_ids, images, multimodal_fields, num_generations=1
                )
        finally:
            self.model.train(was_training)
        return completion_ids
