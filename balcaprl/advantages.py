"""Advantage estimators for multi-reward captioning RL — pure torch, no trainer state.

Notation: N = prompts × G completions, grouped contiguously (TRL order); K reward functions; r ∈ R^{N×K} with NaN
where a reward function could not score a completion; w ∈ R^K the reward weights; ε = 1e-4 (TRL and GDPO's code).
std is Bessel-corrected (N−1) and NaN-aware; a group with fewer than two scored values has an undefined std, and
the term it would produce counts as 0 — the same as TRL's ``nanstd`` followed by ``nansum``.

- ``grpo`` (GRPO, Shao et al. 2024; summed multi-reward GRPO, the BalCapRL ablation):
  r_i = Σ_k w_k r_ik,  A_i = (r_i − mean_group r) / (std_group r + ε).
- ``c_gdpo`` (GDPO, arXiv 2601.05242, Eqs. 4–7; BalCapRL's c-GDPO, arXiv 2605.07394):
  z_ik = (r_ik − mean_group r_k) / (std_group r_k + ε)   (Eq. 4, each reward normalised inside its group)
  a_i = Σ_k w_k z_ik                                      (Eq. 7, weights act on normalised advantages)
  A_i = (a_i − mean_batch a) / (std_batch a + ε)          (Eq. 6, batch normalisation)
- ``scst`` (self-critical sequence training, Rennie et al. 2017; the baseline of arXiv 2503.01333):
  A_i = Σ_k w_k (r_ik − b_ik), with b the rewards of the greedy caption of the same prompt. No std scaling. A term
  counts only where both r_ik and b_ik are scored: a reward the judge failed on one side says nothing about the
  difference (counting it as 0 would hand the whole group a spurious advantage of ± w_k r).

Every estimator gives advantage 0 to a completion whose K rewards are all NaN (SCST: that no reward is scored on
both sides), and never returns NaN or inf. The arithmetic is float64 whatever the input dtype: in float32 the group
mean of G identical rewards is not always that reward (G = 3, 5, 6, 7), and the batch z-score of c-GDPO blows that
rounding up to advantages of ~±3 for groups that carry no signal at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Estimator:
    """One advantage estimator: its math and what the trainer and the config need to know about it.

    compute: ``(rewards, num_generations, weights, eps, baseline_rewards) -> (advantages, unscorable)`` on float64
        tensors; ``advantages`` (N,) may hold NaN, ``unscorable`` (N,) marks the rows that get advantage 0.
    trl_aggregation: TRL's ``multi_objective_aggregation`` that computes the same advantages (kept in step so that
        TRL's own diagnostics describe the same quantity).
    scaling: how the estimator scales rewards, for the error a conflicting ``scale_rewards`` gets.
    needs_baseline: it needs the rewards of each prompt's greedy caption (``baseline_rewards``).
    per_reward_groups: it normalises each reward inside its group, so "no signal" means every reward constant in
        the group (the trainer's ``frac_reward_zero_std``).
    """

    name: str
    compute: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    trl_aggregation: str
    scaling: str
    needs_baseline: bool = False
    per_reward_groups: bool = False


ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(*names: str, trl_aggregation: str, scaling: str, **properties: bool):
    """Register the decorated function under ``names`` (the first is its name, the others aliases)."""

    def decorator(compute):
        estimator = Estimator(names[0], compute, trl_aggregation, scaling, **properties)
        for name in names:
            if name in ESTIMATORS:
                raise ValueError(f"advantage estimator {name!r} is registered twice")
            ESTIMATORS[name] = estimator
        return compute

    return decorator


def get_estimator(name: str) -> Estimator:
    """The registered estimator ``name``; a `ValueError` listing the known names otherwise."""
    if name not in ESTIMATORS:
        raise ValueError(f"Unknown advantage estimator {name!r}; choose one of {list(ESTIMATORS)}.")
    return ESTIMATORS[name]


def nanstd(values: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Bessel-corrected standard deviation ignoring NaNs; NaN where fewer than two values are present."""
    if dim is None:
        values, dim = values.reshape(-1), 0
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=True)
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    squared_deviation_sum = torch.nansum((values - mean) ** 2, dim=dim, keepdim=True)
    variance = torch.where(count > 1, squared_deviation_sum / (count - 1).clamp(min=1), torch.nan)
    std = variance.sqrt()
    return std if keepdim else std.squeeze(dim)


