"""balcaprl: reinforcement-learning fine-tuning of multimodal LLMs for image captioning, on Hugging Face TRL.

Public API: `BalCapConfig`, `BalCapGRPOTrainer`, `compute_advantages`, `length_conditional_mask`.
"""

from balcaprl.advantages import compute_advantages
from balcaprl.length import length_conditional_mask

__version__ = "0.1.0"

__all__ = ["BalCapConfig", "BalCapGRPOTrainer", "compute_advantages", "length_conditional_mask", "__version__"]


def __getattr__(name):
    # The trainer pulls in TRL and transformers (seconds to import); the pure math stays importable without them.
    if name == "BalCapConfig":
        from balcaprl.config import BalCapConfig

        return BalCapConfig
    if name == "BalCapGRPOTrainer":
        from balcaprl.trainer.grpo import BalCapGRPOTrainer

        return BalCapGRPOTrainer
    raise AttributeError(f"module 'balcaprl' has no attribute {name!r}")
