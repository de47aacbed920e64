"""Figures of BuPO runs, drawn from tables only: Fig. 5 (internal-layer dynamics), Fig. 7 (actor
entropy), Fig. 6 (Pass@K vs K). Tables are the `EntropyTracker` table and `evaluate.pass_at_k_curve`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    return plt, sns


def plot_fig5(track: pd.DataFrame, path: str | Path, title: str = "", internal_steps: int | None = None) -> None:
    """Fig. 5 panels: (a) cos(H_k, H_l), (b) ΔH at layer k vs step, (c) perplexity vs step, (d) KL(π^k‖π^l).

    (a) and (d) are drawn against l with one line per step, as in the paper, when there are at least three
    later layers; otherwise against the step with one line per l. Rows of several seeds give ± sd bands.
    """
    plt, sns = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    pick = lambda m: track[track["metric"] == m]  # noqa: E731
    k = int(pick("delta_k")["layer"].iloc[0])
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
        if internal_steps and ax.get_xlabel() == "step":
            ax.axvline(internal_steps, color="grey", ls="--", lw=1)
    fig.suptitle(title or f"internal layer k = {k}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_fig7(tracks: pd.DataFrame, path: str | Path, internal_steps: int | None = None,
              metrics: tuple[str, ...] = ("actor_entropy", "reward")) -> None:
    """Fig. 7: actor entropy (and reward) vs step, one line per `method` (mean ± sd over seeds)."""
    plt, sns = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        sns.lineplot(tracks[tracks["metric"] == metric], x="step", y="value", hue="method", errorbar="sd", ax=ax)
        if internal_steps:
            ax.axvline(internal_steps, color="grey", ls="--", lw=1)
        ax.set(ylabel=metric.replace("_", " "))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_pass_at_k(curves: dict[str, pd.DataFrame], path: str | Path) -> None:
    """Fig. 6: mean Pass@K over benchmarks against K (log axis), one line per model/method."""
    plt, sns = _plt()
    data = pd.concat([c.assign(model=name) for name, c in curves.items()], ignore_index=True)
    mean = data.groupby(["model", "k"], as_index=False)["pass_at_k"].mean()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    sns.lineplot(mean, x="k", y="pass_at_k", hue="model", marker="o", ax=ax)
    ax.set(xscale="log", xlabel="K", ylabel="mean Pass@K (%)", title="Pass@K (mean over benchmarks)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
