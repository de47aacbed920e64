"""GRPO vs AttnRL (FCI) vs AttnRL (random) training on stories260K with a word reward (issue 13, item 5b).

Task: continue a story opening for up to `--length` tokens; reward 1 when the continuation contains the
word "tree" (whole word; base rate about 0.08 on the base model at 64 tokens). Per seed, from the same
initial model and the same prompt order, three methods train on rollout batches of `--prompts-per-step`
openings × `--n` responses, one optimizer step per rollout batch: AttnRL for `--steps` steps, GRPO for
`--grpo-steps` (AttnRL generates several times more tokens per step, so GRPO runs longer to cover
the same token budgets):
  grpo         TRL's GRPO (`branching="none"`);
  attnrl       AttnRL as published: adaptive sampling (ceil(n·e^(−acc)) responses per question, all-correct
               questions only above the running mean FCI), `--points` FCI branch points per branched
               response, `--samples` continuations per point, TreeRL advantages, zero-variance filter;
  attnrl_random the same with the points drawn at random steps (the adaptive rule still reads FCI).
Steps are sentences (separator "."), Δ = 2, min-start and min-distance 4 tokens (the published 512 of an
8k response scaled to 64 tokens), as in analyses/attnrl_stories.py (item 5a).

Per step the script keeps the reward of the initial responses (fresh samples of the current policy:
TRL's logged `reward`), the tokens generated (initial completions + continuation tokens kept) and the
share of zero-variance groups: among the initial groups (all methods; GRPO learns nothing from them)
and, for AttnRL, among the trees after branching. It writes analyses/attnrl_train_stories.parquet (one
row per method × seed × step; finished runs are kept and skipped when the script is run again),
attnrl_train_stories.png and attnrl_train_stories.md (every number in it is computed here).
Run (about 15 min on one shared core): HF_HUB_OFFLINE=1 PYTHONPATH=$PWD nice python analyses/attnrl_train_stories.py
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no OpenMP spin-waiting on a machine shared with other jobs

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).parent
WORD = "tree"
METHODS = {"grpo": dict(branching="none"),
           "attnrl": dict(branching="attn", adaptive_sampling=True),
           "attnrl_random": dict(branching="random", adaptive_sampling=True)}
FORMATS = {" tokens": "+,.0f", " steps": "+.1f"}
LEVELS = (0.5, 0.9)
"""Reward levels whose cost (tokens, steps) measures sample efficiency."""
LABELS = {"grpo": "GRPO", "attnrl": "AttnRL (FCI)", "attnrl_random": "AttnRL (random points)"}


def one_run(method: str, seed: int, args) -> pd.DataFrame:
    """Train one method from the embedded model; one row per step."""
    from attnrl_stories import OPENINGS  # the item-5a openings (this folder is on sys.path when run as a script)

    from internal_policy.attnrl.config import AttnRLConfig
    from internal_policy.bupo.rewards import target_word_reward
    from internal_policy.bupo.run import train
    from internal_policy.models import load_model

    model, tokenizer = load_model()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        config = AttnRLConfig(
            output_dir=out, method="grpo", max_steps=args.grpo_steps if method == "grpo" else args.steps,
            learning_rate=args.lr, weight_decay=0.0,
            lr_scheduler_type="constant", max_grad_norm=1.0, num_generations=args.n,
            per_device_train_batch_size=args.prompts_per_step * args.n, max_completion_length=args.length,
            temperature=1.0, top_p=1.0, top_k=0, epsilon=0.2, beta=0.0, seed=seed, logging_steps=1, use_cpu=True,
            bf16=False, report_to="none", save_strategy="no", disable_tqdm=True, branch_points=args.points,
            branch_samples=args.samples, fci_delta=args.delta, branch_min_distance=args.min_distance,
            branch_step_sep=["."], **METHODS[method])
        prompts = pd.DataFrame({"prompt": OPENINGS, "answer": ""})
        result = train(model, tokenizer, prompts, target_word_reward([WORD]), config, save_model=False)
    logs = pd.DataFrame([h for h in result.trainer.state.log_history if "reward" in h])
    rows = logs["completions/mean_length"] * args.prompts_per_step * args.n  # initial completion tokens
    table = pd.DataFrame({"method": method, "seed": seed, "step": logs["step"].astype(int), "reward": logs["reward"],
                          "zero_std_initial": logs["frac_reward_zero_std"], "generated_tokens": rows})
    branch = pd.DataFrame(result.trainer.branch_log)
    if len(branch):
        table["generated_tokens"] = branch["generated_tokens"].to_numpy()
        table["zero_std_trees"] = branch["zero_std_after"].to_numpy()
        table["train_rows"] = branch["train_rows"].to_numpy()
        table["rows_added"] = branch["rows_added"].to_numpy()
    else:
        table["zero_std_trees"] = table["zero_std_initial"]
        table["train_rows"] = args.prompts_per_step * args.n
        table["rows_added"] = 0
    table["tokens_total"] = table["generated_tokens"].cumsum()
    return table.assign(run_seconds=time.perf_counter() - started, settings=settings_key(args))


SETTINGS = ("steps", "grpo_steps", "prompts_per_step", "n", "length", "lr", "points", "samples", "delta",
            "min_distance")


def settings_key(args) -> str:
    """The settings a run's numbers depend on, as stored with its rows."""
    return json.dumps({k: getattr(args, k) for k in SETTINGS}, sort_keys=True)


