"""vLLM's validation error: a `ValueError`, as in ``vllm.exceptions``."""


class VLLMValidationError(ValueError):
    """A request or engine argument failed vLLM's validation."""
