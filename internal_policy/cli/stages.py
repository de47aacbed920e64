"""`internal-policy stages`: EIC stages of ΔH_FFN and the BuPO boundary layer of a profile run."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add `stages` and its options to the subcommands."""
    p = sub.add_parser("stages", help="EIC stages (exploration, integration, convergence) and the boundary layer",
                       description="Segment the ΔH_FFN curve of a profile run into EIC stages, print them and "
                                   "store them with the parameters given here (default RUN_DIR/stages.json, "
                                   "which `plot` and `train --internal-layer auto` then use; --out FILE for a "
                                   "run folder you cannot write).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder written by `internal-policy profile`")
    p.add_argument("--rel-tol", type=float, default=0.05, help="≈ 0 band as a fraction of max|ΔH_FFN| (default 0.05)")
    p.add_argument("--abs-tol", type=float, default=0.01, help="floor of the ≈ 0 band in nats (default 0.01)")
    p.add_argument("--min-run", type=int, default=2,
                   help="interior runs shorter than this take their neighbours' label (default 2)")
    p.add_argument("--out", default=None, metavar="FILE", help="where to write the stages JSON "
                                                               "(default: RUN_DIR/stages.json)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Segment the run's ΔH_FFN curve, print the stages and store them as JSON."""
    from ..runs import load_run
    from ..stages import describe, stages_from_summary, write_stages

    stages = stages_from_summary(load_run(args.run_dir).summary, rel_tol=args.rel_tol, abs_tol=args.abs_tol,
                                 min_run=args.min_run)
    print(describe(stages))
    print(f"-> {write_stages(args.out or args.run_dir, stages)}")
    return 0
