"""BuPO vs GRPO vs the sequential bottom-up schedule on stories260K with a toy verifiable reward (CPU, minutes).

Reward: 1 when the 24-token story continuation contains the word "park" (base rate about 20%, so
GRPO groups of 8 usually have signal). The boundary layer k comes from a profile of the model
(`internal_layer="auto"` on the probe set). Per seed, from the same initial model on the same
prompts: GRPO; BuPO at the boundary layer for s_inter rollouts; BuPO at `--extra-k` for s_inter
rollouts; and the bottom-up schedule `internal_layer="auto"` + `internal_schedule="s/2,s/2"`, whose
layers are spaced evenly up to the boundary layer (π^2 then π^4 here) with the same total internal
rollouts s_inter. An `EntropyTracker` measures every `--log-every` steps, on a fixed held-out probe
(base-model samples for held-out openings), at every layer k of interest: actor entropy, ΔH at k,
cos(H_k, H_l) for l > k, KL(π^k‖π^l) and perplexity.

Writes analyses/bupo_stories_tracking.parquet, the figures analyses/bupo_stories_fig7.png and
analyses/bupo_stories_fig5_<run>.png, and analyses/bupo_stories.md (every number in it is computed here).
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
DIRECTIONS = (("actor_entropy", "actor entropy of π_θ (Fig. 7)", "rises", +1),
              ("delta_k", "ΔH at layer {k} = H_{k} − H_{below} (Fig. 5b)", "falls", -1),
              ("cos_k", "cos(H_{k}, H_l), mean over l > {k} (Fig. 5a)", "rises", +1))
"""The three entropy shifts the paper reports for BuPO's internal phase, with their direction."""


def probe_records(model, tokenizer, n_per_prompt: int, length: int) -> list[dict]:
    """Held-out probe: base-model continuations of held-out openings (fixed seed), as prompt/response records."""
    from internal_policy.bupo.evaluate import sample_completions

    completions = sample_completions(model, tokenizer, PROBE_OPENINGS, n_per_prompt, max_new_tokens=length,
                                     batch_size=n_per_prompt, seed=1234)
    return [{"id": f"{i}-{j}", "prompt": p, "response": c}
            for i, (p, cs) in enumerate(zip(PROBE_OPENINGS, completions)) for j, c in enumerate(cs) if c.strip()]


def one_run(name: str, seed: int, settings: dict, ks: list[int], args, probe) -> tuple[pd.DataFrame, list]:
    """Train one method from the embedded model; its tracking table (tracked at every k in `ks`) and stage spans."""
    from internal_policy.bupo import BuPOConfig
    from internal_policy.bupo.rewards import target_word_reward
    from internal_policy.bupo.run import train
    from internal_policy.models import load_model

    model, tokenizer = load_model()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        config = BuPOConfig(
            output_dir=out, max_steps=args.steps, learning_rate=args.lr, weight_decay=0.0,
            lr_scheduler_type="constant", max_grad_norm=1.0, num_generations=8, per_device_train_batch_size=64,
            max_completion_length=24, temperature=1.0, top_p=1.0, top_k=0, epsilon=0.2, beta=0.0, seed=seed,
            logging_steps=args.log_every, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
            disable_tqdm=True, **settings,
        )
        prompts = pd.DataFrame({"prompt": TRAIN_OPENINGS * 4, "answer": ""})
        result = train(model, tokenizer, prompts, target_word_reward([WORD]), config, probe=probe, track_layers=ks,
                       save_model=False)
    return result.tracking.assign(run=name, seed=seed), result.trainer.spans


def at(table: pd.DataFrame, metric: str, step: int, k: int) -> pd.Series:
    """Per (run, seed): a metric at a step, for layer k when k-specific (mean over l > k for cos/kl)."""
    rows = table[(table["metric"] == metric) & (table["step"] == step)]
    if metric in ("delta_k", "cos_k", "kl_k"):
        rows = rows[rows["k"] == k]
    return rows.groupby(["run", "seed"])["value"].mean()


