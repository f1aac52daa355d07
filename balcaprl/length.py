"""Length-conditional reward masking (BalCapRL, arXiv 2605.07394) — pure functions.

ρ = len(caption) / len(reference), with len(reference) the mean length of the row's references. A caption whose ρ
lies outside [low, high] (bounds inclusive) gets its masked rewards set to 0 — not NaN: inside a group the zero is a
penalty relative to the captions of reasonable length, which is what keeps RL from trading length for a reward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from balcaprl.text import DEFAULT_WINDOW, word_length

__all__ = [
    "DEFAULT_WINDOW",
    "LENGTH_UNITS",
    "word_length",
]  # with the functions below; the first two are defined in text

LENGTH_UNITS = ("words", "tokens")


def length_ratios(
    captions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    length_fn: Callable[[str], int] = word_length,
) -> torch.Tensor:
    """ρ_i = length_fn(captions[i]) / mean(length_fn(r) for r in references[i]), as float64, shape (N,).

    ``references[i]`` is one reference string or a list of them. A row without references, or whose references
    are all empty, raises a `ValueError` naming the row.
    """
    if len(captions) != len(references):
        raise ValueError(f"{len(captions)} captions but {len(references)} reference lists.")
    ratios = []
    for row, (caption, row_references) in enumerate(zip(captions, references)):
        if isinstance(row_references, str):
            row_references = [row_references]
        if row_references is None or len(row_references) == 0:
            raise ValueError(f"Row {row} has no reference caption; length masking needs at least one per row.")
        total_reference_length = sum(length_fn(reference) for reference in row_references)
        if total_reference_length == 0:
            raise ValueError(f"Row {row}: every reference caption is empty ({list(row_references)!r}).")
        # One division of two integers, rounded once: ρ is the double nearest the exact quotient, so comparing it with
        # a window bound (the double nearest a decimal) decides as exact arithmetic would. Dividing by the mean
        # length instead rounds twice: 3 words against references of 3, 3 and 4 gave 0.8999999999999999, masked
        # by a window starting at 0.9.
        ratios.append(length_fn(caption) * len(row_references) / total_reference_length)
    return torch.tensor(ratios, dtype=torch.float64)


def length_conditional_mask(
    ratios: torch.Tensor, low: float = DEFAULT_WINDOW[0], high: float = DEFAULT_WINDOW[1]
) -> torch.Tensor:
    """True where low ≤ ρ ≤ high (the rewards are kept), False where they are masked.

    >>> length_conditional_mask(torch.tensor([0.4, 0.5, 1.0, 2.0, 2.5]))
    tensor([False,  True,  True,  True, False])
    """
    if not low <= high:
        raise ValueError(f"The length window must have low <= high, got [{low}, {high}].")
    return (ratios >= low) & (ratios <= high)


def apply_length_mask(rewards: torch.Tensor, keep: torch.Tensor, columns: Sequence[int]) -> torch.Tensor:
    """A copy of ``rewards`` (N, K) with ``columns`` set to 0 on the rows where ``keep`` is False.

    A masked reward becomes 0 even where it was unscored (NaN): the mask decides its value whatever the judge says.
    """
    masked = rewards.clone()
    if len(columns):
        index = torch.as_tensor(list(columns), dtype=torch.long, device=rewards.device)
        drop = ~keep.to(rewards.device)
        masked[:, index] = torch.where(drop.unsqueeze(1), torch.zeros_like(masked[:, index]), masked[:, index])
    return masked
