"""balcaprl: reinforcement-learning fine-tuning of multimodal LLMs for image captioning, on Hugging Face TRL.

Public API: `BalCapConfig`, `BalCapGRPOTrainer`, `compute_advantages`, `length_conditional_mask`.
"""

from balcaprl._lazy import lazy_exports

__version__ = "0.1.0"

__all__ = ["BalCapConfig", "BalCapGRPOTrainer", "__version__", "compute_advantages", "length_conditional_mask"]

# Imported on first use: torch, TRL and transformers take seconds to import, and the console script's cheap checks
# (a missing recipe, a YAML error) should not wait for them.
__getattr__, _dir = lazy_exports(
    __name__,
    {
        "BalCapConfig": "config",
        "BalCapGRPOTrainer": "trainer.grpo",
        "compute_advantages": "advantages",
        "length_conditional_mask": "length",
    },
)


def __dir__() -> list[str]:
    return sorted([*_dir(), "__version__"])
