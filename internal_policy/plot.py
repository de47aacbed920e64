"""Paper-style figures from a profile run's tables: Fig. 2 (entropy flow), Fig. 3 (ΔH per module,
with the EIC stages), Fig. 12 (residual cosines), a token × layer heatmap, the classic logit-lens
grid (top-1 decoded token per layer and position), a model comparison and a layers × heads
heatmap of the `attn_head` rows. The flow, heatmap,
lens, comparison and heads figures show any statistic of the run (`stat`, default entropy).

A run profiled with `--group-by FIELD` draws its flow and delta figures with one curve per value of the
field (e.g. `correct` = 0 / 1), each with its 95 % confidence band over tokens; the other figures
show the overall profile. A figure never recomputes entropies: it reads the summary / tokens tables of a run folder
(``summary.csv``, ``tokens.parquet``, ``run.json``, ``stages.json``). Figures are built with
``matplotlib.figure.Figure`` (no pyplot, so no global state and no GUI backend; PNG/PDF are written
by Agg), styled inside a local seaborn context: "whitegrid", DejaVu Sans, the colour-blind palette.
Layers are numbered as in the paper: 1..L, 0 = the embedding output.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from .errors import InputError
from .runs import ProfileResult, load_run
from .stages import Stages, run_stages
from .stats import by_name

KINDS = ("flow", "delta", "cosine", "heatmap", "lens", "compare", "heads")
LAYER_AXIS = "layer (1..L; 0 = embedding)"
DEPTH_AXIS = "normalised depth (layer / L)"
FONT = "DejaVu Sans"
PALETTE = "colorblind"
STAGE_COLOURS = {"exploration": 1, "integration": 7, "convergence": 2}
"""Index into the colour-blind palette for each EIC stage's shading (orange, grey, green)."""
QUANTITY = {
    ("layer", "entropy"): "entropy of H_l (nats)",
    ("attn", "delta"): "ΔH_ATTN (nats)",
    ("ffn", "delta"): "ΔH_FFN (nats)",
    ("attn", "cos_resid"): "cos(A_l, H_{l-1})",
    ("ffn", "cos_resid"): "cos(F_l, H_{l-1} + A_l)",
}
"""Axis label of each plotted (component, summary column); other statistics use their own label."""
WHAT = {"layer": "H_l", "attn": "A_l", "ffn": "F_l", "attn_in": "attn_in", "ffn_in": "ffn_in", "resid_mid": "resid_mid",
        "attn_head": "each head's write"}


def quantity(component: str, column: str) -> str:
    """Axis label of a plotted (component, column)."""
    return QUANTITY.get((component, column)) or f"{by_name(column).label} of {WHAT[component]}"


def decoding(final_norm: bool | None) -> str:
    """How a run decoded, for figure titles."""
    return "final norm: logit lens" if final_norm else "raw decoding"


def _model_label(meta: Mapping, run_dir: str | Path) -> str:
    """A run's label in figures: the last part of its model name, else the run folder's name."""
    return Path(str(meta.get("model") or Path(run_dir).name)).name


@dataclass(frozen=True)
class Run:
    """One profile run as the figures see it: its summary table plus what labels and marks need."""

    summary: pd.DataFrame
    label: str = "model"
    vocab_size: int | None = None
    stages: Stages | None = None
    tokens_path: Path | None = None
    final_norm: bool = False
    groups: pd.DataFrame | None = None
    group_by: str | None = None

    @property
    def n_layers(self) -> int:
        """L (the largest layer number in the summary)."""
        return int(self.summary["layer"].max())

    @classmethod
    def from_dir(cls, run_dir: str | Path, result: ProfileResult | None = None) -> Run:
        """A run folder as the figures see it (stages.json used if it matches, never written; tokens read lazily);
        `result`: the folder's `load_run`, where the caller has read it already."""
        result = result if result is not None else load_run(run_dir)
        has_ffn = bool((result.summary["component"] == "ffn").any())
        return cls(
            summary=result.summary,
            label=_model_label(result.meta, run_dir),
            vocab_size=result.meta.get("vocab_size"),
            stages=run_stages(run_dir) if has_ffn else None,
            tokens_path=result.tokens_path,
            final_norm=bool(result.meta.get("final_norm", False)),
            groups=result.groups,
            group_by=result.meta.get("group_by"),
        )

    def by_group(self) -> list[Run]:
        """One run per value of the `--group-by` field (label "model: field=value"), or [self] without groups."""
        if self.groups is None:
            return [self]
        return [replace(self, summary=rows.drop(columns="group").reset_index(drop=True), stages=None, groups=None,
                        label=f"{self.label}: {self.group_by or 'group'}={value}")
                for value, rows in self.groups.groupby("group", sort=False)]

    def tokens(self) -> pd.DataFrame:
        """The per-token table (tokens.parquet), read on demand: it can be large."""
        if self.tokens_path is None or not self.tokens_path.is_file():
            raise InputError(f"run '{self.label}' has no tokens.parquet; re-run profile without --no-tokens")
        return pd.read_parquet(self.tokens_path)


