"""`compute_advantages` against TRL's own advantage code, run inside a real (plain) `trl.GRPOTrainer`."""

import random

import pytest
import torch
from peft import LoraConfig
from trl import GRPOConfig, GRPOTrainer

from balcaprl.advantages import compute_advantages
from balcaprl.models.loading import LANGUAGE_MODEL_LORA_TARGETS
from balcaprl.models.processors import load_processor
from tests.helpers import toy_dataset


def random_rewards(seed: int) -> list:
    """Three reward functions drawing from one generator of their own, so each test sees the same draws."""
    rng = random.Random(seed)

    def noisy_a(prompts, completions, **kwargs):
        return [None if rng.random() < 0.5 else rng.uniform(-1, 3) for _ in completions]

    def noisy_b(prompts, completions, **kwargs):
        return [None if rng.random() < 0.5 else rng.uniform(-1, 3) for _ in completions]

    def coarse(prompts, completions, **kwargs):
        """Few distinct values, so groups with a constant reward and all-None rows occur too."""
        return [None if rng.random() < 0.5 else float(rng.randint(0, 1)) for _ in completions]

    return [noisy_a, noisy_b, coarse]


class RecordingGRPOTrainer(GRPOTrainer):
    """Plain TRL trainer: records the reward matrix TRL scored and the advantages TRL computed from it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded = []

    def _calculate_rewards(self, *args, **kwargs):
        self._last_rewards = super()._calculate_rewards(*args, **kwargs)
        return self._last_rewards

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.recorded.append((self._last_rewards.detach().clone(), output["advantages"].detach().clone()))
        return output


@pytest.mark.parametrize(
    ("aggregation", "estimator"), [("normalize_then_sum", "c_gdpo"), ("sum_then_normalize", "grpo")]
)
def test_matches_trl_on_random_rewards_with_nans(tiny_models, tmp_path, aggregation, estimator):
    weights = [1.0, 2.0, 0.5]
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        num_generations=4,
        max_completion_length=4,
        max_steps=6,
        report_to="none",
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        multi_objective_aggregation=aggregation,
        scale_rewards="group",
        reward_weights=weights,
        disable_tqdm=True,
    )
    path = str(tiny_models["qwen2_5_vl"])
    trainer = RecordingGRPOTrainer(
        model=path,
        reward_funcs=random_rewards(seed=0),
        args=args,
        train_dataset=toy_dataset(32),
        processing_class=load_processor(path),
        peft_config=LoraConfig(r=2, target_modules=LANGUAGE_MODEL_LORA_TARGETS),
    )
    trainer.train()
    assert len(trainer.recorded) == 6
    saw_nan = saw_unscorable = False
    for rewards, trl_advantages in trainer.recorded:
        saw_nan |= bool(torch.isnan(rewards).any())
        saw_unscorable |= bool(torch.isnan(rewards).all(dim=1).any())
        ours = compute_advantages(rewards, 4, estimator=estimator, weights=weights)
        # TRL computes in float32, we in float64 (exact zeros for constant groups): they agree to float32 rounding.
        torch.testing.assert_close(ours, trl_advantages, atol=1e-5, rtol=0)
    assert saw_nan and saw_unscorable  # the comparison covered both NaN cases
