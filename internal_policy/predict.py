"""Does the internal-policy profile of a response tell right answers from wrong ones (the Entropy-Lens question)?

`predict` reads a run's per-record table (`records.parquet`: one row per record × layer × component)
and reports the cross-validated ROC AUC of predicting a binary record field (`correct` by default)
from one statistic at every (layer, component) of the chosen components: a scikit-learn pipeline of
`StandardScaler` and `LogisticRegression`, scored on seeded `StratifiedKFold` splits. Two references
say what the AUC means:
- a label-permutation baseline: the same procedure (folds stratified on the shuffled labels, fit, score) on
  `permutations` seeded shuffles of the labels; its mean is ≈ 0.5 and its spread is how far chance alone
  moves the AUC at this size;
- which layers carry the signal: the same cross-validated AUC from each (layer, component) alone,
  with its own permutation baseline, and `mean_diff` = mean of the statistic over positive records −
  over negative ones (the direction). Single-feature AUCs were chosen over the coefficients of the full
  model because neighbouring layers are strongly correlated, which makes coefficients trade weight
  arbitrarily between them, while one feature's AUC reads the same whatever else is in the model.

Records of one prompt (several `--generate` samples) share its difficulty: with `group_folds="prompt_id"`
(`StratifiedGroupKFold`) all samples of a prompt stay in one fold, so the AUC cannot come from
recognising the prompt. Records are the unit: the per-record value is the mean over its kept tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError
from .runs import HEAD_COLUMN, RECORDS, ProfileResult, writable_dir

CSV, JSON = "predict.csv", "predict.json"


@dataclass
class Prediction:
    """`table`: one row for all features together (`component` "all"), then one per (layer, component);
    columns auc, auc_std (over folds), perm_auc, perm_auc_std (over permutations), mean_diff. `meta`: the
    settings, class counts, the overall numbers and the strongest single feature (`top`)."""

    table: pd.DataFrame
    meta: dict

    @property
    def auc(self) -> float:
        """Cross-validated ROC AUC of all features together."""
        return float(self.table["auc"].iloc[0])

    @property
    def top_layer(self) -> int:
        """The layer whose feature alone predicts the target best (largest single-feature AUC)."""
        return int(self.meta["top"]["layer"])

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write predict.csv (the table) and predict.json (meta) into `out_dir`; refuses to replace a
        predict.csv this tool did not write."""
        out = writable_dir(out_dir)
        if (out / CSV).exists() and not (out / JSON).exists():
            raise InputError(f"{out / CSV} exists and was not written by `internal-policy predict`; give another --out")
        self.table.to_csv(out / CSV, index=False)
        (out / JSON).write_text(json.dumps(self.meta, indent=2))
        return [out / CSV, out / JSON]

    def report(self) -> str:
        """A few lines for the terminal: the overall AUC against its baseline, then the per-feature table."""
        m, first = self.meta, self.table.iloc[0]
        top = m["top"]
        lines = [f"predict {m['target']} (positive: {m['positive']!r}; {m['n_records']} records, "
                 f"{m['n_positive']} positive) from {m['stat']} at {m['n_features']} (layer, component) features",
                 f"ROC AUC {first.auc:.3f} ± {first.auc_std:.3f} over {m['folds']} folds; permuted labels "
                 f"{first.perm_auc:.3f} ± {first.perm_auc_std:.3f} over {m['permutations']} permutations",
                 f"strongest single feature: layer {top['layer']} {top['component']} (AUC {top['auc']:.3f})",
                 self.table.to_string(index=False, float_format=lambda x: f"{x:.3f}")]
        return "\n".join(lines)


def _read(run) -> pd.DataFrame:
    """records.parquet of a run folder, a ProfileResult's records, or a records table as is."""
    if isinstance(run, pd.DataFrame):
        return run
    if isinstance(run, ProfileResult):
        table = run.records
        where = run.out_dir or "this in-memory run"
    else:
        where = Path(run)
        table = pd.read_parquet(where / RECORDS) if (where / RECORDS).is_file() else None
    if table is None:
        raise InputError(f"{where} has no {RECORDS} (a run from an older version, or not a profile run); "
                         "profile again with this version to get the per-record table")
    return table