def shifts(table: pd.DataFrame, start: int, stop: int, k: int) -> pd.DataFrame:
    """Per run and seed: the change from step `start` to `stop` of the tracked quantities (k-specific ones at k)."""
    names = [d[0] for d in DIRECTIONS] + ["kl_k", "perplexity"]
    return pd.DataFrame({m: at(table, m, stop, k) - at(table, m, start, k) for m in names}).reset_index()


def mean_reward(table: pd.DataFrame, first: int, last: int) -> pd.Series:
    """Per (run, seed): the mean logged reward of steps first..last (each logged step averages its rollout)."""
    rows = table[(table["metric"] == "reward") & table["step"].between(first, last)]
    return rows.groupby(["run", "seed"])["value"].mean()


def fmt(series: pd.Series) -> str:
    return f"{series.mean():+.4f} ± {series.std(ddof=1):.4f}" if len(series) > 1 else f"{series.mean():+.4f}"


def verdict(run: pd.Series, grpo: pd.Series, sign: int) -> str:
    """How many seeds move in the paper's direction, and beyond GRPO with the same seed."""
    n = len(run)
    own = int((sign * run.to_numpy() > 0).sum())
    paired = int((sign * (run.to_numpy() - grpo.to_numpy()) > 0).sum())
    word = "yes" if own == n and paired == n else "partly" if own == n or paired == n else "no"
    return f"{word} ({own}/{n} in the direction, {paired}/{n} beyond GRPO)"


def shift_table(d: pd.DataFrame, runs: list[str], k: int) -> list[str]:
    """Markdown rows: per quantity, mean ± sd of each run's shift and the verdict against GRPO."""
    by = {r: d[d["run"] == r].sort_values("seed") for r in runs + ["grpo"]}
    lines = ["| quantity | paper (BuPO) | " + " | ".join(runs) + " | GRPO |", "|---|---|" + "---|" * (len(runs) + 1)]
    for metric, label, direction, sign in DIRECTIONS:
        cells = [f"{fmt(by[r][metric])}<br>{verdict(by[r][metric], by['grpo'][metric], sign)}" for r in runs]
        lines.append(f"| {label.format(k=k, below=k - 1)} | {direction} | "
                     + " | ".join(cells) + f" | {fmt(by['grpo'][metric])} |")
    for metric, label in (("kl_k", f"KL(π^{k} ‖ π^l), mean over l > {k}"), ("perplexity", "perplexity of π_θ")):
        lines.append(f"| {label} | (grows with long IPA) | " + " | ".join(fmt(by[r][metric]) for r in runs)
                     + f" | {fmt(by['grpo'][metric])} |")
    return lines


