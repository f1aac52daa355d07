import math

import pytest
import torch

from balcaprl.advantages import compute_advantages, distinct_per_group, nanstd

NAN = float("nan")

# GDPO (arXiv 2601.05242) worked example: two rewards, G=2. Group 1 totals (0, 1), group 2 totals (0, 2).
GDPO_EXAMPLE = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])


class TestGDPOWorkedExample:
    def test_grpo_collapses_both_groups_to_the_same_advantages(self):
        advantages = compute_advantages(GDPO_EXAMPLE, 2, estimator="grpo", eps=0.0)
        expected = torch.tensor([-1, 1, -1, 1]) / math.sqrt(2)  # (r - mean) / unbiased std in each group
        torch.testing.assert_close(advantages, expected)
        assert distinct_per_group(advantages, 2) == 2

    def test_c_gdpo_keeps_the_groups_apart(self):
        advantages = compute_advantages(GDPO_EXAMPLE, 2, estimator="c_gdpo", eps=0.0)
        # Before the batch step: ±0.7071 (group 1), ±1.4142 (group 2); the batch std of those four is sqrt(5/3).
        before_batch = torch.tensor([-1, 1, -2, 2]) / math.sqrt(2)
        torch.testing.assert_close(advantages, before_batch / math.sqrt(5 / 3))
        assert advantages[3] == pytest.approx(2 * advantages[1])

    def test_gdpo_is_an_alias_of_c_gdpo(self):
        torch.testing.assert_close(
            compute_advantages(GDPO_EXAMPLE, 2, estimator="gdpo"),
            compute_advantages(GDPO_EXAMPLE, 2, estimator="c_gdpo"),
        )

    def test_eps_is_added_to_the_std(self):
        advantages = compute_advantages(GDPO_EXAMPLE, 2, estimator="grpo", eps=1e-4)
        assert advantages[1].item() == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-4), rel=1e-6)


class TestEstimators:
    def test_grpo_hand_computed_weighted_sum(self):
        rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])  # one group of 3
        advantages = compute_advantages(rewards, 3, estimator="grpo", weights=[2.0, 1.0], eps=0.0)
        totals = torch.tensor([2.0, 1.0, 6.0])
        expected = (totals - totals.mean()) / totals.std()
        torch.testing.assert_close(advantages, expected)

    def test_c_gdpo_constant_reward_contributes_nothing(self):
        varying = torch.tensor([[0.1], [0.7], [0.3], [0.9], [0.2], [0.4]])
        constant = torch.full((6, 1), 0.5)
        with_constant = compute_advantages(torch.cat([varying, constant], dim=1), 3, estimator="c_gdpo")
        torch.testing.assert_close(with_constant, compute_advantages(varying, 3, estimator="c_gdpo"))

    def test_grpo_constant_group_gives_zero(self):
        rewards = torch.tensor([[1.0], [1.0], [0.0], [1.0]])
        advantages = compute_advantages(rewards, 2, estimator="grpo")
        assert advantages[:2].tolist() == [0.0, 0.0]
        assert advantages[2] < 0 < advantages[3]

    def test_c_gdpo_zero_weight_removes_a_reward(self):
        rewards = torch.rand(8, 2, generator=torch.Generator().manual_seed(0))
        weighted = compute_advantages(rewards, 4, estimator="c_gdpo", weights=[1.0, 0.0])
        torch.testing.assert_close(weighted, compute_advantages(rewards[:, :1], 4, estimator="c_gdpo"))

    def test_scst_is_reward_minus_greedy_reward(self):
        rewards = torch.tensor([[0.5, 1.0], [0.2, 0.0], [0.9, 0.5], [0.1, 0.1]])
        baseline = torch.tensor([[0.4, 0.5], [0.4, 0.5], [0.3, 0.3], [0.3, 0.3]])
        advantages = compute_advantages(rewards, 2, estimator="scst", weights=[1.0, 2.0], baseline_rewards=baseline)
        torch.testing.assert_close(advantages, torch.tensor([2.5 - 1.4, 0.2 - 1.4, 1.9 - 0.9, 0.3 - 0.9]))

    def test_scst_without_a_scored_greedy_caption_gives_zero(self):
        rewards = torch.tensor([[1.0], [0.0]])
        baseline = torch.tensor([[NAN], [NAN]])
        assert compute_advantages(rewards, 2, estimator="scst", baseline_rewards=baseline).tolist() == [0.0, 0.0]

    def test_scst_unscored_greedy_reward_drops_out_of_the_difference(self):
        # The greedy caption's second reward is unscored (judge failure): only the first reward is compared. Counting
        # the missing one as 0 would add +0.75 to every sample of the group.
        rewards = torch.tensor([[0.6, 0.8], [0.4, 0.7], [0.55, 0.75], [0.45, 0.72]])
        baseline = torch.tensor([[0.5, NAN]] * 4)
        advantages = compute_advantages(rewards, 4, estimator="scst", baseline_rewards=baseline)
        torch.testing.assert_close(advantages, torch.tensor([0.1, -0.1, 0.05, -0.05]))

    def test_scst_unscored_sample_reward_drops_out_of_the_difference(self):
        rewards = torch.tensor([[0.6, NAN], [0.4, 0.7]])
        baseline = torch.tensor([[0.5, 0.75]] * 2)
        advantages = compute_advantages(rewards, 2, estimator="scst", baseline_rewards=baseline)
        torch.testing.assert_close(advantages, torch.tensor([0.1, -0.1 - 0.05]))

    def test_scst_no_reward_scored_on_both_sides_gives_zero(self):
        rewards = torch.tensor([[0.6, NAN], [NAN, 0.7]])
        baseline = torch.tensor([[NAN, 0.5], [0.5, NAN]])
        assert compute_advantages(rewards, 2, estimator="scst", baseline_rewards=baseline).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("estimator", ["grpo", "c_gdpo"])
