"""Package facades whose public names live in submodules and are imported on first use.

`from balcaprl.models import load_processor` then costs what ``balcaprl.models.processors`` costs, not what every
module of the package costs (transformers, datasets, openai and PIL take seconds to import). Inside the library,
modules import from the defining submodule; the facades are for users (`tests/test_layering.py` checks both).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps each public name to the submodule defining it."""

    def __getattr__(name: str) -> object:
        submodule = exports.get(name)
        if submodule is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{submodule}"), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
