"""BuPO vs GRPO on the embedded stories260K model with a toy verifiable reward (CPU, minutes).

Reward: 1 when the 24-token story continuation contains the word "park" (base rate about 20%, so
GRPO groups of 8 usually have signal). k = the boundary layer from a profile of the model
(`internal_layer="auto"` on the probe set). For each seed, GRPO and BuPO (s_inter internal steps)
train from the same initial model on the same prompts; an `EntropyTracker` measures, every
`--log-every` steps, on a fixed held-out probe (base-model samples for held-out openings): actor
entropy, ΔH at layer k, cos(H_k, H_l) for l > k, KL(π^k‖π^l) and perplexity.

Writes analyses/bupo_stories_tracking.parquet, the figures analyses/bupo_stories_fig5.png and
analyses/bupo_stories_fig7.png, and analyses/bupo_stories.md (every number in it is computed here).
Run: HF_HUB_OFFLINE=1 PYTHONPATH=$PWD python analyses/bupo_stories.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).parent
TRAIN_OPENINGS = [
    "Once upon a time, there was a little", "One day, a girl named Lily", "Tom and his mom went to the",
    "The sun was shining and", "There was a big", "Sam wanted to play with", "Lily and Ben were", "One morning,",
    "A little boy named Tim", "Mia had a red", "The dog was very", "It was a sunny day. Anna",
    "Jack saw a bird", "Sue liked to", "Once there was a happy", "Max and his dad",
]
PROBE_OPENINGS = ["Once upon a time, a girl", "Ben had a new", "The cat and the", "One day, Timmy went"]
WORD = "park"


def probe_records(model, tokenizer, n_per_prompt: int, length: int) -> list[dict]:
    """Held-out probe: base-model continuations of held-out openings (fixed seed), as prompt/response records."""
    from internal_policy.bupo.evaluate import sample_completions

    completions = sample_completions(model, tokenizer, PROBE_OPENINGS, n_per_prompt, max_new_tokens=length,
                                     batch_size=n_per_prompt, seed=1234)
    return [{"id": f"{i}-{j}", "prompt": p, "response": c}
            for i, (p, cs) in enumerate(zip(PROBE_OPENINGS, completions)) for j, c in enumerate(cs) if c.strip()]


def one_run(method: str, seed: int, k: int, args, probe) -> pd.DataFrame:
    from internal_policy.bupo import BuPOConfig
    from internal_policy.bupo.rewards import target_word_reward
    from internal_policy.bupo.run import train
    from internal_policy.models import load_model

    model, tokenizer = load_model()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        config = BuPOConfig(
            output_dir=out, method=method, internal_layer=k if method == "bupo" else None,
            internal_steps=args.internal_steps, max_steps=args.steps, learning_rate=args.lr, weight_decay=0.0,
            lr_scheduler_type="constant", max_grad_norm=1.0, num_generations=8, per_device_train_batch_size=64,
            max_completion_length=24, temperature=1.0, top_p=1.0, top_k=0, epsilon=0.2, beta=0.0, seed=seed,
            logging_steps=args.log_every, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        )
        prompts = pd.DataFrame({"prompt": TRAIN_OPENINGS * 4, "answer": ""})
        result = train(model, tokenizer, prompts, target_word_reward([WORD]), config, probe=probe, track_layer=k,
                       save_model=False)
    return result.tracking.assign(method=method, seed=seed)


def value(table: pd.DataFrame, metric: str, step: int, layer: int | None = None) -> pd.Series:
    """Per (method, seed): the metric at a step (mean over layers > k when layer is None for cos/kl)."""
    rows = table[(table["metric"] == metric) & (table["step"] == step)]
    if layer is not None:
        rows = rows[rows["layer"] == layer]
    return rows.groupby(["method", "seed"])["value"].mean()


def shifts(table: pd.DataFrame, start: int, stop: int) -> pd.DataFrame:
    """Per method and seed: the change from step `start` to step `stop` of the three tracked quantities."""
    out = pd.DataFrame({
        "actor_entropy": value(table, "actor_entropy", stop) - value(table, "actor_entropy", start),
        "delta_k": value(table, "delta_k", stop) - value(table, "delta_k", start),
        "cos_k": value(table, "cos_k", stop) - value(table, "cos_k", start),
        "kl_k": value(table, "kl_k", stop) - value(table, "kl_k", start),
        "perplexity": value(table, "perplexity", stop) - value(table, "perplexity", start),
    })
    return out.reset_index()


def fmt(series: pd.Series) -> str:
    return f"{series.mean():+.4f} ± {series.std(ddof=1):.4f}" if len(series) > 1 else f"{series.mean():+.4f}"


def verdict(bupo: pd.Series, grpo: pd.Series, sign: int) -> str:
    """Whether BuPO moves in the paper's direction (every seed), and beyond GRPO with the same seed."""
    n = len(bupo)
    own = int((sign * bupo.to_numpy() > 0).sum())
    paired = int((sign * (bupo.to_numpy() - grpo.to_numpy()) > 0).sum())
    if own == n and paired == n:
        word = "replicates"
    elif own == n or paired == n:
        word = "partly"
    else:
        word = "does not replicate"
    return f"{word}: {own}/{n} BuPO seeds move in the paper's direction; {paired}/{n} beyond GRPO (same seed)"


