"""``vllm.logprobs.Logprob``: one entry of a generated token's logprob dictionary."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    """Log probability of a token, its 1-based rank in the distribution it was drawn from, and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None
