"""LLM judges over any OpenAI-compatible server: the client (`JudgeClient`), its recipe keys (`JudgeConfig`), image
encoding, and the guard that checks judges before training and stops a run whose judge fails.
"""

from balcaprl._lazy import lazy_exports

__all__ = [
    "ImageEncoder",
    "JudgeClient",
    "JudgeConfig",
    "JudgeUnavailableError",
    "RECIPE_KEYS",
    "check_judges",
    "extract_json_object",
    "image_message_part",
    "judge_guard_callbacks",
    "token_cost",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "JudgeClient": "client",
        "JudgeConfig": "config",
        "RECIPE_KEYS": "config",
        "ImageEncoder": "images",
        "extract_json_object": "messages",
        "image_message_part": "messages",
        "JudgeUnavailableError": "guard",
        "check_judges": "guard",
        "judge_guard_callbacks": "guard",
        "token_cost": "config",
    },
)