def report(table: pd.DataFrame, ks: list[int], n_layers: int, args, seconds: float, n_probe: int) -> str:
    k = ks[0]
    lines = header(table[table["k"] == k], k, n_layers, args, seconds, n_probe)
    for layer in ks:
        lines += shift_section(table[table["k"] == layer], layer, args, auto=layer == k)
    lines += [
        "## Caveats",
        "",
        "- stories260K has only 5 layers. The boundary rule caps k at L−1 = 4, which leaves a single later layer for "
        "cos(H_k, H_l) and KL(π^k ‖ π^l); k = 2 is a manual choice, not the rule's.",
        "- Actor entropy is measured on the fixed held-out probe (base-model continuations), not on the rollouts. "
        "TRL's own rollout entropy is in the parquet as `trl_entropy`; during BuPO's internal phase it is the "
        "entropy of π^k (the policy being optimised), so it is not the Fig. 7 quantity.",
        "- \"Replicates\" is this script's rule: every BuPO seed moves in the paper's direction and beyond GRPO "
        "with the same seed. Three seeds on a 260K-parameter model with a toy reward say nothing about the paper's "
        "accuracy gains; the reward table only shows that BuPO still learns the task after the switch.",
        "",
    ]
    lines += ["Figures: `bupo_stories_fig7.png` (actor entropy and reward vs step, mean ± sd over seeds; dashed line = "
              "end of the internal phase), " + ", ".join(f"`bupo_stories_fig5_k{x}.png`" for x in ks) +
              " (BuPO runs: Fig. 5 panels a–d at that k)."]
    return "\n".join(lines) + "\n"


def header(table: pd.DataFrame, k: int, n_layers: int, args, seconds: float, n_probe: int) -> list[str]:
    extra = " ".join(str(x) for x in args.extra_k)
    return [
        "# BuPO vs GRPO on stories260K (toy reward)",
        "",
        "Generated by `HF_HUB_OFFLINE=1 PYTHONPATH=$PWD python analyses/bupo_stories.py "
        f"--seeds {args.seeds} --steps {args.steps} --internal-steps {args.internal_steps} --extra-k {extra}` "
        f"({seconds / 60:.1f} min on CPU, {args.threads} thread(s)). Every number below is computed by that script.",
        "",
        f"- Model: stories260K (L = {n_layers}, tied embeddings: the unembedding gradient of the internal phase also "
        f"moves the input embedding). Internal layer k = {k}: the boundary layer of a profile of the model on the "
        "probe set (`internal_layer=\"auto\"`; ΔH_FFN > 0 at every layer, so the rule caps k at L−1). "
        f"Extra runs at k = {extra} (below the boundary) show whether the layer matters.",
        f"- Reward: 1 if the 24-token continuation of a story opening contains \"{WORD}\". 8 prompts × 8 "
        f"samples per step, lr {args.lr}, AdamW, constant schedule, ε = 0.2, β = 0. {args.steps} optimizer steps;"
        f" BuPO optimises π^k for the first {args.internal_steps} steps, then π_θ. GRPO is re-run with the same "
        "seed for each k (tracked at that k); identical GRPO rewards across k show the runs are deterministic.",
        f"- Tracking: every {args.log_every} steps on a fixed held-out probe of {n_probe} base-model continuations "
        "of held-out openings (not the rollouts). Seeds: " + ", ".join(str(x) for x in range(args.seeds)) + ".",
        "",
    ]