def _as_runs(runs: Run | pd.DataFrame | Sequence[Run | pd.DataFrame]) -> list[Run]:
    """Accept one run, one summary table, or a sequence of either."""
    items = [runs] if isinstance(runs, (Run, pd.DataFrame)) else list(runs)
    if not items:
        raise InputError("no runs to plot")
    return [r if isinstance(r, Run) else Run(summary=r, label=f"run {i + 1}") for i, r in enumerate(items)]


def series(summary: pd.DataFrame, component: str, column: str) -> pd.Series:
    """One summary column for one component, indexed by layer (the values a figure plots)."""
    rows = summary.loc[summary["component"] == component]
    if rows.empty or column not in summary.columns:
        raise InputError(f"summary has no '{column}' for component '{component}'; profile with that component")
    return rows.set_index("layer")[column].sort_index().astype(float)


def band(summary: pd.DataFrame, component: str, column: str, kind: str = "ci") -> pd.Series:
    """Half-width of the band around a mean: "ci" = 95 % CI of the mean over tokens (1.96·sd/√n), "std" = sd."""
    if kind not in ("ci", "std"):
        raise InputError(f"band must be 'ci' or 'std', got {kind!r}")
    std = series(summary, component, f"{column}_std")
    if kind == "std":
        return std
    return 1.96 * std / np.sqrt(series(summary, component, "n_tokens"))


@contextmanager
def _style() -> Iterator[None]:
    """Local seaborn/matplotlib style: nothing leaks into the caller's rcParams."""
    with mpl.rc_context({"font.family": FONT}), sns.axes_style("whitegrid"), sns.plotting_context("notebook", 0.85):
        yield


def _colours(n: int) -> list:
    return sns.color_palette(PALETTE, max(n, 1))


def _layer_ticks(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))


def _legend(fig: Figure, axes, extra: Sequence = ()) -> None:
    """One legend for the figure, below the axes (clear of titles and data), without duplicate labels."""
    handles: dict[str, object] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    for h in extra:
        handles.setdefault(h.get_label(), h)
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center", frameon=False,
                   ncols=min(len(handles), 3))


def flow_figure(runs: Run | pd.DataFrame | Sequence[Run | pd.DataFrame], stat: str = "entropy",
                band_kind: str | None = None) -> Figure:
    """Fig. 2: H(H_{l-1}), H(A_l), H(F_l), H(H_l) for every layer, one connected line per model.

    Each line has 3L + 1 points: H_0 at x = 0, then A_l, F_l, H_l at x = l - 2/3, l - 1/3, l
    (H_{l-1} of layer l is the H_l point of layer l - 1). ln|V| is drawn where the vocabulary is known
    and the statistic is an entropy. `stat` plots another statistic of the run the same way.
    `band_kind` ("ci" or "std", see `band`) shades a band around each line (used for groups).
    """
    runs = _as_runs(runs)
    entropy_like = by_name(stat).log_vocab_bound
    markers = {"layer": ("o", "layer output H_l"), "attn": ("^", "attention A_l"), "ffn": ("s", "FFN F_l")}
    with _style():
        fig = Figure(figsize=(8.5, 4.2), layout="constrained")
        ax = fig.add_subplot()
        for run, colour in zip(runs, _colours(len(runs))):
            h, a, f = (series(run.summary, c, stat) for c in ("layer", "attn", "ffn"))
            layers = np.arange(1, run.n_layers + 1)
            x = np.r_[0.0, np.column_stack([layers - 2 / 3, layers - 1 / 3, layers]).ravel()]
            y = np.r_[h[0], np.column_stack([a[layers], f[layers], h[layers]]).ravel()]
            ax.plot(x, y, color=colour, lw=1.4, label=run.label, gid=f"flow:{run.label}")
            if band_kind is not None:
                hw, aw, fw = (band(run.summary, c, stat, band_kind) for c in ("layer", "attn", "ffn"))
                half = np.r_[hw[0], np.column_stack([aw[layers], fw[layers], hw[layers]]).ravel()]
                ax.fill_between(x, y - half, y + half, color=colour, alpha=0.2, lw=0, gid=f"band:flow:{run.label}")
            for k, comp in enumerate(("layer", "attn", "ffn")):
                pts = slice(0, None, 3) if comp == "layer" else slice(k, None, 3)
                ax.scatter(x[pts], y[pts], marker=markers[comp][0], s=22, color=colour, zorder=3)
        vocabs = sorted({r.vocab_size for r in runs if r.vocab_size}) if entropy_like else []
        for v, colour in zip(vocabs, ("0.35", "0.6", "0.8")):
            ax.axhline(np.log(v), ls=":", color=colour, lw=1.2, label=f"ln|V| = {np.log(v):.2f} (|V| = {v:,})")
        modes = sorted({decoding(r.final_norm) for r in runs})
        title = f"{stat.capitalize() if stat == 'entropy' else stat} flow through the layers ({' / '.join(modes)})"
        if band_kind is not None:
            title += "\nbands: " + ("95 % CI of the mean over tokens" if band_kind == "ci" else "± 1 std over tokens")
        ax.set(xlabel=LAYER_AXIS, ylabel=by_name(stat).label, title=title)
        if entropy_like:
            ax.set_ylim(bottom=0)
        _layer_ticks(ax)
        keys = [Line2D([], [], ls="", marker=m, color="0.3", label=lab) for m, lab in markers.values()]
        _legend(fig, [ax], keys)
    return fig


