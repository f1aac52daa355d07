"""Test-only reward functions, dataset and a trainer that records what it computed. No mocks: real TRL code runs."""

from __future__ import annotations

import os
import sys

import torch
from datasets import Dataset
from peft import LoraConfig

from balcaprl.completions import completion_text
from balcaprl.config import BalCapConfig
from balcaprl.data.constants import DEFAULT_INSTRUCTION
from balcaprl.generation import caption_prompt_batch
from balcaprl.models.loading import LANGUAGE_MODEL_LORA_TARGETS
from balcaprl.models.processors import load_processor
from balcaprl.models.tiny import tiny_caption_rows
from balcaprl.runtime import end_process_group
from balcaprl.trainer.grpo import BalCapGRPOTrainer

# Every reference of the toy dataset has exactly this many words, so a caption's length ratio is words / 4.
REFERENCE_WORDS = 4


def toy_dataset(num_rows: int = 8, seed: int = 0) -> Dataset:
    rows = tiny_caption_rows(num_rows, seed=seed)
    for row in rows:
        colour, shape = row["references"][0].rstrip(".").split()[1:]
        row["references"] = [f"a {colour} {shape} here.", f"one {colour} {shape} centred."]
        assert all(len(reference.split()) == REFERENCE_WORDS for reference in row["references"])
    return Dataset.from_list(rows)


def mentions_colour(prompts, completions, references, **kwargs):
    """1 if the caption names the colour of the reference, else 0."""
    return [float(refs[0].split()[1] in completion_text(c)) for c, refs in zip(completions, references)]


def linguistic(prompts, completions, **kwargs):
    """Stand-in for the linguistic judge: always > 0 for a non-empty caption, None (unscorable) for an empty one."""
    scores = []
    for completion in completions:
        words = completion_text(completion).split()
        scores.append(None if not words else 0.25 + 0.75 * len(set(words)) / len(words))
    return scores


def sometimes_unscorable(prompts, completions, **kwargs):
    """A reward that fails on every third completion (None), to exercise NaN handling."""
    return [None if index % 3 == 0 else len(completion_text(c)) % 7 / 6 for index, c in enumerate(completions)]


class RecordingTrainer(BalCapGRPOTrainer):
    """Keeps, per generation, the reward matrices scored, SCST baselines, and the advantages produced and received by
    the loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Reward matrices as scored, in order: per step the samples' (N rows), then for SCST the greedy captions'
        # (one row per prompt); `baseline_matrices`: SCST baselines as the advantages use them (one row per sample).
        self.reward_matrices: list[torch.Tensor] = []
        self.baseline_matrices: list[torch.Tensor] = []
        self.generated_advantages: list[torch.Tensor] = []
        self.loss_advantages: list[torch.Tensor] = []

    def _calculate_rewards(self, *args, **kwargs):
        rewards = super()._calculate_rewards(*args, **kwargs)
        self.reward_matrices.append(rewards.detach().cpu().clone())
        return rewards

    def _greedy_baseline_rewards(self, *args, **kwargs):
        baseline = super()._greedy_baseline_rewards(*args, **kwargs)
        self.baseline_matrices.append(baseline.detach().cpu().clone())
        return baseline

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.generated_advantages.append(output["advantages"].detach().cpu().clone())
        return output

    def _compute_loss(self, model, inputs):
        self.loss_advantages.append(inputs["advantages"].detach().cpu().clone())
        return super()._compute_loss(model, inputs)


def make_config(output_dir, **overrides) -> BalCapConfig:
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        seed=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return BalCapConfig(**settings)


def make_trainer(model_path, output_dir, reward_funcs, trainer_class=RecordingTrainer, **config_overrides):
    return trainer_class(
        model=str(model_path),
        reward_funcs=reward_funcs,
        args=make_config(output_dir, **config_overrides),
        train_dataset=toy_dataset(),
        processing_class=load_processor(str(model_path)),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LANGUAGE_MODEL_LORA_TARGETS),
    )


REWARDS_FOR_DISTRIBUTED = [mentions_colour, linguistic]


def greedy_caption_tokens(model, processor, images, max_new_tokens: int, instruction: str = DEFAULT_INSTRUCTION):
    """Greedy new tokens per image, prompted exactly as evaluation (`balcaprl.generation`) prompts, and the model's
    EOS ids: what a test needs to see whether captions end with EOS rather than at the length cap."""
    inputs = caption_prompt_batch(processor, images, instruction)
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
        )
    eos_ids = model.generation_config.eos_token_id
    eos_ids = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
    return output[:, inputs["input_ids"].shape[1] :].tolist(), eos_ids


def exit_launched_script() -> None:
    """The last call of a script that the tests run under `accelerate launch`, once its results are on disk.

    It leaves without the interpreter's finalisation. CI saw a rank that had trained and written its results abort
    there (gloo, SIGABRT, "terminate called without an active exception"; here about 1 launch in 40-100): the
    DistributedDataParallel wrapper keeps the gloo group referenced, so its worker threads are still alive while
    Python tears down, even after `destroy_process_group()` (measured: their threads survive destroy + gc). That is
    torch's teardown, not what these scripts test (what each rank computed); the product's entry points exit
    normally and `tests/test_launch.py` launches them.
    """
    end_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
