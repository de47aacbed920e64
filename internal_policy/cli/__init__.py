"""The `internal-policy` command: one module per subcommand, each with `register(subparsers)`.

Subcommand modules import heavy libraries inside their handlers so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import InputError

COMMANDS = ("profile", "train", "evaluate", "plot", "stages", "report", "predict", "ablate", "branch_points")
INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT), as shells report it."""


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the subcommand, turn user errors into one clear line and exit code 2.

    Every user-facing error is an `InputError` (see `internal_policy.errors`); a missing file a user
    named is one too. Ctrl-C prints one line, with the `--resume` command where the subcommand has one.
    """
    parser = argparse.ArgumentParser(prog="internal-policy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_extra", False):  # only `train` parses its own (generated) options
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return int(args.handler(args) or 0)
    except (InputError, FileNotFoundError) as err:
        message = " ".join(str(err).splitlines())  # one line, whatever a wrapped library message held
        print(f"internal-policy {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = (f"; what finished is kept in {args.out}: run the same command with --resume to continue"
                if hasattr(args, "resume") and getattr(args, "out", None) else "")
        print(f"internal-policy {args.command}: interrupted{hint}", file=sys.stderr)
        return INTERRUPTED