def _shade_stages(ax, stages: Stages, label: bool) -> None:
    """Shade each EIC stage from first - 0.5 to last + 0.5 (gid "stage:<name>")."""
    palette = _colours(10)
    for name, (first, last) in stages.spans().items():
        ax.axvspan(first - 0.5, last + 0.5, color=palette[STAGE_COLOURS[name]], alpha=0.14, lw=0,
                   gid=f"stage:{name}", label=f"{name} stage" if label else None)


BOUNDARY_STYLE = dict(ls=(0, (1, 1.5)), lw=1.6)


def _mark_boundary(ax, stages: Stages | None, label: str, colour) -> None:
    """Dotted vertical line at the boundary layer (gid "boundary:<label>"); its number goes in legend or title."""
    if stages and stages.boundary_layer is not None:
        ax.axvline(stages.boundary_layer, color=colour, gid=f"boundary:{label}", **BOUNDARY_STYLE)


def _boundary_key(runs: list[Run]) -> list[Line2D]:
    """Legend entry for the boundary lines: with its layer number for one run, colour = model for several."""
    ks = [r.stages.boundary_layer for r in runs if r.stages and r.stages.boundary_layer is not None]
    if not ks:
        return []
    text = f"boundary layer {ks[0]} (BuPO)" if len(runs) == 1 else "boundary layer (BuPO; colour = model)"
    return [Line2D([], [], color="0.3", label=text, **BOUNDARY_STYLE)]


def _panels(runs: list[Run], quantities: Sequence[tuple[str, str]], title: str, band_kind: str) -> Figure:
    """Stacked per-layer panels (one per quantity), mean line ± band per run, stages and boundary marked."""
    shade = runs[0].stages if len(runs) == 1 else None
    with _style():
        fig = Figure(figsize=(8.5, 2.4 * len(quantities) + 0.6), layout="constrained")
        axes = fig.subplots(len(quantities), 1, sharex=True, squeeze=False)[:, 0]
        for i, (ax, (comp, column)) in enumerate(zip(axes, quantities)):
            if shade:
                _shade_stages(ax, shade, label=i == 0)
            ax.axhline(0, ls="--", color="0.25", lw=0.9, gid="zero")
            for run, colour in zip(runs, _colours(len(runs))):
                mean, half = series(run.summary, comp, column), band(run.summary, comp, column, band_kind)
                ax.plot(mean.index, mean.to_numpy(), marker="o", ms=3.5, color=colour, label=run.label,
                        gid=f"{comp}:{run.label}")
                ax.fill_between(mean.index, mean - half, mean + half, color=colour, alpha=0.22, lw=0,
                                gid=f"band:{comp}:{run.label}")
                _mark_boundary(ax, run.stages, run.label, colour)
            ax.set_ylabel(quantity(comp, column))
            _layer_ticks(ax)
        axes[-1].set_xlabel(LAYER_AXIS)
        what = "95 % CI of the mean over tokens" if band_kind == "ci" else "± 1 std over tokens"
        fig.suptitle(f"{title} (bands: {what})")
        _legend(fig, axes, _boundary_key(runs))
    return fig


