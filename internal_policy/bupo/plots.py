"""Figures of BuPO runs, drawn from tables only: Fig. 5 (internal-layer dynamics), Fig. 7 (actor
entropy), Fig. 6 (Pass@K vs K). Tables are the `EntropyTracker` table and `evaluate.pass_at_k_curve`.

As in `internal_policy.plot`: each function returns a `matplotlib.figure.Figure` (no pyplot, no global
state); write it with `plot.save_figure` (PNG + PDF). `spans` (BuPOTrainer.spans) mark where each
internal stage ends on the step axis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure


def _mark_stages(ax, spans: Sequence) -> None:
    for span in spans:
        ax.axvline(span.stop, color="grey", ls="--", lw=1)
        ax.text(span.stop, 1.0, f" π^{span.layer}", transform=ax.get_xaxis_transform(), fontsize=7, va="top",
                ha="right", color="grey")


def fig5_figure(track: pd.DataFrame, k: int, spans: Sequence = (), title: str = "") -> Figure:
    """Fig. 5 panels at layer k: (a) cos(H_k, H_l), (b) ΔH at layer k, (c) perplexity, (d) KL(π^k‖π^l), vs step.

    (a) and (d) are drawn against l with one line per step, as in the paper, when there are at least
    three later layers; otherwise against the step with one line per l. Rows of several seeds give ± sd.
    """
    at_k = track[(track["k"] == k) | (track["metric"] == "perplexity")]
    pick = lambda m: at_k[at_k["metric"] == m]  # noqa: E731
    fig = Figure(figsize=(15, 3.4), layout="constrained")
    axes = fig.subplots(1, 4)
    by_layer = pick("cos_k")["layer"].nunique() >= 3
    for ax, metric, label in ((axes[0], "cos_k", f"cos(H_{k}, H_l)"), (axes[3], "kl_k", f"KL(π^{k} ‖ π^l) (nats)")):
        data = pick(metric).assign(l=lambda t: "l = " + t["layer"].astype(str))
        if by_layer:
            sns.lineplot(data, x="layer", y="value", hue="step", palette="viridis", marker="o", errorbar=None, ax=ax)
            ax.set(xlabel="layer l", ylabel=label, xticks=sorted(data["layer"].unique()))
        else:
            sns.lineplot(data, x="step", y="value", hue="l", errorbar="sd", marker="o", ax=ax)
            ax.set(ylabel=label)
    sns.lineplot(pick("delta_k"), x="step", y="value", errorbar="sd", marker="o", ax=axes[1])
    axes[1].set(ylabel=f"ΔH layer {k} = H_{k} − H_{k - 1} (nats)")
    sns.lineplot(pick("perplexity"), x="step", y="value", errorbar="sd", marker="o", ax=axes[2])
    axes[2].set(ylabel="perplexity of π_θ (probe)")
    for ax, letter in zip(axes, "abcd"):
        ax.set_title(f"({letter})")
        if ax.get_xlabel() == "step":
            _mark_stages(ax, spans)
    fig.suptitle(title or f"internal layer k = {k}")
    return fig


def fig7_figure(tracks: pd.DataFrame, spans: Sequence = (),
                metrics: tuple[str, ...] = ("actor_entropy", "reward")) -> Figure:
    """Fig. 7: actor entropy (and reward) vs step, one line per `method` (mean ± sd over seeds)."""
    fig = Figure(figsize=(5 * len(metrics), 3.4), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        sns.lineplot(tracks[tracks["metric"] == metric], x="step", y="value", hue="method", errorbar="sd", ax=ax)
        _mark_stages(ax, spans)
        ax.set(ylabel=metric.replace("_", " "))
    return fig


def pass_at_k_figure(curves: Mapping[str, pd.DataFrame]) -> Figure:
    """Fig. 6: mean Pass@K over benchmarks against K (log axis), one line per model/method."""
    data = pd.concat([c.assign(model=name) for name, c in curves.items()], ignore_index=True)
    mean = data.groupby(["model", "k"], as_index=False)["pass_at_k"].mean()
    fig = Figure(figsize=(5, 3.5), layout="constrained")
    ax = fig.subplots()
    sns.lineplot(mean, x="k", y="pass_at_k", hue="model", marker="o", ax=ax)
    ax.set(xscale="log", xlabel="K", ylabel="mean Pass@K (%)", title="Pass@K (mean over benchmarks)")
    return fig
