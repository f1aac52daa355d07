"""Helpers on TRL completions, shared by the trainer and the reward functions (no other imports of the package)."""

from __future__ import annotations

from typing import Any


def completion_text(completion: Any) -> str:
    """Text of a TRL completion: a plain string, or a conversational ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")
