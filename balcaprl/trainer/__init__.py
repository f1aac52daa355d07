"""The trainers: `BalCapGRPOTrainer` (TRL's `GRPOTrainer` with BalCapRL's masking and advantage estimators), its
reward-output checks and vLLM mends, and the stage-1 collator for TRL's `SFTTrainer`.
"""

from balcaprl._lazy import lazy_exports

__all__ = [
    "BalCapGRPOTrainer",
    "CaptionSFTCollator",
    "RewardFunctionError",
    "checked_reward",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "BalCapGRPOTrainer": "grpo",
        "RewardFunctionError": "reward_checks",
        "checked_reward": "reward_checks",
        "CaptionSFTCollator": "sft_collator",
    },
)
