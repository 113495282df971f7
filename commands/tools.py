"""The subcommands whose tools live in other packages: invert, verify, unlearn, report.

`fl-lab` and `fl-lab demo` dispatch through the same table, so the demo runs exactly what the
subcommands run.
"""

from __future__ import annotations

from collections.abc import Callable


# Each handler imports its tool when it is called, not when this module is imported: torch stays
# out of `fl-lab --help` and out of the commands that do not need it.
def invert(argv: list[str]) -> int:
    from inversion.cli import main

    return main(argv)


def verify(argv: list[str]) -> int:
    from unlearning.cli import verify_main

    return verify_main(argv)


def unlearn(argv: list[str]) -> int:
    from unlearning.cli import unlearn_main

    return unlearn_main(argv)


def report(argv: list[str]) -> int:
    from commands.report import main

    return main(argv)


# name -> (help, handler taking the subcommand's argv and returning an exit code)
TOOLS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "invert": ("reconstruct client images from a run's captured updates", invert),
    "verify": ("does the backdoor fire, and on the reconstructions?", verify),
    "unlearn": ("fine-tune the backdoor away with the reconstructions", unlearn),
    "report": ("the experiment report (report.md, self-contained report.html, plots/)", report),
}
