"""Reward-function outputs checked at every step: one finite float or None per completion, or an error that names
the reward and the step (`checked_reward`).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from trl.trainer.utils import get_callable_name, is_async_callable


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