def delta_figure(runs: Run | pd.DataFrame | Sequence[Run | pd.DataFrame], band_kind: str = "ci") -> Figure:
    """Fig. 3: mean ΔH_ATTN (top) and ΔH_FFN (bottom) per layer; EIC stages shaded for a single run."""
    return _panels(_as_runs(runs), [("attn", "delta"), ("ffn", "delta")], "Entropy change per module", band_kind)


def cosine_figure(runs: Run | pd.DataFrame | Sequence[Run | pd.DataFrame], band_kind: str = "ci") -> Figure:
    """Fig. 12: cos(A_l, H_{l-1}) (top) and cos(F_l, H_{l-1}+A_l) (bottom) per layer."""
    return _panels(_as_runs(runs), [("attn", "cos_resid"), ("ffn", "cos_resid")],
                   "Residual cosine similarity of the module writes", band_kind)


def compare_figure(
    runs: Run | pd.DataFrame | Sequence[Run | pd.DataFrame],
    quantities: Sequence[tuple[str, str]] | None = None,
    stat: str = "entropy",
) -> Figure:
    """Several runs on shared axes: each quantity against absolute layer (left) and layer / L (right).

    Default quantities: the layer entropy and ΔH_FFN; with another `stat`, that statistic of H_l."""
    runs = _as_runs(runs)
    if quantities is None:
        quantities = (("layer", "entropy"), ("ffn", "delta")) if stat == "entropy" else (("layer", stat),)
    with _style():
        fig = Figure(figsize=(10, 2.6 * len(quantities) + 0.6), layout="constrained")
        grid = fig.subplots(len(quantities), 2, sharex="col", squeeze=False)
        for row, (comp, column) in zip(grid, quantities):
            for ax, normalise in zip(row, (False, True)):
                if column in ("delta", "cos_resid"):
                    ax.axhline(0, ls="--", color="0.25", lw=0.9, gid="zero")
                for run, colour in zip(runs, _colours(len(runs))):
                    s = series(run.summary, comp, column)
                    x = s.index / run.n_layers if normalise else s.index
                    ax.plot(x, s.to_numpy(), marker="o", ms=3, color=colour, label=run.label,
                            gid=f"{'depth' if normalise else 'layer'}:{comp}:{column}:{run.label}")
                ax.set_ylabel(quantity(comp, column))
                if not normalise:
                    _layer_ticks(ax)
        grid[-1, 0].set_xlabel(LAYER_AXIS)
        grid[-1, 1].set_xlabel(DEPTH_AXIS)
        fig.suptitle("Model comparison: absolute layer (left) and normalised depth (right)")
        _legend(fig, grid.ravel())
    return fig