def smooth(values: pd.Series, window: int) -> pd.Series:
    return values.rolling(window, min_periods=1).mean()


def budget_reward(table: pd.DataFrame, budget: float) -> pd.Series:
    """Per (method, seed): the mean reward over the first `budget` generated tokens (each step weighted by the
    tokens it generated): the area under the reward-vs-tokens curve divided by the budget."""
    part = table[table["tokens_total"] <= budget]
    weighted = (part["reward"] * part["generated_tokens"]).groupby([part["method"], part["seed"]]).sum()
    return weighted / part.groupby(["method", "seed"])["generated_tokens"].sum()


def to_reach(table: pd.DataFrame, level: float, window: int, column: str) -> pd.Series:
    """Per (method, seed): `column` (tokens_total or step) at the first step whose running-mean reward over `window`
    steps reaches `level` (NaN if it never does)."""
    def first(run: pd.DataFrame) -> float:
        hit = run[smooth(run["reward"], window).to_numpy() >= level]
        return float(hit[column].iloc[0]) if len(hit) else float("nan")

    return table.sort_values("step").groupby(["method", "seed"])[["reward", column]].apply(first)


def fmt(values: pd.Series, spec: str = "{:.3f}") -> str:
    """mean ± sd over seeds (missing values left out and counted)."""
    given = values.dropna()
    if given.empty:
        return "not reached"
    text = spec.format(given.mean()) + (f" ± {spec.format(given.std(ddof=1))}" if len(given) > 1 else "")
    return text + (f" ({len(values) - len(given)} not reached)" if len(given) < len(values) else "")


