"""The judge's recipe keys (`JudgeConfig`), declared once; importing this module pulls in neither openai nor PIL."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from numbers import Real
from typing import Any

DEFAULT_MAX_PIXELS = 1280 * 28 * 28  # Qwen2.5-VL's recommended upper bound (1280 visual tokens): 1,003,520 px
DEFAULT_JPEG_QUALITY = 90
RESPONSE_FORMATS = ("json_schema", "json_object", "none")


@dataclass
class JudgeConfig:
    r"""The judge's recipe keys — the one place they are declared. ``judge_<name>`` is `JudgeClient`'s argument
    ``<name>``; `balcaprl.config.RewardConfig` (recipes, ``TrlParser``), the reward registry and the ``balcaprl
    evaluate`` options are all derived from these fields.

    judge_base_url / judge_model: the OpenAI-compatible judge server and the model it serves (a judge needs both).
    judge_api_key_env: NAME of the environment variable holding the API key (the key never goes in a recipe).
    judge_price_per_million_tokens: [input_price, output_price], what the judge charges per million prompt and
    completion tokens (in any currency); with it, training logs ``judge/cost`` and evaluation reports the cost.
    The others tune `JudgeClient` (concurrency, timeouts, retries, cache, decoding, answer format, backoff).
    """

    judge_base_url: str | None = field(default=None, metadata={"help": "Judge server base URL (…/v1)."})
    judge_model: str | None = field(default=None, metadata={"help": "Model name served by the judge server."})
    judge_api_key_env: str | None = field(
        default=None, metadata={"help": "NAME of the environment variable holding the judge API key."}
    )
    judge_max_concurrency: int = field(default=16, metadata={"help": "Judge requests in flight at once."})
    judge_timeout: float = field(default=60.0, metadata={"help": "Seconds allowed per judge request."})
    judge_max_retries: int = field(default=4, metadata={"help": "Retries of a failed judge request."})
    judge_cache_dir: str | None = field(default=None, metadata={"help": "On-disk cache of judge answers."})
    judge_temperature: float = field(default=0.0, metadata={"help": "Judge sampling temperature (0: cacheable)."})
    judge_max_tokens: int = field(default=512, metadata={"help": "Length limit of a judge answer, in tokens."})
    judge_response_format: str = field(
        default="json_schema",
        metadata={
            "help": "How the judge is held to the JSON schema: json_schema (constrained decoding), json_object, or "
            "none (for servers that reject response_format; the prompt alone asks for JSON).",
            "choices": list(RESPONSE_FORMATS),
        },
    )
    judge_schema_in_prompt: bool = field(default=True, metadata={"help": "Also state the JSON schema in the prompt."})
    judge_backoff_base_s: float = field(default=0.5, metadata={"help": "First retry delay; doubles per retry."})
    judge_backoff_max_s: float = field(
        default=30.0, metadata={"help": "Longest retry delay (also caps a server's Retry-After)."}
    )
    judge_max_pixels: int = field(
        default=DEFAULT_MAX_PIXELS,
        metadata={
            "help": "Pixel budget of an image sent to the judge (aspect ratio kept, never upscaled); the default, "
            "1280 x 28 x 28, is Qwen2.5-VL's recommended maximum."
        },
    )
    judge_jpeg_quality: int = field(
        default=DEFAULT_JPEG_QUALITY, metadata={"help": "JPEG quality of images sent to the judge (1-95)."}
    )
    judge_price_per_million_tokens: list[float] | None = field(
        default=None,
        metadata={
            "help": "[input_price, output_price]: the judge's price per million prompt and completion tokens, in "
            "any currency; adds the judge/cost metric (None: no cost).",
            "type": float,
            "nargs": 2,
            "metavar": ("INPUT", "OUTPUT"),
        },
    )

    def __post_init__(self):
        if self.judge_price_per_million_tokens is not None:
            self.judge_price_per_million_tokens = list(price_pair(self.judge_price_per_million_tokens))

    def judge_context(self) -> dict[str, Any]:
        """The ``judge_*`` keys and values (what `get_reward_funcs` and `JudgeClient.from_config` read)."""
        return {key: getattr(self, key) for key in RECIPE_KEYS}


RECIPE_KEYS = tuple(item.name for item in fields(JudgeConfig))


def price_pair(price: Any) -> tuple[float, float] | None:
    """``judge_price_per_million_tokens`` checked: None, or (input, output) prices, two non-negative finite numbers;
    anything else is a ValueError naming the key."""
    if price is None:
        return None
    pair = None
    if isinstance(price, Sequence) and not isinstance(price, str) and len(price) == 2:
        pair = tuple(_number(value) for value in price)  # YAML reads 1e-1 as a string: numeric strings count
    if pair is None or None in pair or not all(math.isfinite(value) and value >= 0 for value in pair):
        raise ValueError(
            "judge_price_per_million_tokens must be [input_price, output_price], two finite numbers >= 0: the price "
            f"per million prompt and completion tokens (e.g. [0.15, 0.6]); got {price!r}."
        )
    return pair


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (Real, str)):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def token_cost(prompt_tokens: float, completion_tokens: float, price: Sequence[float]) -> float:
    """What ``prompt_tokens`` and ``completion_tokens`` cost at ``price`` = (input, output) per million tokens."""
    return (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    """Every `JudgeConfig` key as a ``--judge-...`` option of a command line (its help, type and choices from the
    field's metadata), in one argument group: the same judge options for every command that talks to a judge."""
    group = parser.add_argument_group("judge (the recipes' judge_* keys, declared in balcaprl.judge.JudgeConfig)")
    for setting in fields(JudgeConfig):
        value_type = parse_bool if isinstance(setting.default, bool) else type(setting.default or "")
        group.add_argument(
            f"--{setting.name.replace('_', '-')}",
            dest=setting.name,
            type=setting.metadata.get("type", value_type),
            nargs=setting.metadata.get("nargs"),
            metavar=setting.metadata.get("metavar"),
            choices=setting.metadata.get("choices"),
            help=setting.metadata["help"],
        )


def parse_bool(text: str) -> bool:
    """A command-line boolean: true / false, 1 / 0, yes / no (any case)."""
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")
