"""``balcaprl judge``: tools about the judge itself.

balcaprl judge audit --judge-base-url URL --judge-model M [...]   agreement of the judge rewards with exact scores
"""

from __future__ import annotations

from collections.abc import Sequence

from balcaprl.command_groups import dispatch

COMMANDS = {
    "audit": ("balcaprl.judge.audit", "score labelled captions with the judge and report whether it can be trusted"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to the subcommand's own ``main(argv) -> exit code`` (each has its own ``--help``)."""
    return dispatch("judge", COMMANDS, argv)
