"""`internal-policy report`: one self-contained HTML report (settings, stages, figures, token × layer view)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `report` subcommand."""
    p = sub.add_parser("report", help="write one self-contained HTML report of profile runs",
                       description="Write one HTML file that opens offline in a browser: each run's settings "
                                   "(run.json), EIC stage table, figures, and an interactive token × layer view "
                                   "(hover a cell: token, layer, value, top decoded tokens); several runs are "
                                   "also compared. The run folders are only read.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN", help="folder(s) written by `internal-policy profile`")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="the HTML file to write (an existing file is replaced only if it is a report of this tool)")
    p.add_argument("--stat", default="entropy",
                   help="statistic of the token × layer view and the figures (a column the runs have, "
                        "e.g. nll, rank, kl_out; default entropy)")
    p.add_argument("--records", type=int, default=3, help="records embedded in the token × layer view (default 3)")
    p.add_argument("--max-positions", type=int, default=64,
                   help="token positions embedded per record (the first ones; default 64)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Write the report and print its path."""
    from ..report import write_report

    print(write_report(args.run_dirs, args.out, stat=args.stat, records=args.records,
                       max_positions=args.max_positions))
    return 0
