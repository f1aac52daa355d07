"""`BalCapGRPOTrainer`: TRL's `GRPOTrainer` with BalCapRL's reward masking and advantage estimators.

Generation, the clipped policy loss, KL, PEFT, vLLM and DeepSpeed stay TRL's. This subclass touches the reward matrix
(length-conditional masking) and the advantages (`balcaprl.advantages.compute_advantages`), and mends TRL 1.16's vLLM
path for image captioning (`CaptioningVLLMGeneration`): vision placeholder tokens are never sampled, colocated vLLM
gets one placeholder per image, and LoRA weights are merged for vLLM without touching the base weights.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import torch
from accelerate.utils import gather, gather_object
from trl import GRPOTrainer

from balcaprl.advantages import compute_advantages, distinct_per_group, get_estimator, nanstd
from balcaprl.completions import completion_text
from balcaprl.config import BalCapConfig
from balcaprl.judge.config import token_cost
from balcaprl.length import apply_length_mask, length_conditional_mask, length_ratios, word_length
from balcaprl.monitors import caption_monitors
from balcaprl.trainer.reward_checks import check_reward_set, checked_reward, masked_reward_names
from balcaprl.trainer.vllm import (
    CaptioningVLLMGeneration,
    greedy_generation_kwargs,
    swapped_attributes,
    vision_token_ids,
)


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
    step: ``length/ratio_mean``, ``length/masked_frac``, ``advantages/distinct_per_group``, the reward-hacking
    monitors of `balcaprl.monitors` over the step's sampled captions of every process (``monitor/repeated_sentence``,
    ``monitor/repeated_4gram``, ``monitor/distinct_1``, ``monitor/distinct_2``, ``monitor/length_words`` and, when the
    rows have references, ``monitor/length_drift``), for SCST
    ``scst/baseline_reward``, and with judge rewards ``judge/requests``, ``judge/retries``, ``judge/failures``,
    ``judge/cache_hits``, ``judge/bytes_sent``, ``judge/prompt_tokens``, ``judge/completion_tokens`` and, with
    ``judge_price_per_million_tokens``, ``judge/cost`` (summed over processes, SCST's greedy-caption scoring included).
    Under c-GDPO, TRL's ``frac_reward_zero_std`` is replaced by the fraction of completions whose group has every
    reward constant. The processor it is given pads prompts on the left, as TRL sets on a processor it loads.

    Reward functions are checked: one finite float or None per completion, else `RewardFunctionError` naming the
    reward and the step; an exception inside a reward is re-raised the same way.

    Vision placeholder tokens (`vision_token_ids`) are never sampled: with vLLM through its ``bad_words`` sampling
    parameter (honoured in colocate and server mode), with transformers through ``suppress_tokens``. With vLLM,
    SCST's greedy baseline is decoded by the vLLM engine too (temperature 0). The baseline stays greedy on both paths
    whatever sampling settings the recipe's ``generation_kwargs`` carry.
    """

    def __init__(self, model, reward_funcs, args: BalCapConfig | None = None, **kwargs):
        if reward_funcs is None:
            reward_funcs = []
        elif not isinstance(reward_funcs, list):
            reward_funcs = [reward_funcs]
        if not isinstance(args, BalCapConfig):
            raise TypeError(f"BalCapGRPOTrainer needs args of type BalCapConfig, got {type(args).__name__}.")
        # before TRL loads a model given by name: the same checks the entry points run before any weights load
        check_reward_set(reward_funcs, args, getattr(kwargs.get("train_dataset"), "column_names", None) or [])
        _pad_prompts_on_the_left(kwargs.get("processing_class"))
        super().__init__(model, [checked_reward(fn) for fn in reward_funcs], args, **kwargs)
        self._masked_reward_columns = [
            self.reward_func_names.index(name)
            for name in masked_reward_names(self.args.length_mask_rewards, self.reward_func_names)
        ]
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
        self.vllm_generation.__class__ = CaptioningVLLMGeneration
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
        texts = [completion_text(c) for c in completions]
        if self._masked_reward_columns or self._all_rows_have_references(inputs, column):
            if column not in inputs[0]:
                raise ValueError(
                    f"Length masking of {self.args.length_mask_rewards} needs the reference column "
                    f"{column!r} (reference_column), but the dataset rows have only {sorted(inputs[0])}. "
                    "Add the column, set reference_column, or set length_mask_rewards to []."
                )
            local_ratios = length_ratios(texts, [row[column] for row in inputs], self._length_fn)
            ratios = gather(local_ratios.to(rewards.device))
            keep = length_conditional_mask(ratios, *self.args.length_mask_window)
            rewards = apply_length_mask(rewards, keep, self._masked_reward_columns)
        self._last_scored = {
            "rewards": rewards,
            "ratios": ratios,
            "keep": keep,
            "prompts": prompts,
            "texts": texts,
            "references": [row.get(column) for row in inputs],
        }
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
        estimator = get_estimator(self.args.advantage_estimator)
        if estimator.needs_baseline:
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
        if estimator.per_reward_groups:
            # TRL's frac_reward_zero_std under normalize_then_sum says whether the whole batch's sum is constant; the
            # quantity that means "no learning signal" is per group: every reward constant inside the group.
            self._metrics[mode]["frac_reward_zero_std"][-1] = _fraction_in_constant_groups(rewards, num_generations)
        self._log_judge_metrics(mode)
        if scored["ratios"] is not None:
            self._metrics[mode]["length/ratio_mean"].append(scored["ratios"].mean().item())
            self._metrics[mode]["length/masked_frac"].append((~scored["keep"]).double().mean().item())
        self._log_monitors(mode, scored["texts"], scored["references"], with_references=scored["ratios"] is not None)
        return output

    def _log_monitors(self, mode: str, texts: list[str], references: list, with_references: bool) -> None:
        """The reward-hacking monitors of `balcaprl.monitors` over the step's captions, gathered from every process
        (distinct-n needs the union of the captions, not a mean of per-process values)."""
        reference_lengths = None
        if with_references:  # every process's rows have references (the collective check of _calculate_rewards)
            reference_lengths = [
                sum(map(word_length, refs)) / len(refs)
                for refs in ([r] if isinstance(r, str) else r for r in references)
            ]
        pairs = gather_object(list(zip(texts, reference_lengths or [None] * len(texts))))
        all_texts = [text for text, _ in pairs]
        all_lengths = [length for _, length in pairs] if with_references else None
        for name, value in caption_monitors(all_texts, all_lengths).items():
            self._metrics[mode][name].append(value)

    def _log_judge_metrics(self, mode: str) -> None:
        """Adds the judge clients' counts of this step (requests, ..., tokens), summed over processes, and
        ``judge/cost``: each priced judge's tokens at its ``price_per_million_tokens`` (cost is linear in the tokens,
        so the sum of the processes' costs is the cost of the summed tokens)."""
        if not self._judges:
            return
        totals: dict[str, float] = defaultdict(float)
        for judge in self._judges:
            metrics = judge.pop_metrics()
            for name, value in metrics.items():
                totals[name] += value
            price = getattr(judge, "price_per_million_tokens", None)
            if price is not None:
                tokens = metrics.get("judge/prompt_tokens", 0.0), metrics.get("judge/completion_tokens", 0.0)
                totals["judge/cost"] += token_cost(*tokens, price)
        names = sorted(totals)  # every process has the same judges, so the same names
        # float64: token counts stay exact far beyond float32's 2**24 per step
        local = torch.tensor([totals[name] for name in names], dtype=torch.float64, device=self.accelerator.device)
        for name, value in zip(names, self.accelerator.reduce(local, reduction="sum").tolist()):
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
        # TRL applies generation_kwargs over its own temperature (colocate and server), so they are swapped too.
        greedy_kwargs = greedy_generation_kwargs(self.vllm_generation.generation_kwargs)
        with swapped_attributes(self.vllm_generation, temperature=0.0, generation_kwargs=greedy_kwargs):
            _, completion_ids, _, _ = self.vllm_generation.generate(
                prompts=prompt_ids, images=images, num_generations=1
            )
        return completion_ids

    def _generate_greedy_transformers(self, prompts: list) -> list[list[int]]:
        """Greedy decoding through TRL's own transformers generation path, in eval mode (no LoRA / model dropout:
        the baseline is the policy's deterministic caption), the training mode restored after."""
        prompt_ids, images, multimodal_fields = self._tokenize_prompts(prompts)
        greedy_config = copy.deepcopy(self.generation_config)  # holds the recipe's generation_kwargs
        greedy_config.do_sample, greedy_config.num_beams = False, 1
        for sampling_only in ("temperature", "top_p", "top_k", "min_p"):
            setattr(greedy_config, sampling_only, None)
        transformers_path = {"use_vllm": False, "use_transformers_continuous_batching": False}
        was_training = self.model.training
        self.model.eval()
        try:
            with swapped_attributes(self, generation_config=greedy_config, **transformers_path):
                completion_ids, _ = self._generate_single_turn(
                    prompt_ids, images, multimodal_fields, num_generations=1
                )
        finally:
            self.model.train(was_training)
        return completion_ids
