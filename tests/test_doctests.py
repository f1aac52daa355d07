"""The examples in the docstrings of the pure math and the built-in rewards run and give what they show."""

import doctest
import importlib

import pytest

MODULES = [
    "balcaprl.advantages",
    "balcaprl.length",
    "balcaprl.rewards.cider",
    "balcaprl.rewards.length_penalty",
    "balcaprl.rewards.world",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no example to run"
    assert result.failed == 0
