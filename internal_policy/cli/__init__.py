"""The `internal-policy` command: one module per subcommand, each with `register(subparsers)`.

Subcommand modules import heavy libraries inside their handlers so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import InputError
from ..models import UnsupportedModelError

COMMANDS = ("profile", "train", "evaluate", "plot", "stages", "branch_points")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the subcommand, turn user errors into one clear line and exit code 2."""
    parser = argparse.ArgumentParser(prog="internal-policy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (InputError, UnsupportedModelError, FileNotFoundError) as err:
        print(f"internal-policy {args.command}: error: {err}", file=sys.stderr)
        return 2