@pytest.mark.parametrize("num_generations", [2, 3, 4, 5, 6, 7, 8, 16])
def test_groups_constant_on_every_reward_give_exactly_zero(estimator, num_generations):
    # In float32 the mean of G identical values is not always that value (G = 3, 5, 6, 7): the rounding error, divided
    # by eps and then batch z-scored, became advantages of up to ~2.9 for groups that carry no signal.
    generator = torch.Generator().manual_seed(num_generations)
    per_group = torch.rand(6, 1, 3, generator=generator)  # 6 prompts, 3 rewards, each constant inside its group
    rewards = per_group.expand(6, num_generations, 3).reshape(-1, 3).contiguous()
    advantages = compute_advantages(rewards, num_generations, estimator=estimator)
    assert advantages.dtype == torch.float32
    assert advantages.abs().max().item() == 0.0


class TestNaN:
    @pytest.mark.parametrize("estimator", ["grpo", "c_gdpo", "scst"])
    def test_all_nan_row_gets_zero_and_output_is_finite(self, estimator):
        rewards = torch.tensor([[1.0, 0.2], [NAN, NAN], [0.0, 0.9], [0.5, NAN]])
        baseline = torch.full_like(rewards, 0.3)
        advantages = compute_advantages(rewards, 2, estimator=estimator, baseline_rewards=baseline)
        assert advantages[1] == 0.0
        assert torch.isfinite(advantages).all()

    def test_grpo_counts_a_partly_unscored_row_with_nan_as_zero(self):
        rewards = torch.tensor([[1.0, 0.0], [NAN, 0.0], [3.0, 0.0]])
        advantages = compute_advantages(rewards, 3, estimator="grpo", eps=0.0)
        # grpo sums with NaN as 0 (like TRL's nansum): the partially scored row has total 0 and stays in the group.
        totals = torch.tensor([1.0, 0.0, 3.0])
        torch.testing.assert_close(advantages, (totals - totals.mean()) / totals.std())

    def test_c_gdpo_nan_entry_is_left_out_of_its_rewards_group_statistics(self):
        # Reward 1 has (1, NaN, 3): mean 2 and std sqrt(2) over the scored values, z = (-0.707, NaN, 0.707).
        # Reward 2 has (0.2, 0.5, 0.8): z = (-1, 0, 1). Sum (NaN term as 0): (-1.707, 0, 1.707); batch z: (-1, 0, 1).
        rewards = torch.tensor([[1.0, 0.2], [NAN, 0.5], [3.0, 0.8]])
        advantages = compute_advantages(rewards, 3, estimator="c_gdpo", eps=0.0)
        torch.testing.assert_close(advantages, torch.tensor([-1.0, 0.0, 1.0]))

    @pytest.mark.parametrize("estimator", ["grpo", "c_gdpo", "scst"])
    def test_random_matrices_with_many_nans_stay_finite(self, estimator):
        generator = torch.Generator().manual_seed(1)
        for _ in range(50):
            rewards = torch.rand(12, 3, generator=generator)
            rewards[torch.rand(12, 3, generator=generator) < 0.5] = NAN
            baseline = torch.rand(12, 3, generator=generator)
            advantages = compute_advantages(rewards, 3, estimator=estimator, baseline_rewards=baseline)
            assert advantages.shape == (12,)
            assert torch.isfinite(advantages).all()
            assert (advantages[torch.isnan(rewards).all(1)] == 0).all()


class TestValidation:
    def test_unknown_estimator_lists_the_allowed_ones(self):
        with pytest.raises(ValueError, match="c_gdpo"):
            compute_advantages(GDPO_EXAMPLE, 2, estimator="ppo")

    def test_rows_must_split_into_groups(self):
        with pytest.raises(ValueError, match="num_generations=3"):
            compute_advantages(GDPO_EXAMPLE, 3)

    def test_weights_must_match_rewards(self):
        with pytest.raises(ValueError, match="2 entries"):
            compute_advantages(GDPO_EXAMPLE, 2, weights=[1.0])

    def test_scst_needs_a_baseline(self):
        with pytest.raises(ValueError, match="baseline_rewards"):
            compute_advantages(GDPO_EXAMPLE, 2, estimator="scst")


def test_nanstd_matches_torch_std_and_ignores_nans():
    values = torch.tensor([[1.0, 2.0, 4.0], [3.0, NAN, 5.0], [NAN, NAN, 1.0]])
    torch.testing.assert_close(nanstd(values[0]), values[0].std())
    torch.testing.assert_close(nanstd(values, dim=1)[1], torch.tensor([3.0, 5.0]).std())
    assert torch.isnan(nanstd(values, dim=1)[2])  # one value: undefined


def test_distinct_per_group_counts_values_per_group():
    advantages = torch.tensor([0.5, 0.5, -1.0, 1.0, 0.2, 0.3, 0.4, 0.5])
    assert distinct_per_group(advantages, 4) == (3 + 4) / 2