def _weighted_sum(rewards: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k r_k with NaN terms counted as 0 (TRL's nansum)."""
    return torch.nansum(rewards * weights, dim=-1)


def compute_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    *,
    estimator: str = "c_gdpo",
    weights: Sequence[float] | torch.Tensor | None = None,
    eps: float = 1e-4,
    baseline_rewards: torch.Tensor | None = None,
) -> torch.Tensor:
    """Advantages, shape (N,), from a reward matrix ``rewards`` of shape (N, K); see the module docstring.

    Args:
        rewards: float tensor (N, K); rows in groups of ``num_generations`` contiguous completions; NaN = unscored.
        num_generations: G, the completions per prompt.
        estimator: ``"c_gdpo"`` (alias ``"gdpo"``), ``"grpo"`` or ``"scst"``.
        weights: K reward weights (default all 1).
        eps: ε added to every standard deviation.
        baseline_rewards: (N, K) rewards of each row's greedy caption; required by ``"scst"`` only.

    Example: one group of G = 4 captions, two rewards on different scales. Summed GRPO lets the larger scale decide
    (captions 1 and 2 get opposite advantages only because reward 2 is ten times larger); c-GDPO z-scores each
    reward inside the group first, so captions 1 and 2, each right on one reward, tie:

    >>> import torch
    >>> rewards = torch.tensor([[1.0, 0.0], [0.0, 10.0], [0.0, 0.0], [1.0, 10.0]])
    >>> compute_advantages(rewards, 4, estimator="grpo")
    tensor([-0.7755,  0.7755, -0.9479,  0.9479])
    >>> compute_advantages(rewards, 4, estimator="c_gdpo").round(decimals=3)
    tensor([-0.0000,  0.0000, -1.2250,  1.2250])

    SCST: reward minus the reward of the prompt's greedy caption (repeated per sample), no scaling:

    >>> greedy = torch.tensor([[0.5], [0.5]])
    >>> compute_advantages(torch.tensor([[0.6], [0.4]]), 2, estimator="scst", baseline_rewards=greedy)
    tensor([ 0.1000, -0.1000])
    """
    chosen = get_estimator(estimator)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (N, K), got {tuple(rewards.shape)}.")
    num_rows, num_rewards = rewards.shape
    if num_generations < 1 or num_rows % num_generations:
        raise ValueError(f"{num_rows} reward rows do not split into groups of num_generations={num_generations}.")
    rewards = rewards.double()
    if weights is None:
        weights = torch.ones(num_rewards, device=rewards.device)
    weights = torch.as_tensor(weights, device=rewards.device).double()
    if weights.shape != (num_rewards,):
        raise ValueError(f"weights must have {num_rewards} entries (one per reward), got {tuple(weights.shape)}.")
    if chosen.needs_baseline and (baseline_rewards is None or baseline_rewards.shape != rewards.shape):
        shape = None if baseline_rewards is None else tuple(baseline_rewards.shape)
        raise ValueError(f"{estimator} needs baseline_rewards of shape {tuple(rewards.shape)}, got {shape}.")
    advantages, unscorable = chosen.compute(rewards, num_generations, weights, eps, baseline_rewards)

    advantages = advantages.reshape(num_rows)
    advantages = torch.where(unscorable, torch.zeros_like(advantages), advantages)
    return torch.nan_to_num(advantages, nan=0.0, posinf=0.0, neginf=0.0).float()


@register_estimator("grpo", trl_aggregation="sum_then_normalize", scaling="normalises by the group std")
def _grpo(rewards, num_generations, weights, eps, baseline_rewards):
    """r_i = Σ_k w_k r_ik,  A_i = (r_i − mean_group r) / (std_group r + ε)."""
    unscorable = torch.isnan(rewards).all(dim=1)
    total = _weighted_sum(rewards, weights)
    total[unscorable] = torch.nan  # keep unscored rows out of the group baseline
    grouped = total.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    return (grouped - mean) / (nanstd(grouped, dim=1, keepdim=True) + eps), unscorable


@register_estimator(
    "c_gdpo",
    "gdpo",
    trl_aggregation="normalize_then_sum",
    scaling="z-scores each reward in its group, then the sum over the batch",
    per_reward_groups=True,
)
def _c_gdpo(rewards, num_generations, weights, eps, baseline_rewards):
    """z_ik per reward inside its group (GDPO Eq. 4), a_i = Σ_k w_k z_ik (Eq. 7), batch z-score of a (Eq. 6)."""
    num_rows, num_rewards = rewards.shape
    unscorable = torch.isnan(rewards).all(dim=1)
    grouped = rewards.view(-1, num_generations, num_rewards)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    normalized = (grouped - mean) / (nanstd(grouped, dim=1, keepdim=True) + eps)  # GDPO Eq. 4
    combined = _weighted_sum(normalized.view(num_rows, num_rewards), weights)  # GDPO Eq. 7
    combined[unscorable] = torch.nan
    return (combined - torch.nanmean(combined)) / (nanstd(combined) + eps), unscorable  # GDPO Eq. 6


@register_estimator(
    "scst",
    trl_aggregation="sum_then_normalize",
    scaling="does not scale (reward minus the greedy caption's)",
    needs_baseline=True,
)
def _scst(rewards, num_generations, weights, eps, baseline_rewards):
    """A_i = Σ_k w_k (r_ik − b_ik), a term counting only where both sides are scored."""
    differences = rewards - baseline_rewards.to(rewards)  # NaN wherever either side is unscored: the term drops out
    return _weighted_sum(differences, weights), torch.isnan(differences).all(dim=1)


def distinct_per_group(advantages: torch.Tensor, num_generations: int, decimals: int = 5) -> float:
    """Mean number of distinct advantage values per group (rounded to ``decimals``).

    The resolution of the learning signal: summed GRPO maps different reward vectors with the same total to the
    same advantage (GDPO, arXiv 2601.05242, Sec. 3), which this count makes visible.
    """
    grouped = torch.round(advantages.detach().float().cpu().view(-1, num_generations), decimals=decimals)
    return sum(len(torch.unique(group)) for group in grouped) / grouped.shape[0]
