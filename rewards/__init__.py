"""Reward functions for captioning RL, installed as ``balcaprl.rewards``.

Every reward is a TRL reward function: ``fn(prompts, completions, **kwargs) -> list[float | None]`` (sync or
``async def``) with a stable ``__name__``, which becomes the metric name ``rewards/<name>/mean``. Dataset columns
(``references``, ``image``, ...) arrive as keyword arguments, one entry per completion. ``None`` means the caption
could not be scored (e.g. a judge call failed after its retries); it is never silently turned into 0.

Built-ins, by registered name (see `get_reward_funcs`):

- ``precision``, ``recall``, ``linguistic``: BalCapRL's judge-based rewards (`balcaprl.rewards.judged`);
- ``cider_d``: CIDEr-D with document frequencies fixed from the training references (`balcaprl.rewards.cider`);
- ``length_penalty``: −|ρ − 1|, the linear length-control baseline (`balcaprl.rewards.length_penalty`);
- ``world_precision``, ``world_recall``, ``world_linguistic``: exact analogues of the three judges on the synthetic
  shapes world, read from its ``scene`` column (`balcaprl.rewards.world`, `balcaprl.world`).
"""

from __future__ import annotations

if __name__ != "balcaprl.rewards":  # e.g. `import rewards` from the repository root: a second copy of every registry
    raise ImportError(
        f"The reward functions are the package balcaprl.rewards; import them under that name, not as {__name__!r}."
    )

import importlib  # noqa: E402
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from balcaprl.completions import completion_text
from balcaprl.judge.config import RECIPE_KEYS
from balcaprl.rewards.cider import CiderD, CiderDReward, cider_d

__all__ = [
    "REWARD_BUILDERS",
    "CiderD",
    "CiderDReward",
    "cider_d",
    "completion_text",
    "get_reward_funcs",
    "get_reward_weights",
]


# --------------------------------------------------------------------------------------------------- registry
# A builder takes the recipe context (its other keys: judge_*, reference_column, corpus_references, ...) and the
# reward's own keyword arguments from the spec, and returns the reward function.


def _judge(context: dict[str, Any], clients: dict):
    """One `JudgeClient` per distinct judge configuration, shared by the rewards that use it."""
    from balcaprl.judge.client import JudgeClient

    settings = {key: context.get(key) for key in RECIPE_KEYS}
    identity = tuple(sorted((key, repr(value)) for key, value in settings.items()))
    if identity not in clients:
        clients[identity] = JudgeClient.from_config(settings)
    return clients[identity]


def _build_precision(context, clients, image_column: str = "image", prompt_version: str | None = None):
    from balcaprl.rewards.judged import PROMPT_VERSION, PrecisionReward

    return PrecisionReward(_judge(context, clients), image_column, prompt_version or PROMPT_VERSION)


def _build_recall(context, clients, prompt_version: str | None = None):
    from balcaprl.rewards.judged import PROMPT_VERSION, RecallReward

    reference_column = context.get("reference_column") or "references"
    return RecallReward(_judge(context, clients), reference_column, prompt_version or PROMPT_VERSION)


def _build_linguistic(context, clients, prompt_version: str | None = None):
    from balcaprl.rewards.judged import PROMPT_VERSION, LinguisticReward

    return LinguisticReward(_judge(context, clients), prompt_version or PROMPT_VERSION)


def _build_cider_d(context, clients, **cider_kwargs):
    corpus = context.get("corpus_references")
    if corpus is None:
        raise ValueError(
            "The 'cider_d' reward needs the training references to fix its document frequencies: pass "
            "corpus_references=[[reference, ...], ...] (one list per training image) in the context."
        )
    return cider_d(corpus, reference_column=context.get("reference_column") or "references", **cider_kwargs)


def _build_length_penalty(context, clients, scale: float = 1.0):
    from balcaprl.rewards.length_penalty import LengthPenalty

    return LengthPenalty(scale, context.get("reference_column") or "references")


def _build_world_precision(context, clients, scene_column: str = "scene"):
    from balcaprl.rewards.world import WorldPrecision

    return WorldPrecision(scene_column)


def _build_world_recall(context, clients, scene_column: str = "scene", weights: dict | None = None):
    from balcaprl.rewards.world import WorldRecall

    return WorldRecall(scene_column, weights)