def report(table: pd.DataFrame, runs: dict[str, str], spans: dict[str, list], args, context: dict) -> str:
    s, k_top, k_low = args.internal_steps, context["k"], context["k_low"]
    sched = spans["schedule"]
    lines = [
        "# BuPO vs GRPO vs the bottom-up schedule on stories260K (toy reward)",
        "",
        "Generated by `HF_HUB_OFFLINE=1 PYTHONPATH=$PWD python analyses/bupo_stories.py "
        f"--seeds {args.seeds} --steps {args.steps} --internal-steps {s} --extra-k {args.extra_k}` "
        f"({context['seconds'] / 60:.1f} min on CPU, {args.threads} thread(s)). Every number below is computed by "
        "that script.",
        "",
        f"- Model: stories260K (L = {context['n_layers']}, tied embeddings: the unembedding gradient of the internal "
        f"phase also moves the input embedding). Boundary layer k = {k_top} from a profile of the model on the probe "
        "set (`internal_layer=\"auto\"`; ΔH_FFN > 0 at every layer, so the rule caps k at L−1).",
        f"- Reward: 1 if the 24-token continuation of a story opening contains \"{WORD}\". 8 prompts × 8 samples "
        f"per rollout batch, one optimizer step per rollout, lr {args.lr}, AdamW, constant schedule, ε = 0.2, "
        f"β = 0, {args.steps} steps. Seeds: {', '.join(str(x) for x in range(args.seeds))}.",
        "- Runs (same seeds, same initial model): " + "; ".join(f"**{r}**: {text}" for r, text in runs.items()) + ".",
        f"- Tracking: every {args.log_every} step(s) on a fixed held-out probe of {context['n_probe']} base-model "
        f"continuations of held-out openings (not the rollouts), at k = {k_low} and k = {k_top} for every run.",
        "",
        "## Reward (mean ± sd over seeds)",
        "",
        "| run | first step | steps 1–" + f"{s} (internal phase) | last 10 steps |",
        "|---|---|---|---|",
    ]
    first = mean_reward(table, 1, 1)
    early, late = mean_reward(table, 1, s), mean_reward(table, args.steps - 9, args.steps)
    lines += [f"| {r} | {fmt(first[r])} | {fmt(early[r])} | {fmt(late[r])} |" for r in ["grpo", *runs]]
    for k in (k_top, k_low):
        lines += ["", f"## Whole internal phase at k = {k} (step 0 → {s}), mean ± sd over seeds", "",
                  *shift_table(shifts(table, 0, s, k), list(runs), k)]
    lines += ["", "## Per stage of the schedule", "",
              f"Stage 1 of the schedule and bupo_k{k_low} train the same π^{k_low} from the same seed, so their "
              f"stage-1 columns are equal when π^{k_low} is the first stage: a check that runs are deterministic.", ""]
    for span in sched:
        d = shifts(table, span.start, span.stop, span.layer)
        lines += [f"### Stage {span.index}: π^{span.layer} for {span.rollouts} rollouts (step {span.start} → "
                  f"{span.stop}), quantities at k = {span.layer}", "",
                  *shift_table(d, list(runs), span.layer),
                  "", "Reward in these steps: " + ", ".join(
                      f"{r} {fmt(mean_reward(table, span.start + 1, span.stop)[r])}" for r in ["grpo", *runs]), ""]
    lines += verdicts(table, sched, s, k_top, args)
    lines += [
        "## Caveats",
        "",
        f"- stories260K has only {context['n_layers']} layers. The boundary rule caps k at L−1 = {k_top}, which "
        "leaves a single later layer for cos(H_k, H_l) and KL(π^k ‖ π^l) at that k.",
        "- Actor entropy is measured on the fixed held-out probe (base-model continuations), not on the rollouts. "
        "TRL's own rollout entropy is in the parquet as `trl_entropy`; during an internal phase it is the entropy of "
        "the π^k being optimised, so it is not the Fig. 7 quantity.",
        "- Each cell's verdict counts seeds: \"yes\" = every seed moves in the paper's direction and beyond GRPO with "
        "the same seed. Three seeds on a 260K-parameter model with a toy reward say nothing about the paper's "
        "accuracy gains; the reward table only shows whether each run still learns the task.",
        "",
        "Figures: `bupo_stories_fig7.png` (actor entropy and reward vs step, mean ± sd over seeds; dashed lines = "
        "the schedule's stage ends), `bupo_stories_fig5_<run>.png` (Fig. 5 panels a–d of each BuPO run at its top k).",
    ]
    return "\n".join(lines) + "\n"


