"""`internal-policy plot`: paper-style figures (PNG + PDF) from one or more profile run folders."""

from __future__ import annotations

import argparse

from ..plot import KINDS


def register(sub: argparse._SubParsersAction) -> None:
    """Add `plot` and its options to the subcommands."""
    p = sub.add_parser("plot", help="draw the entropy-flow, ΔH, cosine, heatmap, logit-lens, comparison and heads "
                                    "figures",
                       description="Draw figures from profile run folders (summary.csv, tokens.parquet, run.json); "
                                   "the runs' files are only read.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folder(s) written by `internal-policy profile`")
    p.add_argument("--out", default=None, help="folder for the figures (default: RUN_DIR/figures; "
                                                "required with several runs)")
    p.add_argument("--kind", action="append", choices=(*KINDS, "all"), default=None,
                   help="figure to draw; repeat for several (default: all)")
    p.add_argument("--record", default=None, help="record id for the heatmap and lens figures (default: the first)")
    p.add_argument("--stat", default="entropy", help="statistic of the flow, heatmap, lens, compare and heads figures "
                                                     "(a column the run has, e.g. nll, rank, kl_out, renyi2)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Draw the figures of the run folders and print their paths."""
    from pathlib import Path

    from ..errors import InputError
    from ..plot import plot_runs

    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError(f"--out {args.out} is an existing file; give a folder for the figures")
    try:
        paths = plot_runs(args.run_dirs, args.out, args.kind or ("all",), record_id=args.record, stat=args.stat)
    except (PermissionError, NotADirectoryError) as err:  # e.g. RUN_DIR/figures of a read-only run
        raise InputError(f"cannot write the figures to {err.filename} ({err.strerror}); "
                         "pass --out with a folder you can write to") from None
    for path in paths:
        print(path)
    if not paths:
        print("nothing drawn: the runs lack the components or tokens.parquet these figures need")
    return 0