def _design(records: pd.DataFrame, target: str, stat: str, components: Sequence[str]):
    """(features [records × (component, layer)], labels 0/1, record ids, positive class) with clear errors."""
    if "attn_head" in components:
        raise InputError("--components attn_head: predict uses one feature per (layer, component), and heads are "
                         "several per layer; choose among layer, attn, ffn and the other per-layer components")
    stats = [c.removesuffix("_sum") for c in records.columns if c.endswith("_sum")]
    derived = {f"{n}{end}" for n in stats for end in ("", "_std", "_se", "_n", "_sum", "_sumsq")}
    fields = [c for c in records.columns
              if c not in derived | {"record_id", "layer", "component", HEAD_COLUMN, "n_tokens"}]
    if target not in fields:
        raise InputError(f"--target {target}: the records have no field {target!r} (they have: "
                         f"{', '.join(fields) or 'none'}); "
                         + ("`correct` comes from profile --generate on prompts with a gold answer"
                            if target == "correct" else "give a field every record carries"))
    if stat not in stats:
        raise InputError(f"--stat {stat}: the run has no statistic {stat!r} (it has: {', '.join(stats)}); "
                         f"profile with --stats {stat} or pick another")
    missing = [c for c in components if c not in set(records["component"])]
    if missing or not components:
        raise InputError(f"--components: the run has no rows for {missing or '(none given)'}; it has "
                         f"{', '.join(dict.fromkeys(records['component']))}")
    rows = records[records["component"].isin(components)]
    features = rows.pivot_table(index="record_id", columns=["component", "layer"], values=stat, sort=False,
                                dropna=False)
    features = features.dropna(axis=1, how="all").dropna(axis=0)  # e.g. ΔH of layer 0 is undefined: all NaN
    if features.empty:
        raise InputError(f"--stat {stat} has no values for --components {','.join(components)}")
    labels = records.drop_duplicates("record_id").set_index("record_id")[target].reindex(features.index).dropna()
    classes = sorted(_plain(v) for v in labels.unique().tolist())
    if len(classes) != 2:
        what = (f"a single class ({classes[0]!r} for all {len(labels)} records)" if len(classes) == 1
                else f"{len(classes)} classes" if classes else "no labelled records")
        raise InputError(f"--target {target}: ROC AUC needs two classes, the records have {what}"
                         + ("; sample more or harder/easier prompts" if len(classes) == 1 else ""))
    return features.loc[labels.index], (labels == classes[1]).to_numpy(int), labels.index, classes[1]


def _plain(value):
    """A label as plain Python, whole floats as ints (a `correct` column with gaps is read back as 0.0 / 1.0)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _splits(y: np.ndarray, groups: np.ndarray | None, folds: int, seed: int) -> list:
    """Seeded stratified folds (grouped: all records of a group in one fold); checks each fold can be scored."""
    counts = np.bincount(y, minlength=2)
    if folds < 2:
        raise InputError(f"--folds must be at least 2, got {folds}")
    if len(y) < folds or counts.min() < folds:
        raise InputError(f"{len(y)} records ({counts[1]} positive, {counts[0]} negative) are too few for {folds} "
                         "stratified folds (each class needs at least one record per fold); lower --folds or "
                         "profile more records")
    splits = _folds(y, groups, folds, seed)
    if any(len(np.unique(y[test])) < 2 for _, test in splits):
        raise InputError(f"with --group-folds, some of the {folds} folds hold one class only; lower --folds")
    return splits


def _folds(y: np.ndarray, groups: np.ndarray | None, folds: int, seed: int) -> list:
    """The (train, test) index pairs of seeded StratifiedKFold, or StratifiedGroupKFold with `groups`."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    cv = (StratifiedGroupKFold(folds, shuffle=True, random_state=seed) if groups is not None
          else StratifiedKFold(folds, shuffle=True, random_state=seed))
    return list(cv.split(np.zeros(len(y)), y, groups))