def shift_section(table: pd.DataFrame, k: int, args, auto: bool) -> list[str]:
    """Reward table and the internal-phase shifts at one k."""
    s = args.internal_steps
    d = shifts(table, 0, s)
    by = {m: d[d["method"] == m].sort_values("seed") for m in ("bupo", "grpo")}
    rewards = table[table["metric"] == "reward"]
    early = rewards[rewards["step"] <= s].groupby(["method", "seed"])["value"].mean()
    late = rewards[rewards["step"] > args.steps - 10].groupby(["method", "seed"])["value"].mean()
    base = rewards[rewards["step"] == rewards["step"].min()].groupby(["method", "seed"])["value"].mean()

    def paired(q: str) -> str:
        return fmt(pd.Series(by["bupo"][q].to_numpy() - by["grpo"][q].to_numpy()))

    def row(q: str, label: str, direction: str, sign: int | None) -> str:
        judged = verdict(by["bupo"][q], by["grpo"][q], sign) if sign else "—"
        return f"| {label} | {direction} | {fmt(by['bupo'][q])} | {fmt(by['grpo'][q])} | {paired(q)} | {judged} |"

    lines = [
        f"## k = {k}" + (" (boundary layer, auto)" if auto else " (manual, below the boundary)"),
        "",
        "Reward (mean ± sd over seeds):",
        "",
        "| method | first logged step | logged steps ≤ s_inter | logged steps in the last 10 |",
        "|---|---|---|---|",
    ]
    lines += [f"| {m} | {fmt(base[m])} | {fmt(early[m])} | {fmt(late[m])} |" for m in ("grpo", "bupo")]
    lines += [
        "",
        f"Change over the internal phase (step 0 → step {s}), mean ± sd over seeds:",
        "",
        "| quantity | paper's direction (BuPO) | BuPO | GRPO | BuPO − GRPO (same seed) | verdict at this scale |",
        "|---|---|---|---|---|---|",
        row("actor_entropy", "actor entropy of π_θ (Fig. 7)", "rises", +1),
        row("delta_k", f"ΔH at layer k = H_{k} − H_{k - 1} (Fig. 5b)", "falls", -1),
        row("cos_k", f"cos(H_{k}, H_l), mean over l > k (Fig. 5a)", "rises", +1),
        row("kl_k", f"KL(π^{k} ‖ π^l), mean over l > k (Fig. 5d)", "(grows with long IPA)", None),
        row("perplexity", "perplexity of π_θ on the probe (Fig. 5c)", "(grows with long IPA)", None),
        "",
        "Per seed (change over the internal phase):",
        "",
        d.round(4).to_markdown(index=False) if _has_tabulate() else "```\n" + d.round(4).to_string(index=False) + "\n```",
        "",
    ]
    return lines


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--internal-steps", type=int, default=10)
    parser.add_argument("--log-every", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--extra-k", type=int, nargs="*", default=[2],
                        help="more internal layers to run BuPO at (GRPO re-run with the same seed, tracked there)")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()

    from internal_policy.bupo.plots import plot_fig5, plot_fig7
    from internal_policy.bupo.trainer import resolve_internal_layer
    from internal_policy.models import describe, load_model

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    probe = probe_records(model, tokenizer, n_per_prompt=8, length=24)
    k = resolve_internal_layer("auto", model, tokenizer, probe)
    n_layers = describe(model).n_layers
    print(f"internal layer k={k} (auto), L={n_layers}, probe {len(probe)} records", flush=True)
    ks = [k] + [x for x in args.extra_k if x != k]
    parts = []
    for layer in ks:
        for seed in range(args.seeds):
            for method in ("grpo", "bupo"):
                t0 = time.perf_counter()
                parts.append(one_run(method, seed, layer, args, probe).assign(k=layer))
                print(f"k {layer} seed {seed} {method}: {time.perf_counter() - t0:.0f} s", flush=True)
    table = pd.concat(parts, ignore_index=True)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_parquet(args.out / "bupo_stories_tracking.parquet", index=False)
    curves = table[(table["method"] == "bupo") | (table["k"] == k)]
    plot_fig7(curves.assign(method=curves["method"] + curves["k"].map(lambda x: f" k={x}").where(
        curves["method"] == "bupo", "")), args.out / "bupo_stories_fig7.png", args.internal_steps)
    for layer in ks:
        plot_fig5(table[(table["method"] == "bupo") & (table["k"] == layer)], args.out / f"bupo_stories_fig5_k{layer}.png",
                  title=f"BuPO on stories260K, k = {layer}, s_inter = {args.internal_steps} (mean ± sd over seeds)",
                  internal_steps=args.internal_steps)
    text = report(table, ks, n_layers, args, time.perf_counter() - started, len(probe))
    (args.out / "bupo_stories.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
