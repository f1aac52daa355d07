"""Reward functions checked twice: as a set before any weights load (`check_reward_set`: names, masking, TRL's
call signature), and their outputs at every step (`checked_reward`: one finite float or None per completion, or an
error that names the reward and the step).
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from trl.trainer.utils import get_callable_name, get_config_model_id, is_async_callable


class RewardFunctionError(RuntimeError):
    """A reward function raised, or returned something other than one finite float or None per completion."""


class _CheckedReward:
    """Wraps a reward function so that a bad output or an exception fails with the reward's name and the step.

    NaN and inf are errors, not "unscorable": a reward that cannot score a caption must say so with ``None``; a NaN
    from arithmetic is a bug that would otherwise be silently dropped from the group statistics.
    """

    def __init__(self, reward_func: Callable):
        self.reward_func = reward_func
        self.__name__ = get_callable_name(reward_func)
        functools.update_wrapper(self, reward_func, assigned=("__doc__", "__module__", "__qualname__"), updated=())

    def __getattr__(self, name):  # expose the wrapped function's attributes (e.g. its judge client)
        if name == "reward_func":
            raise AttributeError(name)
        return getattr(self.reward_func, name)

    def _where(self, kwargs, completions) -> str:
        state = kwargs.get("trainer_state")
        step = f"step {state.global_step}" if state is not None else "an unknown step"
        return f"at {step}, on a batch of {len(completions)} completions"

    def _failed(self, error: Exception, kwargs, completions) -> RewardFunctionError:
        return RewardFunctionError(
            f"Reward function {self.__name__!r} raised {type(error).__name__} {self._where(kwargs, completions)}: "
            f"{error}"
        )

    def _check(self, values, kwargs, completions) -> list:
        where = self._where(kwargs, completions)
        if values is None or len(values) != len(completions):
            count = "None" if values is None else len(values)
            raise RewardFunctionError(
                f"Reward function {self.__name__!r} returned {count} values {where}; it must return one float (or "
                "None when it cannot score) per completion."
            )
        checked = []
        for index, value in enumerate(values):
            if isinstance(value, torch.Tensor) and value.dim() == 0:
                value = value.item()  # a 0-d tensor, as TRL accepts
            if value is not None and not (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))):
                value = math.nan  # reported below: not a number
            if value is not None and not math.isfinite(value):
                raise RewardFunctionError(
                    f"Reward function {self.__name__!r} returned {values[index]!r} for completion {index} {where}; "
                    "return a finite float, or None for a completion it cannot score."
                )
            checked.append(None if value is None else float(value))  # numpy scalars become floats
        return checked

    def __call__(self, prompts, completions, **kwargs):
        try:
            values = self.reward_func(prompts=prompts, completions=completions, **kwargs)
        except Exception as error:
            raise self._failed(error, kwargs, completions) from error
        return self._check(values, kwargs, completions)


class _AsyncCheckedReward(_CheckedReward):
    async def __call__(self, prompts, completions, **kwargs):
        try:
            values = await self.reward_func(prompts=prompts, completions=completions, **kwargs)
        except Exception as error:
            raise self._failed(error, kwargs, completions) from error
        return self._check(values, kwargs, completions)


def checked_reward(reward_func):
    """`reward_func` wrapped by `_CheckedReward` (async kept async); reward models and model names pass through."""
    if isinstance(reward_func, (str, nn.Module, _CheckedReward)):
        return reward_func
    return (_AsyncCheckedReward if is_async_callable(reward_func) else _CheckedReward)(reward_func)


# What TRL 1.16's GRPOTrainer._calculate_rewards passes a reward function as keywords besides the dataset's columns
# (``environments`` only with an ``environment_factory``, which balcaprl does not use).
TRL_REWARD_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


def reward_func_names(reward_funcs) -> list[str]:
    """The names TRL gives ``reward_funcs`` (metrics, weights and masking are addressed by them)."""

    def name(func) -> str:
        if isinstance(func, str):  # a reward model's id, which TRL loads
            return func.split("/")[-1]
        return (
            get_config_model_id(func.config).split("/")[-1] if isinstance(func, nn.Module) else get_callable_name(func)
        )

    return [name(func) for func in reward_funcs]


def masked_reward_names(length_mask_rewards, names: list[str]) -> list[str]:
    """The rewards length masking zeroes; ValueError for a name the run has not (the default, ``["linguistic"]``,
    masks nothing in a run without a ``linguistic`` reward)."""
    from balcaprl.config import DefaultMaskedRewards

    if isinstance(length_mask_rewards, DefaultMaskedRewards):
        return [name for name in length_mask_rewards if name in names]
    unknown = [name for name in length_mask_rewards if name not in names]
    if unknown:
        raise ValueError(
            f"length_mask_rewards names {unknown}, which are not reward functions of this run; the reward functions "
            f"are {names}. Name some of them, or set length_mask_rewards to [] for no length masking."
        )
    return list(length_mask_rewards)


def _signature_problem(func, columns: list[str]) -> str | None:
    """Why TRL's call of ``func`` (`TRL_REWARD_KEYWORDS` and every dataset column, as keywords) would fail, if it
    would."""
    if isinstance(func, (str, nn.Module)):
        return None  # reward models: TRL calls them itself
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # a builtin or extension callable without a signature: cannot tell
        return None
    keywords = dict.fromkeys([*TRL_REWARD_KEYWORDS, *(c for c in columns if c not in ("prompt", "completion"))])
    try:
        signature.bind(**keywords)
    except TypeError as error:
        return f"{error} (TRL calls it with the keywords {sorted(keywords)}; end the signature with **kwargs)"
    return None


def check_reward_set(reward_funcs, args, columns: list[str]) -> None:
    """The reward functions of a run, checked before any weights load: at least one, distinct names, one weight each,
    ``length_mask_rewards`` among them, and each callable the way TRL calls it with the dataset's ``columns``.
    Raises ValueError naming the reward."""
    if not reward_funcs:
        raise ValueError("reward_funcs is empty: a run needs at least one reward function.")
    names = reward_func_names(reward_funcs)
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        # Metrics, masking and reward weights are addressed by name: two functions of one name would be confused.
        raise ValueError(
            f"Reward functions must have distinct names; {duplicates} appear more than once in {names}. Give each "
            "its own __name__ (e.g. a factory that sets it)."
        )
    if args.reward_weights is not None and len(args.reward_weights) != len(reward_funcs):
        raise ValueError(
            f"reward_weights has {len(args.reward_weights)} value(s) for {len(reward_funcs)} reward functions {names}."
        )
    masked_reward_names(args.length_mask_rewards, names)
    for name, func in zip(names, reward_funcs):
        if problem := _signature_problem(func, columns):
            raise ValueError(f"Reward function {name!r} cannot be called as TRL calls it: {problem}.")