def _cv_auc(x: np.ndarray, y: np.ndarray, splits: list) -> np.ndarray:
    """ROC AUC of StandardScaler + LogisticRegression on each held-out fold."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    return cross_val_score(model, x, y, cv=splits, scoring="roc_auc")


def _row(x: np.ndarray, y: np.ndarray, splits: list, nulls: list[tuple[np.ndarray, list]]) -> dict:
    """AUC over the folds, and the mean AUC of each (permuted labels, their folds) of the baseline."""
    folds = _cv_auc(x, y, splits)
    null = np.array([_cv_auc(x, labels, where).mean() for labels, where in nulls])
    return {"auc": folds.mean(), "auc_std": folds.std(), "perm_auc": null.mean(),
            "perm_auc_std": null.std(ddof=1) if len(null) > 1 else 0.0}


def predict(
    run: str | Path | ProfileResult | pd.DataFrame,
    target: str = "correct",
    stat: str = "entropy",
    components: Sequence[str] = ("layer",),
    folds: int = 5,
    seed: int = 0,
    permutations: int = 10,
    group_folds: str | None = None,
) -> Prediction:
    """Cross-validated ROC AUC of predicting the binary record field `target` from `stat` at every (layer,
    component) of `components`, next to a label-permutation baseline and per-feature AUCs (module docstring).

    `run`: a profile run folder, a `ProfileResult`, or a records table. Folds and permutations are seeded by
    `seed`. `group_folds` names a record field (e.g. `prompt_id`) whose records must share a fold."""
    if permutations < 1:
        raise InputError(f"--permutations must be at least 1, got {permutations}")
    records = _read(run)
    if group_folds is not None and group_folds not in records.columns:
        raise InputError(f"--group-folds {group_folds}: the records have no field {group_folds!r}")
    features, y, ids, positive = _design(records, target, stat, list(components))
    groups = (records.drop_duplicates("record_id").set_index("record_id")[group_folds].reindex(ids).to_numpy()
              if group_folds else None)
    splits = _splits(y, groups, folds, seed)
    # the baseline reruns the whole procedure on shuffled labels, folds stratified on them; folds left with one
    # class (grouped folds, few positives) are not scored
    rng = np.random.default_rng(seed)
    shuffled = [y[rng.permutation(len(y))] for _ in range(permutations)]
    nulls = [(labels, [(a, b) for a, b in _folds(labels, groups, folds, seed) if len(np.unique(labels[b])) == 2])
             for labels in shuffled]
    x = features.to_numpy(float)
    from threadpoolctl import threadpool_limits  # with scikit-learn: imported when used, not with the package

    with threadpool_limits(1):  # thousands of tiny fits: BLAS threads only add overhead (10x here)
        rows = [{"component": "all", "layer": np.nan, **_row(x, y, splits, nulls), "mean_diff": np.nan}]
        for k, (component, layer) in enumerate(features.columns):
            diff = x[y == 1, k].mean() - x[y == 0, k].mean()
            rows.append({"component": component, "layer": layer, **_row(x[:, [k]], y, splits, nulls),
                         "mean_diff": diff})
    table = pd.DataFrame(rows).astype({"layer": "Int64"})
    best = table.iloc[1:]["auc"].idxmax()
    meta = {"target": target, "positive": positive,
            "stat": stat, "components": list(components), "folds": folds, "seed": seed, "permutations": permutations,
            "group_folds": group_folds, "n_records": len(y), "n_positive": int(y.sum()),
            "n_unlabelled": int(records["record_id"].nunique() - len(y)), "n_features": x.shape[1],
            "fold_positives": [int(y[test].sum()) for _, test in splits],
            "auc": float(table["auc"].iloc[0]), "perm_auc": float(table["perm_auc"].iloc[0]),
            "perm_auc_std": float(table["perm_auc_std"].iloc[0]),
            "top": {"layer": int(table.at[best, "layer"]), "component": table.at[best, "component"],
                    "auc": float(table.at[best, "auc"])}}
    return Prediction(table, meta)
