"""The package's layers hold: no import cycle, the library never imports the experiments or an entry-point script,
library code imports from defining modules (not from the lazy package facades), and the facades resolve.

The import graph is read from the source (``ast``), function-level imports included (a cycle through a late import
is still a cycle, only hidden); imports under ``if TYPE_CHECKING:`` are left out, since they never run.
"""

from __future__ import annotations

import ast
import graphlib
import importlib
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.paths import REPO

# The scripts users run: the console script and the `python -m` entry points. Library modules must not import them.
ENTRY_POINTS = {"balcaprl.cli", "balcaprl.train", "balcaprl.sft"}
EXPERIMENTS = "balcaprl.experiments"


@dataclass
class ImportGraph:
    """Modules of the package (by dotted name) and the package modules each one imports."""

    edges: dict[str, set[str]] = field(default_factory=dict)
    facades: set[str] = field(default_factory=set)  # packages whose __init__ only re-exports lazily
    facade_imports: list[tuple[str, str, str]] = field(default_factory=list)  # (importer, facade, name)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[0] == "rewards":  # installed as balcaprl.rewards (pyproject's package-dir)
        parts.insert(0, "balcaprl")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def build_graph(root: Path) -> ImportGraph:
    """The import graph of ``root``'s ``balcaprl/`` and ``rewards/`` source trees."""
    paths = sorted((root / "balcaprl").rglob("*.py")) + sorted((root / "rewards").rglob("*.py"))
    trees = {module_name(path, root): ast.parse(path.read_text(), str(path)) for path in paths}
    graph = ImportGraph(edges={name: set() for name in trees})
    graph.facades = {
        name
        for name, tree in trees.items()
        if any(isinstance(node, ast.ImportFrom) and node.module == "balcaprl._lazy" for node in tree.body)
    }
    for importer, tree in trees.items():
        skipped = _type_checking_lines(tree)
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [(node.module, alias.name) for alias in node.names]
            else:
                continue
            for module, name in targets:
                if not module.startswith("balcaprl"):
                    continue
                submodule = f"{module}.{name}" if name else None
                if submodule in trees:  # `from balcaprl.models import tiny`: the submodule itself
                    graph.edges[importer].add(submodule)
                elif module in trees:
                    graph.edges[importer].add(module)
                    if module in graph.facades and name:
                        graph.facade_imports.append((importer, module, name))
                else:
                    raise AssertionError(f"{importer} imports {module!r}, which is not a module of the package")
    return graph


def find_cycle(graph: ImportGraph) -> list[str] | None:
    """A cycle as ``[a, b, ..., a]`` where each module imports the next, or None."""
    try:
        graphlib.TopologicalSorter(graph.edges).prepare()
    except graphlib.CycleError as error:
        return error.args[1][::-1]  # graphlib lists each node before the one that imports it
    return None


def layer_violations(graph: ImportGraph) -> list[str]:
    """Library modules importing the experiments or an entry point, and library imports through a facade."""
    problems = []
    for importer, targets in sorted(graph.edges.items()):
        if importer.startswith(EXPERIMENTS) or importer in ENTRY_POINTS or importer.endswith("__main__"):
            continue
        for target in sorted(targets):
            if target.startswith(EXPERIMENTS) or target in ENTRY_POINTS:
                problems.append(f"{importer} imports {target}")
    problems += [
        f"{importer} imports {name} from the facade {facade}: import it from its defining module"
        for importer, facade, name in graph.facade_imports
    ]
    return problems


def test_the_package_has_no_import_cycle():
    graph = build_graph(REPO)
    assert len(graph.edges) > 60  # the whole package was read
    assert find_cycle(graph) is None, f"import cycle: {' imports '.join(find_cycle(graph))}"


def test_the_library_never_imports_experiments_or_entry_points():
    assert layer_violations(build_graph(REPO)) == []


def copy_of_the_source(root: Path) -> Path:
    for folder in ("balcaprl", "rewards"):
        shutil.copytree(REPO / folder, root / folder)
    return root


def test_the_checks_fail_on_a_deliberate_cycle_and_layer_breach(tmp_path):
    copy_of_the_source(tmp_path)
    # balcaprl.trainer.grpo imports balcaprl.length; a late import back closes a cycle
    length = tmp_path / "balcaprl" / "length.py"
    length.write_text(
        length.read_text() + "\n\ndef _late():\n    from balcaprl.trainer.grpo import BalCapGRPOTrainer\n"
    )
    graph = build_graph(tmp_path)
    cycle = find_cycle(graph)
    assert cycle is not None and {"balcaprl.length", "balcaprl.trainer.grpo"} <= set(cycle)
    assert all(imported in graph.edges[importer] for importer, imported in zip(cycle, cycle[1:]))  # each imports next
    # a library module reaching into the experiments, and one importing through a facade
    text = tmp_path / "balcaprl" / "text.py"
    text.write_text(text.read_text() + "\nfrom balcaprl.experiments.demo import main as _main\n")
    generation = tmp_path / "balcaprl" / "generation.py"
    generation.write_text(generation.read_text() + "\nfrom balcaprl.models import load_processor as _load\n")

    graph = build_graph(tmp_path)
    problems = layer_violations(graph)
    assert "balcaprl.text imports balcaprl.experiments.demo" in problems
    assert any(
        problem.startswith("balcaprl.generation imports load_processor from the facade") for problem in problems
    )


def test_type_checking_imports_are_not_edges(tmp_path):
    copy_of_the_source(tmp_path)
    length = tmp_path / "balcaprl" / "length.py"
    length.write_text(
        length.read_text() + "\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
        "    from balcaprl.trainer.grpo import BalCapGRPOTrainer\n"
    )
    assert find_cycle(build_graph(tmp_path)) is None


FACADES = sorted(build_graph(REPO).facades)


@pytest.mark.parametrize("facade", FACADES)
def test_every_facade_name_resolves(facade):
    package = importlib.import_module(facade)
    assert package.__all__ == sorted(package.__all__)
    assert sorted(dir(package)) == sorted(package.__all__)
    for name in package.__all__:
        value = getattr(package, name)
        assert getattr(value, "__module__", facade).startswith("balcaprl") or not callable(value), name
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        package.not_a_name  # noqa: B018


def test_settings_import_without_the_data_and_judge_stacks():
    """`balcaprl.config` (what recipes are parsed into) pulls in neither datasets nor openai nor our loaders.

    (PIL is imported by TRL's own `GRPOConfig`, which `BalCapConfig` subclasses.)
    """
    probe = (
        "import sys, balcaprl.config, balcaprl.data, balcaprl.judge, balcaprl.models, balcaprl.preflight;"
        "heavy = ['datasets', 'openai', 'jsonschema', 'balcaprl.data.loading', 'balcaprl.judge.client',"
        " 'balcaprl.models.loading', 'balcaprl.trainer.grpo'];"
        "print([name for name in heavy if name in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_rewards_cannot_be_imported_under_a_second_name():
    result = subprocess.run([sys.executable, "-c", "import rewards"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert "import them under that name" in result.stderr
