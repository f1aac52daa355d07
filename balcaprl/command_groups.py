"""Dispatch of the ``balcaprl`` command groups (``balcaprl data ...``, ``balcaprl judge ...``) to their subcommands.

Each subcommand is a module with its own ``main(argv) -> exit code`` and its own ``--help``; a group only names them.
Imported lazily, so that ``balcaprl data inspect`` never pays for the modules of ``recaption`` (or torch).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping, Sequence


def dispatch(group: str, commands: Mapping[str, tuple[str, str]], argv: Sequence[str] | None = None) -> int:
    """Run ``balcaprl <group> <command> ...``: ``commands`` maps a command to (module, one-line help).

    ``-h`` / ``--help`` print the group's usage (exit 0); no command or an unknown one prints it with one
    ``balcaprl <group>: error:`` line on stderr (exit 2, argparse's code for usage errors).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in commands:
        module, _ = commands[argv[0]]
        return importlib.import_module(module).main(argv[1:])
    lines = [f"  {name:<10} {text}" for name, (_, text) in commands.items()]
    usage = f"usage: balcaprl {group} {{{','.join(commands)}}} ...\n\n" + "\n".join(lines)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    unknown = f"unknown command {argv[0]!r}; " if argv else ""
    print(f"{usage}\nbalcaprl {group}: error: {unknown}choose one of {', '.join(commands)}", file=sys.stderr)
    return 2
