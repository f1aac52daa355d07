"""`BalCapConfig`: TRL's `GRPOConfig` plus the advantage estimator and length-conditional masking of BalCapRL."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from balcaprl.advantages import ESTIMATORS
from balcaprl.length import LENGTH_UNITS

# TRL's own aggregation that computes the same advantages as each estimator. `BalCapGRPOTrainer` replaces TRL's
# advantages anyway; matching them keeps TRL's diagnostics (e.g. `frac_reward_zero_std`) about the same quantity.
_TRL_AGGREGATION = {
    "c_gdpo": "normalize_then_sum",
    "gdpo": "normalize_then_sum",
    "grpo": "sum_then_normalize",
    "scst": "sum_then_normalize",
}


@dataclass
class BalCapConfig(GRPOConfig):
    r"""Configuration of `BalCapGRPOTrainer`: every `trl.GRPOConfig` field, plus:

    > Advantages

    advantage_estimator (`str`, defaults to `"c_gdpo"`):
        `"c_gdpo"` (alias `"gdpo"`): each reward z-scored inside its group, weighted sum, batch z-score (BalCapRL).
        `"grpo"`: weighted sum of rewards, then group z-score. `"scst"`: weighted reward minus that of the greedy
        caption of the same prompt. `multi_objective_aggregation` is derived from it.

    > Length-conditional masking

    length_mask_rewards (`list[str]`, defaults to `["linguistic"]`):
        Names of the reward functions set to 0 when a caption's length ratio ρ is outside `length_mask_window`.
        Names absent from the run's reward functions are an error; an empty list turns masking off.
    length_mask_window (`list[float]`, defaults to `[0.5, 2.0]`):
        [low, high] of ρ = len(caption) / mean len(references); both bounds are kept.
    length_unit (`str`, defaults to `"words"`):
        `"words"` (whitespace split) or `"tokens"` (the policy's tokenizer).
    reference_column (`str`, defaults to `"references"`):
        Dataset column holding each row's reference caption(s).
    """

    advantage_estimator: str = field(
        default="c_gdpo",
        metadata={"help": "Advantage estimator.", "choices": list(ESTIMATORS)},
    )
    length_mask_rewards: list[str] = field(
        default_factory=lambda: ["linguistic"],
        metadata={"help": "Reward functions zeroed when the caption/reference length ratio is outside the window."},
    )
    length_mask_window: list[float] = field(
        default_factory=lambda: [0.5, 2.0],
        metadata={"help": "Inclusive [low, high] window of the caption/reference length ratio."},
    )
    length_unit: str = field(
        default="words",
        metadata={"help": "Unit of caption and reference lengths.", "choices": list(LENGTH_UNITS)},
    )
    reference_column: str = field(
        default="references",
        metadata={"help": "Dataset column holding the reference caption(s) of each row."},
    )

    def __post_init__(self):
        if self.advantage_estimator not in ESTIMATORS:
            raise ValueError(
                f"advantage_estimator must be one of {list(ESTIMATORS)}, got {self.advantage_estimator!r}."
            )
        if self.length_unit not in LENGTH_UNITS:
            raise ValueError(f"length_unit must be one of {list(LENGTH_UNITS)}, got {self.length_unit!r}.")
        if isinstance(self.length_mask_rewards, str):
            self.length_mask_rewards = [self.length_mask_rewards]
        self.length_mask_rewards = list(self.length_mask_rewards or [])
        window = list(self.length_mask_window)
        if len(window) != 2 or not 0 <= float(window[0]) <= float(window[1]):
            raise ValueError(f"length_mask_window must be [low, high] with 0 <= low <= high, got {window!r}.")
        self.length_mask_window = [float(window[0]), float(window[1])]
        if not self.reference_column:
            raise ValueError("reference_column must name a dataset column, got an empty string.")
        self.multi_objective_aggregation = _TRL_AGGREGATION[self.advantage_estimator]
        super().__post_init__()
        if self.advantage_estimator == "grpo" and self.scale_rewards != "group":
            raise ValueError(
                f"advantage_estimator='grpo' normalises by the group std (scale_rewards='group'), got "
                f"scale_rewards={self.scale_rewards!r}; use scale_rewards='group' or another estimator."
            )
