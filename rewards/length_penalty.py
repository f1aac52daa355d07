"""Linear length penalty: the length-control baseline of the BalCapRL ablation (arXiv 2605.07394).

r = −scale · |ρ − 1|, with ρ = len(caption) / mean len(references) (words, as the length mask). Unlike the
length-conditional mask, it pushes every caption toward the reference length, not just those outside a window.
"""

from __future__ import annotations

from balcaprl.completions import completion_text
from balcaprl.length import length_ratios


class LengthPenalty:
    """TRL reward function ``length_penalty(prompts, completions, references, **kwargs)``: −scale · |ρ − 1|.

    >>> penalty = LengthPenalty()
    >>> captions = ["a red circle", "a big red circle on the far left side"]
    >>> completions = [[{"role": "assistant", "content": text}] for text in captions]
    >>> penalty(prompts=None, completions=completions, references=[["one red circle"]] * 2)
    [-0.0, -2.0]
    """

    def __init__(self, scale: float = 1.0, reference_column: str = "references"):
        if scale < 0:
            raise ValueError(f"length_penalty scale must be >= 0, got {scale}.")
        self.scale = float(scale)
        self.reference_column = reference_column
        self.__name__ = "length_penalty"

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        if kwargs.get(self.reference_column) is None:
            raise ValueError(f"length_penalty needs the dataset column {self.reference_column!r}.")
        ratios = length_ratios([completion_text(c) for c in completions], kwargs[self.reference_column])
        return [-self.scale * abs(ratio - 1.0) for ratio in ratios.tolist()]

    def __repr__(self) -> str:
        return f"length_penalty(scale={self.scale})"
