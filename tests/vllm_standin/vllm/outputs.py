"""``RequestOutput`` / ``CompletionOutput``: what ``LLM.generate`` returns, one per prompt, ``n`` completions each."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.logprobs import Logprob


@dataclass
class CompletionOutput:
    """One completion. ``token_ids`` include the EOS / stop token that ended it, as in vLLM."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None  # "stop" (EOS or stop token) or "length"
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    """The result of one prompt. ``prompt_token_ids`` are the processed ones (image placeholders expanded)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list | None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