def stages_figure(curves: Mapping[str, Stages], ncols: int = 2) -> Figure:
    """ΔH_FFN curves with their EIC segmentation: ≈ 0 tolerance band, shaded stages, boundary layer.

    One panel per named :class:`Stages` (e.g. several models, or hand-made curves), to check the rule.
    """
    if not curves:
        raise InputError("no stage segmentations to plot")
    nrows = -(-len(curves) // ncols)
    with _style():
        fig = Figure(figsize=(4.6 * ncols, 2.7 * nrows + 0.7), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        colour = _colours(1)[0]
        for ax, (name, st) in zip(axes, curves.items()):
            _shade_stages(ax, st, label=True)
            layers = np.arange(1, st.n_layers + 1)
            ax.axhspan(-st.tolerance, st.tolerance, color="0.5", alpha=0.25, lw=0, gid="tolerance",
                       label="≈ 0 band (± tolerance)")
            ax.axhline(0, ls="--", color="0.25", lw=0.9, gid="zero")
            ax.plot(layers, st.delta_ffn, marker="o", ms=3.5, color=colour, label="ΔH_FFN", gid=f"ffn:{name}")
            _mark_boundary(ax, st, name, "0.2")
            k = st.boundary_layer
            ax.set(title=f"{name}: boundary {k if k is not None else 'none'}", ylabel="ΔH_FFN (nats)",
                   xlabel=LAYER_AXIS)
            _layer_ticks(ax)
        for ax in axes[len(curves):]:
            ax.set_axis_off()
        fig.suptitle("EIC stages of ΔH_FFN and the BuPO boundary layer")
        key = [Line2D([], [], color="0.2", label="boundary layer (BuPO)", **BOUNDARY_STYLE)]
        _legend(fig, axes[: len(curves)], key)
    return fig


@cache
def _glyphs() -> frozenset[int]:
    """Code points DejaVu Sans can draw (tokens outside it are shown as <hex>)."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(font_manager.findfont(FONT)).get_charmap())


def token_label(text: str) -> str:
    """A token as a tick label: visible whitespace, literal '$' (no mathtext), <hex> for glyphs the font lacks."""
    if text == "":
        return "∅"
    shown = {" ": "␣", "\n": "↵", "\t": "⇥", "$": r"\$"}
    return "".join(shown.get(c, c if ord(c) in _glyphs() else f"<{ord(c):x}>") for c in text)


def _record_grid(tokens: pd.DataFrame, record_id: str | None, component: str, stat: str, max_positions: int,
                 label: str | None) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series, str]:
    """(rows of one record and component, layer × position grid of `stat`, input token per position,
    the title's "(model, record, component, cut)" part)."""
    if record_id is None:
        record_id = str(tokens["record_id"].iloc[0])
    if stat not in tokens.columns:
        raise InputError(f"tokens.parquet has no '{stat}' column; profile with --stats {stat}")
    rows = tokens.loc[(tokens["record_id"] == record_id) & (tokens["component"] == component)]
    if rows.empty:
        known = ", ".join(map(str, tokens["record_id"].unique()[:8]))
        raise InputError(f"no '{component}' rows for record '{record_id}' in tokens.parquet (records: {known} ...)")
    grid = rows.pivot(index="layer", columns="position", values=stat).sort_index(ascending=False)
    words = rows.drop_duplicates("position").set_index("position")["token"].astype(str)
    cut = f", first {max_positions} of {grid.shape[1]} positions" if grid.shape[1] > max_positions else ""
    who = f"{label}, " if label else ""
    return rows, grid.iloc[:, :max_positions], words, f"({who}record '{record_id}', component '{component}'{cut})"


def colour_range(stat: str, vocab_size: int | None) -> tuple[float | None, float | None]:
    """Fixed colour limits where the statistic has them: 0..ln|V| for entropies, its own range otherwise."""
    statistic = by_name(stat)
    if statistic.log_vocab_bound:
        return 0, np.log(vocab_size) if vocab_size else None
    return statistic.value_range or (None, None)


def _grid_figure(grid: pd.DataFrame, words: pd.Series, stat: str, vocab_size: int | None, title: str,
                 cell: str, annot: pd.DataFrame | None = None, cell_width: float = 0.17) -> Figure:
    """A layer × position heatmap of one record, input tokens as tick labels, optional text in the cells."""
    vmin, vmax = colour_range(stat, vocab_size)
    with _style():
        fig = Figure(figsize=(min(2.5 + cell_width * grid.shape[1], 30), 1.9 + 0.24 * len(grid)), layout="constrained")
        ax = fig.add_subplot()
        sns.heatmap(grid, ax=ax, cmap="viridis", vmin=vmin, vmax=vmax, linewidths=0,
                    cbar_kws={"label": by_name(stat).label, "pad": 0.01},
                    annot=annot if annot is not None else False, fmt="", annot_kws={"fontsize": 6})
        ax.set_xticks(np.arange(grid.shape[1]) + 0.5, [token_label(words[p]) for p in grid.columns], rotation=90,
                      fontsize=7)
        ax.set_yticks(np.arange(len(grid)) + 0.5, [str(layer) for layer in grid.index], rotation=0)
        ax.set(xlabel=f"token at position (cell: {cell})", ylabel=LAYER_AXIS, title=title)
    return fig


def heatmap_figure(
    tokens: pd.DataFrame,
    record_id: str | None = None,
    component: str = "layer",
    max_positions: int = 80,
    vocab_size: int | None = None,
    label: str | None = None,
    stat: str = "entropy",
) -> Figure:
    """`stat` (default entropy) per (layer, position) of one record, tokens as tick labels (first `max_positions`).

    Column = the token at that position; the cell is the statistic of the policy predicting the next token.
    """
    _, grid, words, where = _record_grid(tokens, record_id, component, stat, max_positions, label)
    title = f"{'Entropy' if stat == 'entropy' else stat} per token and layer {where}"
    return _grid_figure(grid, words, stat, vocab_size, title, f"{stat} of the next-token prediction")


def lens_figure(
    tokens: pd.DataFrame,
    record_id: str | None = None,
    component: str = "layer",
    max_positions: int = 40,
    vocab_size: int | None = None,
    label: str | None = None,
    stat: str = "entropy",
) -> Figure:
    """The classic logit-lens grid of one record: layers down, positions across, each cell the top-1 decoded
    token of that site (needs a run profiled with `--topk K`, K ≥ 1), coloured by `stat`."""
    if "topk_tokens" not in tokens.columns:
        raise InputError("this run stored no top-k tokens; profile with --topk 1 (or more) to draw the lens figure")
    rows, grid, words, where = _record_grid(tokens, record_id, component, stat, max_positions, label)
    top1 = rows.assign(top1=[token_label(str(t[0])) for t in rows["topk_tokens"]])
    annot = top1.pivot(index="layer", columns="position", values="top1").loc[grid.index, grid.columns]
    return _grid_figure(grid, words, stat, vocab_size, f"Logit lens: top-1 decoded token per layer {where}",
                        f"top-1 next token, colour: {stat}", annot, cell_width=0.55)


def heads_figure(run: Run | pd.DataFrame, stat: str = "entropy") -> Figure:
    """`stat` (default entropy) of each head's write: layers across, heads down, EIC stages in a strip above.

    Reads the `attn_head` rows of the summary (mean over tokens per layer and head). The colours span
    the grid's own range (single heads' writes are small, so their entropies often sit just below ln|V|:
    a 0..ln|V| scale would hide their differences); the colour bar says where ln|V| is. The stages (and
    the boundary line) come from the run's ΔH_FFN, so they are drawn only when the run has `ffn` rows.
    """
    run = _as_runs(run)[0]
    rows = run.summary.loc[run.summary["component"] == "attn_head"]
    if rows.empty or stat not in rows.columns:
        raise InputError(f"run '{run.label}' has no '{stat}' for attention heads; profile with --components "
                         f"...,attn_head{'' if stat == 'entropy' else f' --stats {stat}'}")
    grid = rows.pivot(index="head", columns="layer", values=stat).sort_index().astype(float)
    layers, heads = grid.columns.to_numpy(dtype=int), grid.index.to_numpy(dtype=int)
    bar = by_name(stat).label
    if by_name(stat).log_vocab_bound and run.vocab_size:
        bar += f"; ln|V| = {np.log(run.vocab_size):.3f}"
    with _style():
        fig = Figure(figsize=(min(3 + 0.45 * len(layers), 20), 2.4 + 0.22 * len(heads)), layout="constrained")
        strip, ax = fig.subplots(2, 1, sharex=True, height_ratios=(1, max(len(heads), 4) / 1.5))
        mesh = ax.pcolormesh(np.r_[layers - 0.5, layers[-1] + 0.5], np.r_[heads - 0.5, heads[-1] + 0.5],
                             grid.to_numpy(), cmap="viridis", gid="heads:grid")
        fig.colorbar(mesh, ax=[strip, ax], label=bar, pad=0.01)
        ax.invert_yaxis()
        ax.set(xlabel=LAYER_AXIS, ylabel="head (0-based)")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        _layer_ticks(ax)
        strip.set_yticks([])
        strip.grid(False)
        if run.stages is not None:
            _shade_stages(strip, run.stages, label=False)
            for name, (first, last) in run.stages.spans().items():
                strip.text((first + last) / 2, 0.5, name, ha="center", va="center", fontsize=7,
                           transform=strip.get_xaxis_transform())
            _mark_boundary(ax, run.stages, run.label, "white")
        k = run.stages.boundary_layer if run.stages is not None else None
        strip.set_title("EIC stages: none (no ffn rows)" if run.stages is None else "EIC stages (from ΔH_FFN)"
                        + (f"; dotted line: boundary layer {k} (BuPO)" if k is not None else ""), fontsize=8)
        what = "Entropy" if stat == "entropy" else stat
        fig.suptitle(f"{what} of each attention head's write, mean over tokens\n"
                     f"({run.label}, {decoding(run.final_norm)})")
    return fig


def save_figure(
    fig: Figure, out_dir: str | Path, name: str, dpi: int = 150, formats: Sequence[str] = ("png", "pdf")
) -> list[Path]:
    """Write `fig` as OUT_DIR/NAME.png (dpi 150) and OUT_DIR/NAME.pdf by default; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.{ext}" for ext in formats]
    for path in paths:
        fig.savefig(path, dpi=dpi)
    return paths


_NEEDS = {"flow": {"layer", "attn", "ffn"}, "delta": {"attn", "ffn"}, "cosine": {"attn", "ffn"},
          "compare": {"layer", "ffn"}, "heads": {"attn_head"}}


def drawable(kind: str, runs: list[Run]) -> bool:
    """Whether every run has what figure `kind` reads (used to skip figures under kind "all")."""
    if kind in ("heatmap", "lens"):
        import pyarrow.parquet as pq

        def has_tokens(r: Run) -> bool:
            return (r.tokens_path is not None and r.tokens_path.is_file() and "layer" in set(r.summary["component"])
                    and (kind == "heatmap" or "topk_tokens" in pq.read_schema(r.tokens_path).names))

        return all(has_tokens(r) for r in runs)
    return all(_NEEDS[kind] <= set(r.summary["component"]) for r in runs)


def unique_labels(runs: list[Run], dirs: list[Path]) -> list[Run]:
    """Add the folder name to labels that several runs share (e.g. one model on two datasets)."""
    labels = [r.label for r in runs]
    return [replace(r, label=f"{r.label} ({d.name})") if labels.count(r.label) > 1 else r for r, d in zip(runs, dirs)]


def figures(runs: Sequence[Run], kinds: Sequence[str] = ("all",), record_id: str | None = None,
            stat: str = "entropy") -> Iterator[tuple[str, Figure]]:
    """(name, figure) for each wanted kind, in KINDS order: one shared figure for flow, delta, cosine and
    compare, one per run for heatmap, lens and heads (named "heatmap-2" ... with several runs).

    "all" = every kind the runs' tables support (compare only with several runs); a kind named
    explicitly is drawn or raises. `stat` is the statistic of the flow, heatmap, lens, compare and heads
    figures. Runs profiled with `--group-by` draw one flow / delta curve per group, with 95 % CI bands.
    """
    runs = list(runs)
    unknown = set(kinds) - set(KINDS) - {"all"}
    if unknown:
        raise InputError(f"unknown figure kind(s) {sorted(unknown)}; choose from {', '.join(KINDS)}, all")
    curves = [g for r in runs for g in r.by_group()]  # flow and delta: one curve per group where there are groups
    grouped = len(curves) > len(runs)
    auto = {k for k in KINDS if (k != "compare" or len(runs) > 1) and drawable(k, runs)} if "all" in kinds else set()
    whole = {"flow": lambda: flow_figure(curves, stat=stat, band_kind="ci" if grouped else None),
             "delta": lambda: delta_figure(curves), "cosine": lambda: cosine_figure(runs),
             "compare": lambda: compare_figure(runs, stat=stat)}
    per_run = {"heatmap": heatmap_figure, "lens": lens_figure}
    tables: dict[int, pd.DataFrame] = {}  # each run's tokens.parquet, read once for the heatmap and the lens
    for kind in (k for k in KINDS if k in kinds or k in auto):
        if kind in whole:
            yield kind, whole[kind]()
            continue
        for i, run in enumerate(runs):
            if kind != "heads" and i not in tables:
                tables[i] = run.tokens()
            fig = (heads_figure(run, stat=stat) if kind == "heads" else
                   per_run[kind](tables[i], record_id, vocab_size=run.vocab_size, label=run.label, stat=stat))
            yield (kind if len(runs) == 1 else f"{kind}-{i + 1}"), fig


def plot_runs(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path | None = None,
    kinds: Sequence[str] = ("all",),
    record_id: str | None = None,
    stat: str = "entropy",
) -> list[Path]:
    """Draw figures for one or more run folders into OUT_DIR (default RUN_DIR/figures for one run).

    "all" = flow, delta, cosine, heatmap, lens and heads (one per run), plus compare when there are
    several runs; figures a run's tables cannot support (no tokens.parquet, no `layer` rows, no top-k
    tokens, no `attn_head` rows) are skipped under "all". `stat` is the statistic of the flow, heatmap,
    lens, compare and heads figures. Runs profiled with `--group-by` draw one flow / delta curve per group,
    with 95 % CI bands.
    The run folders are only read (stages.json is used, never written). Returns the PNG and PDF paths.
    """
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise InputError("give at least one RUN_DIR")
    if out_dir is None and len(dirs) > 1:
        raise InputError("several runs: pass --out DIR for the shared figures")
    out = Path(out_dir) if out_dir is not None else dirs[0] / "figures"
    runs = unique_labels([Run.from_dir(d) for d in dirs], dirs)
    return [path for name, fig in figures(runs, kinds, record_id, stat) for path in save_figure(fig, out, name)]


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, kinds: Sequence[str] = ("all",)) -> list[Path]:
    """Figures of one profile run (default into RUN_DIR/figures)."""
    return plot_runs([run_dir], out_dir, kinds)



# --- Module ablation (`internal_policy.ablate`): the `ablation` figure -------------------------------------------

ABLATION_BARS = {"attn": ("attention A_l", 0), "ffn": ("FFN F_l", 3)}
"""Bar label and colour-blind palette index of each ablated component."""


def ablation_figure(table: pd.DataFrame, profile: Run | None = None, label: str = "model") -> Figure:
    """Δ NLL (top) and Δ output entropy (middle) per layer when A_l or F_l is ablated, bars side by side (± 1 se);
    with a `profile` run of the same records, its ΔH_ATTN / ΔH_FFN (bottom) and EIC stages shaded on every panel.

    Bars have gid "<component>:<layer>" (Δ NLL) and "entropy:<component>:<layer>"; per-head rows are not drawn.
    """
    rows = table[table["component"].isin(list(ABLATION_BARS))]
    if rows.empty:
        raise InputError("the ablation table has no attn or ffn rows; ablate with --components attn,ffn")
    panels = [("delta_nll", "Δ NLL of the next token (nats)", ""),
              ("delta_entropy", "Δ output entropy (nats)", "entropy:")]
    stages = profile.stages if profile is not None else None
    with _style():
        fig = Figure(figsize=(8.5, 2.5 * (len(panels) + (profile is not None)) + 0.7), layout="constrained")
        axes = fig.subplots(len(panels) + (profile is not None), 1, sharex=True, squeeze=False)[:, 0]
        palette = _colours(10)
        for i, ax in enumerate(axes):
            if stages is not None:
                _shade_stages(ax, stages, label=i == 0)
                _mark_boundary(ax, stages, label, "0.3")
            ax.axhline(0, ls="--", color="0.25", lw=0.9, gid="zero")
            _layer_ticks(ax)
        for ax, (column, ylabel, prefix) in zip(axes, panels):
            for k, (comp, (name, colour)) in enumerate(ABLATION_BARS.items()):
                part = rows[rows["component"] == comp]
                x = part["layer"].to_numpy() + (k - 0.5) * 0.38
                bars = ax.bar(x, part[column], width=0.38, color=palette[colour], label=f"ablate {name}",
                              yerr=part[f"{column}_se"], error_kw=dict(lw=0.8, capsize=2))
                for bar, layer in zip(bars.patches, part["layer"]):
                    bar.set_gid(f"{prefix}{comp}:{layer}")
            ax.set_ylabel(ylabel)
        if profile is not None:
            ax = axes[-1]
            for comp, (_, colour) in ABLATION_BARS.items():
                mean, half = series(profile.summary, comp, "delta"), band(profile.summary, comp, "delta")
                ax.plot(mean.index, mean.to_numpy(), marker="o", ms=3.5, color=palette[colour], gid=f"profile:{comp}",
                        label=f"{quantity(comp, 'delta').removesuffix(' (nats)')} (profile)")
                ax.fill_between(mean.index, mean - half, mean + half, color=palette[colour], alpha=0.22, lw=0)
            ax.set_ylabel("ΔH of the module (nats)")
        axes[-1].set_xlabel(LAYER_AXIS)
        mode = table.attrs.get("meta", {}).get("mode", "zero")
        fig.suptitle(f"{label}: {mode}-ablation of each module (bars: ± 1 se over tokens)")
        _legend(fig, axes, _boundary_key([replace(profile, label=label)]) if profile is not None else ())
    return fig


def plot_ablation(run_dir: str | Path, profile_dir: str | Path | None = None,
                  out_dir: str | Path | None = None) -> list[Path]:
    """The `ablation` figure of an ablation run (default into RUN_DIR/figures), aligned with a profile run of the
    same records and weights when `profile_dir` is given (anything else is refused); returns the PNG and PDF paths."""
    from .ablate import load_ablation

    table = load_ablation(run_dir)
    meta = table.attrs["meta"]
    profile = None
    if profile_dir is not None:
        theirs = load_run(profile_dir)
        differ = [what for what, key in (("records", "records_sha256"), ("weights", "weights_sha256"))
                  if theirs.meta.get(key) != meta.get(key)]
        if differ:
            raise InputError(f"--profile {profile_dir} is not a profile of the same records and model as {run_dir} "
                             f"({' and '.join(differ)} differ); profile the same --input with the same --model")
        profile = Run.from_dir(profile_dir, theirs)
    label = _model_label(meta, run_dir)
    fig = ablation_figure(table, profile, label)
    return save_figure(fig, Path(out_dir) if out_dir is not None else Path(run_dir) / "figures", "ablation")


__all__ = [
    "KINDS", "Run", "ablation_figure", "band", "compare_figure", "cosine_figure", "delta_figure", "figures",
    "flow_figure", "heads_figure", "heatmap_figure", "lens_figure", "plot_ablation", "plot_run", "plot_runs",
    "save_figure", "series", "stages_figure", "token_label",
]