def figure(table: pd.DataFrame, budget: float, path: Path, window: int) -> None:
    from matplotlib.figure import Figure

    from internal_policy.plot import _colours, _style, save_figure

    colours = dict(zip(METHODS, _colours(len(METHODS))))
    with _style():
        fig = Figure(figsize=(11, 3.6), layout="constrained")
        reward_ax, step_ax, zero_ax = fig.subplots(1, 3)
        for (method, seed), run in table.groupby(["method", "seed"]):
            label = LABELS[method] if seed == table["seed"].min() else None
            reward = smooth(run["reward"], window)
            reward_ax.plot(run["tokens_total"] / 1e3, reward, color=colours[method], label=label, lw=1.2)
            step_ax.plot(run["step"], reward, color=colours[method], lw=1.2)
            zero_ax.plot(run["step"], smooth(run["zero_std_initial"], window), color=colours[method], lw=1.2)
            if method != "grpo":
                zero_ax.plot(run["step"], smooth(run["zero_std_trees"], window), color=colours[method], lw=1.2,
                             ls="--")
        branched = table[table["method"] != "grpo"]
        reward_ax.set_xlim(0, 1.2 * branched["tokens_total"].max() / 1e3)  # GRPO's longer run is cut at AttnRL's end
        for ax in (step_ax, zero_ax):
            ax.set_xlim(0, 1.5 * branched["step"].max())
        reward_ax.axvline(budget / 1e3, color="0.5", lw=0.8, ls=":")
        for level in LEVELS:
            reward_ax.axhline(level, color="0.7", lw=0.6, ls=":")
        reward_ax.set(xlabel="cumulative generated tokens (thousands)", ylabel=f"reward (mean of {window} steps)",
                      title="reward vs generated tokens")
        step_ax.set(xlabel="optimizer step (= rollout batch)", ylabel="reward", title="reward vs steps")
        zero_ax.set(xlabel="optimizer step", ylabel="share of zero-variance groups",
                    title="zero-variance groups\n(solid: initial n; dashed: AttnRL trees)")
        reward_ax.legend(fontsize=8)
        fig.suptitle(f'stories260K, reward "{WORD}": GRPO vs AttnRL (one line per seed)')
        save_figure(fig, path.parent, path.stem, formats=("png",))


def report(table: pd.DataFrame, args, budget: float) -> str:
    seeds = sorted(table["seed"].unique())
    runs = table.groupby(["method", "seed"])
    learning = table[table["step"] <= args.early].groupby(["method", "seed"])  # before most groups saturate
    zero_initial, zero_trees = learning["zero_std_initial"].mean(), learning["zero_std_trees"].mean()
    early = budget_reward(table, budget)
    reach = {(level, column): to_reach(table, level, args.last, column) for level in LEVELS
             for column in ("tokens_total", "step")}
    tokens, per_step, seconds = runs["tokens_total"].max(), runs["generated_tokens"].mean(), runs["run_seconds"].first()
    first = table[table["step"] <= args.last].groupby(["method", "seed"])["reward"].mean()
    lines = [
        "# GRPO vs AttnRL training on stories260K (issue 13, item 5b)",
        "",
        f"Generated by `HF_HUB_OFFLINE=1 PYTHONPATH=$PWD nice python analyses/attnrl_train_stories.py --seeds "
        f"{' '.join(map(str, seeds))} --steps {args.steps} --grpo-steps {args.grpo_steps}` "
        f"({seconds.sum() / 60:.1f} min of training on CPU, "
        "measured with other jobs on the machine). Every number below is computed by that script.",
        "",
        "## Setup (scaled down from the published run)",
        "",
        f"- stories260K; reward 1 when the {args.length}-token continuation of a story opening contains "
        f"\"{WORD}\" (base rate {first.loc['grpo'].mean():.3f} over GRPO's first {args.last} steps).",
        f"- Per step: {args.prompts_per_step} openings × n = {args.n} responses, one optimizer step per rollout batch "
        f"(AdamW lr {args.lr:g}, constant, ε = 0.2, β = 0, token-mean loss), {args.steps} steps for AttnRL and "
        f"{args.grpo_steps} for GRPO, seeds "
        f"{', '.join(map(str, seeds))}; the three methods of a seed start from the same model and see the same "
        "prompts in the same order.",
        f"- AttnRL: {args.points} points × {args.samples} continuations per branched response, adaptive sampling, "
        f"zero-variance filter, TreeRL advantages (no std normalisation); sentence steps, Δ = {args.delta}, "
        f"min-start/min-distance {args.min_distance} tokens. AttnRL (random) differs only in where it branches.",
        "",
        "## Results (mean ± sd over seeds)",
        "",
        "Sample efficiency: the generated tokens (initial completions + continuation tokens kept) and the steps a "
        f"run needs before its reward, as a running mean over {args.last} steps, reaches a level; and its mean "
        f"reward over the first {budget:,.0f} generated tokens (the smallest total any run reached; each step "
        f"weighted by its tokens). Zero-variance shares are over the first {args.early} steps: once the reward "
        "saturates, almost every group is all-1 whatever the method.",
        "",
        "| method | reward, steps 1–" + f"{args.last} | " + " | ".join(
            f"tokens to reward {level:g} | steps to {level:g}" for level in LEVELS)
        + f" | mean reward, first {budget / 1e3:.0f}k tokens | tokens per step | zero-variance share, initial "
        f"groups, steps 1–{args.early} | zero-variance share, trees, steps 1–{args.early} |",
        "|---|---|" + "---|---|" * len(LEVELS) + "---|---|---|---|",
    ]
    for method in METHODS:
        cells = [fmt(first.loc[method])]
        for level in LEVELS:
            cells += [fmt(reach[level, "tokens_total"].loc[method], "{:,.0f}"), fmt(reach[level, "step"].loc[method],
                                                                                    "{:.1f}")]
        cells += [fmt(early.loc[method]), f"{per_step.loc[method].mean():,.0f}", fmt(zero_initial.loc[method]),
                  fmt(zero_trees.loc[method]) if method != "grpo" else "(no branching)"]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per-seed token totals: " + "; ".join(f"{LABELS[m]} {tokens.loc[m].min():,.0f}–{tokens.loc[m].max():,.0f}"
                                              for m in METHODS) + ". A level a run never reached counts as missing.",
        "",
        "## What replicates at this scale",
        "",
        *verdicts(reach, early, zero_initial, zero_trees, seeds),
        "",
        "What cannot replicate here: the steps are sentences of a 260K-parameter story model and the reward is one "
        "word, so no step decides the outcome the way a reasoning step does, and FCI has little to find (see "
        "analyses/attnrl_stories.md, item 5a); the published run trains a 1.5B reasoning model on math for 800 "
        "steps with 8k-token responses. The dynamic prompt batch (B_{t+1} from the filtered batch size) is not "
        "used: TRL's generation batch is fixed.",
        "",
        "Figure: `attnrl_train_stories.png` (reward against cumulative generated tokens and against steps, and the "
        "zero-variance shares, one line per seed). Data: `attnrl_train_stories.parquet`; `--report-only` redraws "
        "this report and the figure from it.",
    ]
    return "\n".join(lines) + "\n"


