"""`internal-policy plot`: paper-style figures (PNG + PDF) from one or more profile run folders."""

from __future__ import annotations

import argparse

from ..plot import KINDS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw the entropy-flow, ΔH, cosine, heatmap, logit-lens and comparison figures",
                       description="Draw figures from profile run folders (summary.csv, tokens.parquet, run.json).")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folder(s) written by `internal-policy profile`")
    p.add_argument("--out", default=None, help="folder for the figures (default: RUN_DIR/figures; "
                                                "required with several runs)")
    p.add_argument("--kind", action="append", choices=(*KINDS, "all"), default=None,
                   help="figure to draw; repeat for several (default: all)")
    p.add_argument("--record", default=None, help="record id for the heatmap and lens figures (default: the first)")
    p.add_argument("--stat", default="entropy", help="statistic of the flow, heatmap, lens and compare figures "
                                                     "(a column the run has, e.g. nll, rank, kl_out, renyi2)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..plot import plot_runs

    paths = plot_runs(args.run_dirs, args.out, args.kind or ("all",), record_id=args.record, stat=args.stat)
    for path in paths:
        print(path)
    if not paths:
        print("nothing drawn: the runs lack the components or tokens.parquet these figures need")
    return 0