def _build_world_linguistic(context, clients, rating_scale: list[int] | None = None):
    from balcaprl.rewards.world import WorldLinguistic

    return WorldLinguistic(rating_scale)


REWARD_BUILDERS: dict[str, Callable[..., Callable]] = {
    "precision": _build_precision,
    "recall": _build_recall,
    "linguistic": _build_linguistic,
    "cider_d": _build_cider_d,
    "length_penalty": _build_length_penalty,
    "world_precision": _build_world_precision,
    "world_recall": _build_world_recall,
    "world_linguistic": _build_world_linguistic,
}


def _split_spec(spec: str | Mapping[str, Any], index: int) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        return spec["name"], {key: value for key, value in spec.items() if key not in ("name", "weight")}
    raise ValueError(
        f"Reward spec #{index} ({spec!r}) must be a registered name, a dotted path 'package.module:function', or "
        "a mapping with a 'name' key (and optional 'weight' and keyword arguments)."
    )


def _import_reward(path: str, index: int) -> Any:
    module_name, _, attribute = path.partition(":")
    if not attribute:  # also accept package.module.function
        module_name, _, attribute = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # importing runs the user's module: a SyntaxError or any error at import time
        raise ValueError(
            f"Reward spec #{index}: cannot import {module_name!r} for {path!r}: {type(error).__name__}: {error}"
        ) from error
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"Reward spec #{index}: module {module_name!r} has no {attribute!r} ({path!r}).") from None


def get_reward_funcs(specs: Sequence[str | Mapping[str, Any]], **context: Any) -> list[Callable]:
    """Reward functions from recipe entries.

    Each spec is a registered name (``"cider_d"``; see `REWARD_BUILDERS`), a dotted import path
    (``"my_pkg.rewards:brevity"``, the function itself), or a mapping ``{name: ..., weight: ..., **kwargs}``; with
    kwargs, a dotted path names a factory called with them. ``context`` holds the recipe's other keys (the
    ``judge_*`` keys for judge rewards, ``reference_column``, ``corpus_references`` for ``cider_d``). Judge
    rewards with the same judge settings share one client. Unknown names fail with the list of known ones.
    """
    if isinstance(specs, (str, Mapping)):
        specs = [specs]
    clients: dict = {}
    functions = []
    for index, spec in enumerate(specs):
        name, kwargs = _split_spec(spec, index)
        if name in REWARD_BUILDERS:
            judge_overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in RECIPE_KEYS}
            builder = REWARD_BUILDERS[name]
            try:
                inspect.signature(builder).bind(context, clients, **kwargs)
            except TypeError as error:
                raise ValueError(f"Reward spec #{index} ({name!r}) has a bad keyword argument: {error}") from error
            function = builder({**context, **judge_overrides}, clients, **kwargs)
        elif ":" in name or "." in name:
            function = _import_reward(name, index)
            if kwargs:
                function = function(**kwargs)
            if not callable(function):
                raise ValueError(f"Reward spec #{index}: {name!r} is not callable.")
        else:
            raise ValueError(
                f"Unknown reward {name!r} (spec #{index}); registered rewards are {sorted(REWARD_BUILDERS)}, or give "
                "a dotted import path such as 'my_pkg.rewards:brevity'."
            )
        functions.append(function)
    return functions


def get_reward_weights(specs: Sequence[str | Mapping[str, Any]]) -> list[float]:
    """The ``weight`` of each spec (1.0 when absent), in order: the value for ``BalCapConfig.reward_weights``."""
    if isinstance(specs, (str, Mapping)):
        specs = [specs]
    weights = []
    for index, spec in enumerate(specs):
        weight = spec.get("weight", 1.0) if isinstance(spec, Mapping) else 1.0
        try:
            weights.append(float(weight))
        except (TypeError, ValueError):
            raise ValueError(
                f"Reward spec #{index} ({spec.get('name')!r}) has weight {weight!r}, not a number."
            ) from None
        if not math.isfinite(weights[-1]):
            raise ValueError(
                f"Reward spec #{index} ({spec.get('name')!r}) has weight {weight!r}, not a finite number."
            )
    return weights
