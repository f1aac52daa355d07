"""``balcaprl data``: look at a dataset before a run (``inspect``), and write BalCapRL's detailed reference captions
with a vision model (``recaption``).

    balcaprl data inspect SPEC [--recipe R] [--output-dir DIR]
    balcaprl data recaption IMAGES --output FILE --base-url URL --model M [...]
"""

from __future__ import annotations

from collections.abc import Sequence

from balcaprl.command_groups import dispatch

COMMANDS = {
    "inspect": ("balcaprl.data.inspect", "rows, images, reference lengths and the token budget of a dataset"),
    "recaption": ("balcaprl.data.recaption", "detailed reference captions from an OpenAI-compatible vision model"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to the subcommand's own ``main(argv) -> exit code`` (each has its own ``--help``)."""
    return dispatch("data", COMMANDS, argv)