def verdicts(table: pd.DataFrame, sched: list, s: int, k_top: int, args) -> list[str]:
    """Plain-language comparison of the schedule with BuPO at the boundary layer (same internal rollouts)."""
    whole = shifts(table, 0, s, k_top)
    by = {r: whole[whole["run"] == r].sort_values("seed") for r in ("schedule", "bupo", "grpo")}
    lines = ["## Verdicts", ""]
    for span in sched:
        d = shifts(table, span.start, span.stop, span.layer)
        runs = {r: d[d["run"] == r].sort_values("seed") for r in ("schedule", "grpo")}
        words = [f"{label.format(k=span.layer, below=span.layer - 1).split(' (')[0]} {direction}: "
                 f"{verdict(runs['schedule'][m], runs['grpo'][m], sign)}" for m, label, direction, sign in DIRECTIONS]
        lines.append(f"- Schedule stage {span.index} (π^{span.layer}, step {span.start} → {span.stop}): "
                     + "; ".join(words) + ".")
    for metric, label, direction, sign in DIRECTIONS:
        gap = sign * (by["schedule"][metric].to_numpy() - by["bupo"][metric].to_numpy())
        more = int((gap > 0).sum())
        lines.append(f"- {label.format(k=k_top, below=k_top - 1)} over the whole internal phase: schedule "
                     f"{fmt(by['schedule'][metric])}, BuPO at k = {k_top} {fmt(by['bupo'][metric])} (paper: "
                     f"{direction}); the schedule's change lies further in the paper's direction (or less against "
                     f"it) than BuPO's in {more}/{len(gap)} seeds.")
    reward_gap = (mean_reward(table, args.steps - 9, args.steps)["schedule"].to_numpy()
                  - mean_reward(table, args.steps - 9, args.steps)["bupo"].to_numpy())
    lines += [f"- Final reward (last 10 steps), schedule − BuPO at k = {k_top}: {fmt(pd.Series(reward_gap))} "
              "(same seed).", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--internal-steps", type=int, default=10, help="s_inter in rollout batches (even)")
    parser.add_argument("--log-every", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--extra-k", type=int, default=2, help="a layer below the boundary for BuPO at one k")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()

    from internal_policy.bupo.plots import fig5_figure, fig7_figure
    from internal_policy.bupo.trainer import resolve_internal_layer
    from internal_policy.models import describe, load_model
    from internal_policy.plot import save_figure

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    probe = probe_records(model, tokenizer, n_per_prompt=8, length=24)
    k = resolve_internal_layer("auto", model, tokenizer, probe)
    half = args.internal_steps // 2
    print(f"internal layer k={k} (auto), L={describe(model).n_layers}, probe {len(probe)} records", flush=True)
    settings = {
        "grpo": dict(method="grpo"),
        "bupo": dict(method="bupo", internal_layer=k, internal_steps=args.internal_steps),
        f"bupo_k{args.extra_k}": dict(method="bupo", internal_layer=args.extra_k, internal_steps=args.internal_steps),
        "schedule": dict(method="bupo", internal_layer="auto",
                         internal_schedule=f"{half},{args.internal_steps - half}"),
    }
    runs = {"bupo": f"π^{k} (boundary) for {args.internal_steps} rollouts",
            f"bupo_k{args.extra_k}": f"π^{args.extra_k} for {args.internal_steps} rollouts",
            "schedule": f"auto schedule \"{half},{args.internal_steps - half}\" (layers spaced up to the boundary)"}
    parts, spans = [], {}
    for seed in range(args.seeds):
        for name, config in settings.items():
            t0 = time.perf_counter()
            table, spans[name] = one_run(name, seed, config, sorted({args.extra_k, k}), args, probe)
            parts.append(table)
            print(f"seed {seed} {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    table = pd.concat(parts, ignore_index=True)
    runs["schedule"] += ": " + ", ".join(f"π^{s.layer} for {s.rollouts}" for s in spans["schedule"])
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_parquet(args.out / "bupo_stories_tracking.parquet", index=False)
    save_figure(fig7_figure(table.rename(columns={"run": "method"}), spans["schedule"]), args.out, "bupo_stories_fig7",
                formats=("png",))
    for name, span_list in spans.items():
        if span_list:
            top = span_list[-1].layer
            save_figure(fig5_figure(table[table["run"] == name], top, span_list,
                                    title=f"{name} on stories260K, k = {top} (mean ± sd over seeds)"),
                        args.out, f"bupo_stories_fig5_{name}", formats=("png",))
    context = {"k": k, "k_low": args.extra_k, "n_layers": describe(model).n_layers, "n_probe": len(probe),
               "seconds": time.perf_counter() - started}
    text = report(table, runs, spans, args, context)
    (args.out / "bupo_stories.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