def verdicts(reach, early, zero_initial, zero_trees, seeds) -> list[str]:
    """Plain statements from paired per-seed comparisons (a claim counts as replicated when it holds in every seed)."""
    n = len(seeds)

    def count(series, a, b, better, unit: str = "") -> tuple[int, str]:
        """Seeds where `a` beats `b`, and the mean difference over seeds where both are finite. A level never
        reached costs infinitely many tokens (steps), so reaching it at all beats not reaching it."""
        diff = (series.loc[a].reindex(seeds).fillna(np.inf) - series.loc[b].reindex(seeds).fillna(np.inf)).to_numpy()
        finite = diff[np.isfinite(diff)]
        return int(better(np.nan_to_num(diff, nan=0.0)).sum()), \
            f"mean difference {finite.mean():{FORMATS.get(unit, '+.3f')}}{unit}" if len(finite) else \
            "no seed where both reached it"

    def word(wins: int) -> str:
        return "replicated" if wins == n else "not replicated" if wins == 0 else "mixed"

    level = LEVELS[0]
    out = []
    for other in ("grpo", "attnrl_random"):
        wins, diff = count(reach[level, "tokens_total"], "attnrl", other, lambda d: d < 0, " tokens")
        out.append(f"- Fewer generated tokens to reach reward {level:g}: AttnRL (FCI) vs {LABELS[other]} in {wins}/{n} "
                   f"seeds ({diff}): {word(wins)}.")
        wins, diff = count(early, "attnrl", other, lambda d: d > 0)
        out.append(f"- Higher mean reward over the common token budget: AttnRL (FCI) vs {LABELS[other]} in "
                   f"{wins}/{n} seeds ({diff}): {word(wins)}.")
    wins, diff = count(reach[level, "step"], "attnrl", "grpo", lambda d: d < 0, " steps")
    out.append(f"- Fewer optimizer steps to reach reward {level:g}: AttnRL (FCI) vs GRPO in {wins}/{n} seeds "
               f"({diff}): {word(wins)}; AttnRL also trains on more rows per step.")
    lower = int((zero_trees.loc["attnrl"].reindex(seeds) < zero_initial.loc["attnrl"].reindex(seeds)).sum())
    out.append(f"- Branching turns zero-variance groups into trees with signal: for AttnRL (FCI) the share falls from "
               f"{zero_initial.loc['attnrl'].mean():.3f} (initial groups) to {zero_trees.loc['attnrl'].mean():.3f} "
               f"(trees), in {lower}/{n} seeds: {word(lower)}. GRPO's groups: "
               f"{zero_initial.loc['grpo'].mean():.3f} with no signal.")
    wins, diff = count(zero_trees, "attnrl", "attnrl_random", lambda d: d < 0)
    out.append(f"- FCI points leave fewer zero-variance trees than random points in {wins}/{n} seeds "
               f"({diff}): {word(wins)}.")
    tokens_vs_grpo = count(reach[level, "tokens_total"], "attnrl", "grpo", lambda d: d < 0)[0]
    steps_vs_grpo = count(reach[level, "step"], "attnrl", "grpo", lambda d: d < 0)[0]
    tokens_vs_random = count(reach[level, "tokens_total"], "attnrl", "attnrl_random", lambda d: d < 0)[0]
    out += ["", "In short: AttnRL (FCI) reaches reward {:g} in fewer optimizer steps than GRPO in {}/{} seeds, and "
            "with fewer generated tokens in {}/{}; FCI-chosen points beat random points on tokens in {}/{}. {}".format(
                level, steps_vs_grpo, n, tokens_vs_grpo, n, tokens_vs_random, n,
                "Per step, branching gives more signal (more rows, fewer zero-variance groups); per generated token, "
                "GRPO's plain samples are cheaper here." if tokens_vs_grpo == 0 and steps_vs_grpo == n else "")]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40, help="AttnRL steps (rollout batches)")
    parser.add_argument("--grpo-steps", type=int, default=160, help="GRPO steps")
    parser.add_argument("--prompts-per-step", type=int, default=6)
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--points", type=int, default=2)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--delta", type=int, default=2)
    parser.add_argument("--min-distance", type=int, default=4)
    parser.add_argument("--last", type=int, default=5, help="steps averaged at the start and at the end")
    parser.add_argument("--early", type=int, default=10, help="steps over which zero-variance shares are averaged")
    parser.add_argument("--smooth", type=int, default=5, help="steps of the figure's running mean")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "attnrl_train_stories")
    parser.add_argument("--report-only", action="store_true", help="redraw the report and figure from the table")
    args = parser.parse_args()
    path = args.out.with_suffix(".parquet")
    if not args.report_only:
        run(args, path)
    table = pd.read_parquet(path)
    table = table[table["seed"].isin(args.seeds)]
    budget = float(table.groupby(["method", "seed"])["tokens_total"].max().min())
    figure(table, budget, args.out.with_suffix(".png"), args.smooth)
    args.out.with_suffix(".md").write_text(report(table, args, budget))
    print(table.groupby("method")[["reward", "zero_std_initial", "zero_std_trees", "generated_tokens"]].mean())


def run(args, path: Path) -> None:
    """Train every (method, seed) not yet in the table; the table is rewritten after each run."""
    done = pd.read_parquet(path) if path.is_file() else pd.DataFrame(columns=["method", "seed", "step", "settings"])
    if (done["settings"] != settings_key(args)).any():
        raise SystemExit(f"{path} holds runs with other settings; give another --out or delete it")
    for seed in args.seeds:
        for method in METHODS:
            if ((done["method"] == method) & (done["seed"] == seed)).any():
                continue
            table = one_run(method, seed, args)
            done = pd.concat([done, table], ignore_index=True) if len(done) else table
            done.to_parquet(path, index=False)
            print(f"{method} seed {seed}: final reward {table['reward'].tail(args.last).mean():.3f}, "
                  f"{table['tokens_total'].iloc[-1]:,.0f} tokens, {table['run_seconds'].iloc[0]:.0f} s", flush=True)


if __name__ == "__main__":
    main()
