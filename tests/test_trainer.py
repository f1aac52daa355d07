"""End-to-end: the real TRL GRPO path on both tiny models, LoRA on the language model, every estimator."""

import math

import pytest
import torch

from balcaprl.advantages import compute_advantages
from balcaprl.length import length_conditional_mask, word_length
from balcaprl.rewards import completion_text
from tests.helpers import REFERENCE_WORDS, linguistic, make_trainer, mentions_colour, sometimes_unscorable

CONTRACT_METRICS = ["length/ratio_mean", "length/masked_frac", "advantages/distinct_per_group"]
REWARDS = [mentions_colour, linguistic, sometimes_unscorable]


def lora_and_base_parameters(model):
    parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
    lora = {name: value for name, value in parameters.items() if "lora_" in name}
    base = {name: value for name, value in parameters.items() if "lora_" not in name}
    return lora, base


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
@pytest.mark.parametrize("estimator", ["c_gdpo", "grpo", "scst"])
def test_training_steps(tiny_models, tmp_path, family, estimator):
    trainer = make_trainer(tiny_models[family], tmp_path, REWARDS, advantage_estimator=estimator, max_steps=2)
    lora_before, base_before = lora_and_base_parameters(trainer.model)
    assert lora_before and all("language_model" in name for name in lora_before)

    trainer.train()

    # LoRA weights change (B starts at zero and receives the gradient), base weights — vision tower included — don't.
    lora_after, base_after = lora_and_base_parameters(trainer.model)
    changed = [name for name in lora_before if not torch.equal(lora_before[name], lora_after[name])]
    assert any("lora_B" in name for name in changed), "no LoRA weight was updated"
    assert all(torch.equal(base_before[name], base_after[name]) for name in base_before)

    # Contract metrics are logged every step and finite.
    step_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(step_logs) == 2
    for log in step_logs:
        for name in CONTRACT_METRICS + [f"rewards/{fn.__name__}/mean" for fn in REWARDS[:2]]:
            assert name in log and math.isfinite(log[name]), (name, log)
        assert 0.0 <= log["length/masked_frac"] <= 1.0
        assert 1.0 <= log["advantages/distinct_per_group"] <= 4.0

    # The advantages are compute_advantages(reward matrix), and the loss received exactly those.
    matrices = trainer.reward_matrices
    samples = matrices[::2] if estimator == "scst" else matrices
    baselines = matrices[1::2] if estimator == "scst" else [None] * len(samples)
    assert len(samples) == len(trainer.generated_advantages) == len(trainer.loss_advantages) == 2
    for rewards, baseline, generated, received in zip(
        samples, baselines, trainer.generated_advantages, trainer.loss_advantages
    ):
        expected = compute_advantages(rewards, 4, estimator=estimator, baseline_rewards=baseline)
        torch.testing.assert_close(generated, expected)
        torch.testing.assert_close(received.sort().values, expected.sort().values)  # TRL shuffles the batch
        assert torch.isfinite(received).all()
    if estimator == "scst":
        # one greedy caption per prompt: the caption-dependent baseline rewards are constant inside each group of 4
        # (the third test reward fails by position, not by caption)
        for baseline in baselines:
            grouped = baseline[:, :2].nan_to_num(-1.0).view(-1, 4, 2)
            assert (grouped == grouped[:, :1]).all()

    # The logged rewards are the masked ones: "linguistic" is 0 exactly where the caption's length ratio is
    # outside [0.5, 2] (every toy reference has REFERENCE_WORDS words), and the logged advantages are ours.
    completions = [completion_text(c) for c in trainer._logs["completion"]]
    logged_linguistic = torch.tensor(list(trainer._logs["rewards"]["linguistic"]))
    ratios = torch.tensor([word_length(c) / REFERENCE_WORDS for c in completions], dtype=torch.float64)
    keep = length_conditional_mask(ratios)
    assert (logged_linguistic[~keep] == 0).all()
    scored = keep & ~torch.isnan(logged_linguistic)
    assert (logged_linguistic[scored] > 0).all()
    torch.testing.assert_close(logged_linguistic, samples[-1][:, 1], equal_nan=True)
    torch.testing.assert_close(torch.tensor(list(trainer._logs["advantages"])), trainer.generated_advantages[-1])


def test_token_length_unit(tiny_models, tmp_path):
    trainer = make_trainer(
        tiny_models["qwen2_5_vl"], tmp_path, REWARDS, length_unit="tokens", max_steps=1, length_mask_window=[0.5, 2.0]
    )
    trainer.train()
    tokenizer = trainer.processing_class.tokenizer
    completions = [completion_text(c) for c in trainer._logs["completion"]]
    reference_tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in ["a red circle here."])
    assert reference_tokens > 0
    log = next(log for log in trainer.state.log_history if "loss" in log)
    ratio_by_words = sum(word_length(c) / REFERENCE_WORDS for c in completions) / len(completions)
    assert log["length/ratio_mean"] != pytest.approx(ratio_by_words)  # tokens, not words, were counted


def test_masking_off_without_reference_column_is_allowed(tiny_models, tmp_path):
    trainer = make_trainer(
        tiny_models["qwen2_5_vl"], tmp_path, REWARDS, length_mask_rewards=[], reference_column="refs", max_steps=1
    )
    trainer.train()
    log = next(log for log in trainer.state.log_history if "loss" in log)
    assert "length/ratio_mean" not in log and "advantages/distinct_per_group" in log


def test_masking_without_reference_column_names_the_column(tiny_models, tmp_path):
    trainer = make_trainer(tiny_models["qwen2_5_vl"], tmp_path, REWARDS, reference_column="refs", max_steps=1)
    with pytest.raises(ValueError, match="'refs'.*references"):
        trainer.train()


def returns_nan(prompts, completions, **kwargs):
    return [0.5] * (len(completions) - 1) + [float("nan")]


def returns_too_few(prompts, completions, **kwargs):
    return [0.5] * (len(completions) - 1)


def raises_inside(prompts, completions, **kwargs):
    raise KeyError("no such column")


async def async_raises_inside(prompts, completions, **kwargs):
    raise ConnectionError("judge unreachable")


async def async_length(prompts, completions, **kwargs):
    return [float(len(completion_text(c))) for c in completions]


class TestRewardChecks:
    @pytest.mark.parametrize(
        ("bad_reward", "message"),
        [
            (returns_nan, r"'returns_nan' returned nan for completion 7 at step 0, on a batch of 8 completions"),
            (returns_too_few, r"'returns_too_few' returned 7 values at step 0"),
            (raises_inside, r"'raises_inside' raised KeyError at step 0, on a batch of 8 completions"),
            (async_raises_inside, r"'async_raises_inside' raised ConnectionError at step 0.*judge unreachable"),
        ],
    )
    def test_bad_reward_fails_naming_the_reward_and_step(self, tiny_models, tmp_path, bad_reward, message):
        from balcaprl.trainer import RewardFunctionError

        trainer = make_trainer(tiny_models["qwen2_5_vl"], tmp_path, [linguistic, bad_reward], max_steps=1)
        with pytest.raises(RewardFunctionError, match=message):
            trainer.train()

    def test_async_reward_keeps_its_name_and_runs(self, tiny_models, tmp_path):
        trainer = make_trainer(tiny_models["qwen2_5_vl"], tmp_path, [linguistic, async_length], max_steps=1)
        assert trainer.reward_func_names == ["linguistic", "async_length"]
        trainer.train()
        log = next(log for log in trainer.state.log_history if "loss" in log)
        assert log["rewards/async_length/mean"] > 0
