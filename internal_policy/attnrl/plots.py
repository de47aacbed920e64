"""Figures of a branch-point run, drawn from `steps.parquet` only (conventions of `internal_policy.plot`:
`Figure` objects, no pyplot, the package's local seaborn style, PNG + PDF via `save_figure`).

- `record_figure`: one record's steps as horizontal FCI bars, top to bottom, each labelled with its
  text; the chosen branch points in a second colour with a marker, the candidates' bar
  (`select.threshold`, the one `select_attn` uses) dashed.
- `overview_figure`: every response step of every record, FCI against the step's relative position in
  its response, chosen points highlighted; and where the chosen points fall compared with all steps.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..errors import InputError
from ..plot import _colours, _glyphs, _style, save_figure
from .analysis import load_branch_points
from .select import threshold

LABEL_CHARS = 48


def step_label(step: int, text: str, limit: int = LABEL_CHARS) -> str:
    """`k: text` on one line: newlines as ↵, literal `$`, glyphs the font lacks as <hex>, cut to `limit` chars."""
    flat = re.sub(r"\s+", lambda m: "↵" if "\n" in m.group() else " ", text.strip())
    flat = flat if len(flat) <= limit else flat[: limit - 1] + "…"
    shown = "".join(c if c == "↵" or ord(c) in _glyphs() else f"<{ord(c):x}>" for c in flat).replace("$", r"\$")
    return f"{step}: {'[prompt] ' if step == 0 else ''}{shown}"


def record_figure(rows: pd.DataFrame, quantile: float | None = 0.8, max_steps: int = 80) -> Figure:
    """FCI bars of one record's steps (rows of steps.parquet for one `record_id`), first `max_steps` steps."""
    if rows.empty:
        raise InputError("no steps to plot")
    rows = rows.sort_values("step")
    shown = rows.iloc[:max_steps]
    colours = _colours(2)
    with _style():
        fig = Figure(figsize=(9, 1.4 + 0.22 * len(shown)), layout="constrained")
        ax = fig.add_subplot()
        y = np.arange(len(shown))
        colour = [colours[1] if s else colours[0] for s in shown["selected"]]
        ax.barh(y, shown["fci"], color=colour, height=0.75, gid="fci")
        chosen = shown[shown["selected"].to_numpy()]
        ax.scatter(chosen["fci"], y[shown["selected"].to_numpy()], marker="<", s=40, color=colours[1], zorder=3,
                   label="branch point (step resampled)", gid="selected")
        if quantile is not None:
            ax.axvline(threshold(rows["fci"].to_numpy(), quantile), ls="--", color="0.3", lw=1,
                       label=f"candidate bar ({quantile:g} quantile of response steps)", gid="threshold")
        ax.set_yticks(y, [step_label(int(k), t) for k, t in zip(shown["step"], shown["text"])], fontsize=7)
        ax.invert_yaxis()
        cut = f", first {len(shown)} of {len(rows)} steps" if len(rows) > len(shown) else ""
        ax.set(xlabel="FCI  y_k = max over layers, heads of attention from steps ≥ k+Δ", ylabel="step",
               title=f"Branch points of record '{rows['record_id'].iloc[0]}'{cut}")
        ax.set_xlim(left=0)
        ax.legend(loc="lower right", frameon=False, fontsize=7)
    return fig


def overview_figure(steps: pd.DataFrame) -> Figure:
    """All records: FCI against relative position in the response, and where the chosen points fall."""
    response = steps[steps["step"] > 0].copy()
    if response.empty:
        raise InputError("no response steps to plot")
    bounds = response.groupby("record_id")[["start", "end"]].agg({"start": "min", "end": "max"})
    first, last = response["record_id"].map(bounds["start"]), response["record_id"].map(bounds["end"])
    response["position"] = (response["start"] - first) / (last - first)
    chosen = response[response["selected"]]
    colours = _colours(2)
    n_records = response["record_id"].nunique()
    with _style():
        fig = Figure(figsize=(10, 3.6), layout="constrained")
        left, right = fig.subplots(1, 2)
        left.scatter(response["position"], response["fci"], s=9, color=colours[0], alpha=0.45, lw=0,
                     label="response step", gid="steps")
        left.scatter(chosen["position"], chosen["fci"], s=26, marker="<", color=colours[1],
                     label="branch point", gid="selected")
        left.set(xlabel="step start / response length", ylabel="FCI y_k", title="FCI along the response")
        bins = np.linspace(0, 1, 11)
        right.hist(response["position"], bins=bins, density=True, histtype="step", lw=1.6, color=colours[0],
                   label="all response steps", gid="hist:steps")
        right.hist(chosen["position"], bins=bins, density=True, histtype="stepfilled", alpha=0.35, color=colours[1],
                   label="branch points", gid="hist:selected")
        right.set(xlabel="step start / response length", ylabel="density", title="Where the branch points fall")
        fig.suptitle(f"Branch points over {n_records} records ({len(chosen)} points, {len(response)} response steps)")
        handles, labels = left.get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", frameon=False, ncols=2)
    return fig


def _file_name(record: str) -> str:
    """A record id as a file name (ids like 'q3/0' from --generate hold slashes)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", record) or "record"


def plot_branch_points(run_dir: str | Path, out_dir: str | Path | None = None, max_records: int | None = 50,
                       records: Sequence[str] | None = None) -> list[Path]:
    """Write overview.{png,pdf} and records/<id>.{png,pdf} (first `max_records` records, or `records`)."""
    run = load_branch_points(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "figures"
    paths = save_figure(overview_figure(run.steps), out, "overview")
    ids = list(records) if records is not None else list(dict.fromkeys(run.steps["record_id"]))[:max_records]
    quantile = run.meta.get("quantile", 0.8)
    for record in ids:
        rows = run.steps[run.steps["record_id"] == record]
        if rows.empty:
            raise InputError(f"record '{record}' is not in {run_dir}")
        paths += save_figure(record_figure(rows, quantile), out / "records", _file_name(record))
    return paths
