"""A recipe file read with the cheap checks first (it exists, it is YAML, it is a mapping of keys), so that a typo in
a path or in the YAML is one line naming the file, line and column, before torch or TRL is imported.
"""

from __future__ import annotations

import os
from typing import Any


class RecipeError(ValueError):
    """A recipe or command line that cannot run: unknown key, bad value, missing required key."""


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The keys of the recipe at ``path``; `RecipeError` when it is missing, not YAML, or not a mapping."""
    import yaml

    if not os.path.isfile(path):
        raise RecipeError(f"recipe {os.fspath(path)!r} is not a file.")
    try:
        with open(path, encoding="utf-8") as file:
            recipe = yaml.safe_load(file)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = error.problem or error.context or "invalid YAML"
        raise RecipeError(f"recipe {os.fspath(path)}: not valid YAML at {where}: {problem}.") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise RecipeError(f"recipe {os.fspath(path)}: not valid YAML: {error}") from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise RecipeError(
            f"recipe {os.fspath(path)}: the file holds a YAML {type(recipe).__name__}, not a mapping of keys "
            "(`key: value` lines)."
        )
    return recipe
