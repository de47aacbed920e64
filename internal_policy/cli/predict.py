"""`internal-policy predict`: cross-validated ROC AUC of a record field (e.g. `correct`) from the layer profile."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add `predict` and its options to the subcommands."""
    p = sub.add_parser("predict", help="how well the per-record layer profile predicts a field such as `correct`",
                       description="Cross-validated ROC AUC (standardised logistic regression, seeded stratified "
                                   "k-fold) of a binary record field from one statistic at every layer of a profile "
                                   "run's records.parquet, next to a label-permutation baseline and per-layer "
                                   "single-feature AUCs; writes predict.csv and predict.json.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder written by `internal-policy profile` (records.parquet)")
    p.add_argument("--target", default="correct", help="binary record field to predict (default: correct)")
    p.add_argument("--stat", default="entropy", help="statistic used as features (default: entropy; also delta, "
                                                     "cos_resid or any statistic the run computed)")
    p.add_argument("--components", default="layer", help="comma-separated components whose (layer) values are the "
                                                         "features (default: layer)")
    p.add_argument("--folds", type=int, default=5, help="stratified cross-validation folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds and the label permutations (default 0)")
    p.add_argument("--permutations", type=int, default=10, help="label permutations of the baseline (default 10)")
    p.add_argument("--group-folds", default=None, metavar="FIELD",
                   help="keep the records sharing this field in one fold (e.g. prompt_id for several samples "
                        "per prompt)")
    p.add_argument("--out", default=None, help="folder for predict.csv / predict.json (default: RUN_DIR)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Fit and score the predictor, print the report and write predict.csv / predict.json."""
    from ..predict import predict

    components = tuple(c.strip() for c in args.components.split(",") if c.strip())
    result = predict(args.run_dir, target=args.target, stat=args.stat, components=components,
                     folds=args.folds, seed=args.seed, permutations=args.permutations, group_folds=args.group_folds)
    print(result.report())
    print(f"-> {', '.join(map(str, result.save(args.out or args.run_dir)))}")
    return 0
