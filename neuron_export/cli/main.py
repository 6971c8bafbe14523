"""The `neuron-export` entry point. Started as the command (no arguments given), it first tries the quick rerun
(cli/rerun.py: the standard library only); otherwise, or called with arguments from Python, the app runs the
command in full."""

import os
import sys

from neuron_export.cli import rerun


def main(argv: list[str] | None = None) -> None:
    """`neuron-export ARGS`: exits with the command's code (0: returns)."""
    as_command = argv is None  # the process is this command: its arguments and environment are the whole input
    args = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ)  # as given, before the app sets its defaults
    if as_command and rerun.answer(args, environ):
        return
    from neuron_export.cli.app import run

    rerun.Recording.on, rerun.Recording.kept = as_command, None
    code = run(args)
    if as_command and code == 0:
        rerun.save(args, environ)
    if code:
        sys.exit(code)
