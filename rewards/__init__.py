"""Reward functions for captioning RL, installed as ``balcaprl.rewards``.

Every reward is a TRL reward function: ``fn(prompts, completions, **kwargs) -> list[float | None]`` (sync or
``async def``) with a stable ``__name__``, which becomes the metric name ``rewards/<name>/mean``. Dataset columns
(``references``, ``image``, ...) arrive as keyword arguments, one entry per completion. ``None`` means the caption
could not be scored (e.g. a judge call failed after its retries); it is never silently turned into 0.
"""

from __future__ import annotations

from typing import Any

__all__ = ["completion_text"]


def completion_text(completion: Any) -> str:
    """Text of a TRL completion: a plain string, or a conversational ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")
