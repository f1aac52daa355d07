"""``balcaprl data``: look at a dataset before a run (``inspect``), and write BalCapRL's detailed reference captions
with a vision model (``recaption``).

    balcaprl data inspect SPEC [--recipe R] [--output-dir DIR]
    balcaprl data recaption IMAGES --output FILE --base-url URL --model M [...]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

COMMANDS = {
    "inspect": ("balcaprl.data.inspect", "rows, images, reference lengths and the token budget of a dataset"),
    "recaption": ("balcaprl.data.recaption", "detailed reference captions from an OpenAI-compatible vision model"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to the subcommand's own ``main(argv) -> exit code`` (each has its own ``--help``)."""
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
        print("usage: balcaprl data {" + ",".join(COMMANDS) + "} ...\n\n" + "\n".join(lines))
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module, _ = COMMANDS[argv[0]]
    return importlib.import_module(module).main(argv[1:])
