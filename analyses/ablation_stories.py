"""Do the modules a profile calls important matter to the output? Module ablation on stories260K and a tiny model.

Records: `--n` continuations of `--length` tokens sampled (seed 0, temperature 1) from stories260K for
each of 32 story openings, scored at the response positions (prompt + response convention). The same
records go to both models:
  stories260K   the embedded model (Llama, L = 5, 8 heads, |V| = 512);
  tiny-random   a random-weight Llama with grouped-query attention (L = 6, d = 64, 4 heads / 2 KV
                heads, same tokenizer, initializer_range 0.2): a null reference with no learned function.
Per model: a profile (ΔH_ATTN, ΔH_FFN per layer, EIC stages) and zero- and mean-ablation of every
attention, FFN and attention-head write (`internal_policy.ablate`), Δ NLL / Δ output entropy ± se
over tokens. The question: do exploration-stage FFNs matter more to the output (Δ NLL when removed)
than their ΔH_FFN suggests? Compared per layer: the share of the FFNs' summed Δ NLL against the share
of their summed |ΔH_FFN|, and the Spearman rank correlation of the two across layers.

Writes analyses/ablation_stories.md (every number in it is computed here), ablation_stories.png
(stories260K, zero-ablation, aligned with its profile), ablation_stories_tiny.png and
ablation_stories.csv (both models, both modes). Run (a few minutes on 2 cores):
HF_HUB_OFFLINE=1 PYTHONPATH=$PWD python analyses/ablation_stories.py
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).parent

from analyses.attnrl_stories import OPENINGS  # noqa: E402 (the same 32 story openings)


def tiny_model():
    """A seeded random-weight GQA Llama sharing stories260K's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def analyse(name, model, tok, records, progress):
    """Profile + zero/mean ablation of one model: (ablation tables by mode, profile summary, stages)."""
    from internal_policy import ablate, profile
    from internal_policy.stages import stages_from_summary

    summary = profile(model, tok, records, components=("layer", "attn", "ffn"), keep_tokens=False,
                      progress=progress).summary
    tables = {mode: ablate(model, tok, records, components=("attn", "ffn", "attn_head"), mode=mode,
                           progress=progress).assign(model=name, mode=mode) for mode in ("zero", "mean")}
    return tables, summary, stages_from_summary(summary)


def per_layer(tables, summary, stages) -> pd.DataFrame:
    """One row per layer: profile ΔH, stage, and the ablation deltas of A_l and F_l in both modes."""
    d = summary[summary["component"].isin(["attn", "ffn"])].pivot(index="layer", columns="component", values="delta")
    out = pd.DataFrame({"stage": [stages.stage_of(int(l)) for l in d.index], "dH_attn": d["attn"], "dH_ffn": d["ffn"]},
                       index=d.index)
    for mode, table in tables.items():
        for comp in ("attn", "ffn"):
            rows = table[table["component"] == comp].set_index("layer")
            out[f"{mode}_{comp}_dnll"] = rows["delta_nll"]
            out[f"{mode}_{comp}_dnll_se"] = rows["delta_nll_se"]
            out[f"{mode}_{comp}_dent"] = rows["delta_entropy"]
    for mode in tables:
        out[f"{mode}_ffn_nll_share"] = out[f"{mode}_ffn_dnll"] / out[f"{mode}_ffn_dnll"].sum()
    out["ffn_dH_share"] = out["dH_ffn"].abs() / out["dH_ffn"].abs().sum()
    return out


def spearman(a: pd.Series, b: pd.Series) -> float:
    return float(a.rank().corr(b.rank()))


def heads_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per layer: the summed Δ NLL of the single-head ablations against the whole attention ablation, top head."""
    heads = table[table["component"] == "attn_head"]
    attn = table[table["component"] == "attn"].set_index("layer")["delta_nll"]
    top = heads.loc[heads.groupby("layer")["delta_nll"].idxmax()].set_index("layer")
    return pd.DataFrame({"sum_heads": heads.groupby("layer")["delta_nll"].sum(), "attn": attn,
                         "top_head": top["head"].astype(int), "top_dnll": top["delta_nll"],
                         "top_se": top["delta_nll_se"]})


def fmt(x: float, se: float | None = None) -> str:
    return f"{x:+.3f}" + (f" ± {se:.3f}" if se is not None else "")


def layer_table(name: str, df: pd.DataFrame) -> list[str]:
    lines = [f"### {name}", "",
             "| layer | stage | ΔH_ATTN | ΔH_FFN | Δ NLL, zero A_l | Δ NLL, zero F_l | Δ NLL, mean A_l | "
             "Δ NLL, mean F_l | "
             "Δ H_out, zero F_l | share of FFN Δ NLL (zero) | share of FFN abs(ΔH) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for layer, r in df.iterrows():
        lines.append(f"| {layer} | {r.stage} | {r.dH_attn:+.3f} | {r.dH_ffn:+.3f} | "
                     f"{fmt(r.zero_attn_dnll, r.zero_attn_dnll_se)} | {fmt(r.zero_ffn_dnll, r.zero_ffn_dnll_se)} | "
                     f"{fmt(r.mean_attn_dnll, r.mean_attn_dnll_se)} | {fmt(r.mean_ffn_dnll, r.mean_ffn_dnll_se)} | "
                     f"{r.zero_ffn_dent:+.3f} | {r.zero_ffn_nll_share:.2f} | {r.ffn_dH_share:.2f} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2, help="continuations per opening")
    parser.add_argument("--length", type=int, default=128, help="tokens per continuation")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    from internal_policy import Sampling, generate, load_model
    from internal_policy.plot import Run, ablation_figure, save_figure

    started = time.perf_counter()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tok = load_model()
    records = generate(model, tok, [{"id": str(i), "prompt": p} for i, p in enumerate(OPENINGS)],
                       Sampling(args.n, 1.0, 1.0, args.length, seed=0), progress=args.progress)
    models = {"stories260K": model, "tiny-random": tiny_model()}
    results = {}
    for name, m in models.items():
        tables, summary, stages = analyse(name, m, tok, records, args.progress)
        results[name] = (tables, summary, stages, per_layer(tables, summary, stages))
        fig = ablation_figure(tables["zero"], Run(summary, label=name, stages=stages), label=name)
        save_figure(fig, HERE, "ablation_stories" if name == "stories260K" else "ablation_stories_tiny",
                    formats=("png",))
    pd.concat([t for r in results.values() for t in r[0].values()]).to_csv(HERE / "ablation_stories.csv", index=False)
    n_tokens = int(results["stories260K"][0]["zero"]["n_tokens"].iloc[0])
    seconds = time.perf_counter() - started
    write_report(results, args, n_tokens, len(records), seconds)


def write_report(results, args, n_tokens, n_records, seconds) -> None:
    s_tables, s_summary, s_stages, s = results["stories260K"]
    t_tables, _, t_stages, t = results["tiny-random"]
    base = {name: r[0]["zero"].attrs["meta"]["baseline"] for name, r in results.items()}
    rho = {name: (spearman(r[3]["dH_ffn"], r[3]["zero_ffn_dnll"]), spearman(r[3]["dH_ffn"], r[3]["mean_ffn_dnll"]))
           for name, r in results.items()}
    explo = s[s["stage"] == "exploration"]
    ratio = (s["zero_ffn_dnll"] / s["dH_ffn"]).round(3)
    first_half = s.index <= len(s) // 2
    h = heads_summary(s_tables["zero"])
    lines = [
        "# Module ablation on stories260K (and a random tiny model)", "",
        f"Generated by `HF_HUB_OFFLINE=1 PYTHONPATH=$PWD python analyses/ablation_stories.py --n {args.n} --length "
        f"{args.length}` ({seconds / 60:.1f} min on CPU). Every number below is computed by that script; the tables of "
        "both models and modes are in `ablation_stories.csv`.", "",
        f"- Records: {n_records} continuations ({args.n} per opening, {args.length} new tokens, temperature 1, seed 0) "
        f"sampled from stories260K for 32 story openings; {n_tokens} response positions scored (prompt + response "
        "convention). The same token ids go to both models.",
        "- Models: **stories260K** (L = 5, 8 heads) and **tiny-random**, a random-weight Llama with grouped-query "
        "attention (L = 6, d = 64, 4 heads / 2 KV heads, same tokenizer): a null reference without learned function.",
        "- Ablation (`internal_policy.ablate`): each write (A_l, F_l, one head's z_h W_O[h]) replaced by zero, or by "
        "its "
        "mean over the kept positions at every position; Δ NLL of the next token and Δ entropy of the model's own "
        "output against the unablated run, ± 1 se over tokens (paired differences, ddof 1). Unablated: stories260K "
        f"NLL {base['stories260K']['nll']:.3f}, entropy {base['stories260K']['entropy']:.3f} nats; tiny-random NLL "
        f"{base['tiny-random']['nll']:.3f}, entropy {base['tiny-random']['entropy']:.3f} nats "
        f"(ln 512 = {np.log(512):.3f}).",
        f"- Stages: EIC segmentation of each model's profile ΔH_FFN on the same records: stories260K "
        f"{s_stages.spans()}, boundary layer {s_stages.boundary_layer}; tiny-random {t_stages.spans()}, "
        f"boundary layer {t_stages.boundary_layer}.", "",
        "![stories260K: zero-ablation, aligned with its profile](ablation_stories.png)", "",
        "## Per layer", "", *layer_table("stories260K", s), *layer_table("tiny-random", t),
        "## Do exploration-stage FFNs matter more than their ΔH suggests?", "",
        f"- stories260K: {len(explo)} of {len(s)} layers are exploration-stage (ΔH_FFN > 0 at every layer), so the "
        "question can only be asked within the exploration stage: does an FFN's Δ NLL when removed follow its ΔH_FFN?",
        f"- Zero-ablation Δ NLL per unit of ΔH_FFN, layer 1..{len(s)}: {', '.join(f'{v:.3f}' for v in ratio)}. "
        f"Layers 1..{int(first_half.sum())} hold {s.loc[first_half, 'ffn_dH_share'].sum():.2f} of the summed "
        "ΔH_FFN and "
        f"{s.loc[first_half, 'zero_ffn_nll_share'].sum():.2f} of the summed Δ NLL (zero) / "
        f"{s.loc[first_half, 'mean_ffn_nll_share'].sum():.2f} (mean).",
        "- Spearman rank correlation of ΔH_FFN and the FFN's Δ NLL across layers: stories260K "
        f"{rho['stories260K'][0]:+.2f} "
        f"(zero) / {rho['stories260K'][1]:+.2f} (mean), tiny-random {rho['tiny-random'][0]:+.2f} / "
        f"{rho['tiny-random'][1]:+.2f} — over {len(s)} and {len(t)} layers, which is too few points for a test.",
        f"- Within that stage the two do not scale together: from layer 1 to layer {len(s)} ΔH_FFN falls from "
        f"{s['dH_ffn'].iloc[0]:.2f} to {s['dH_ffn'].iloc[-1]:.2f} nats "
        f"({s['dH_ffn'].iloc[0] / s['dH_ffn'].iloc[-1]:.1f}x), "
        f"while the FFN's zero-ablation Δ NLL stays between {s['zero_ffn_dnll'].min():.2f} and "
        f"{s['zero_ffn_dnll'].max():.2f} nats. Read literally: the "
        f"{'early' if ratio.iloc[0] < ratio.iloc[-1] else 'late'} "
        "exploration FFNs matter *less* to the output than their large ΔH suggests, and the late ones more.",
        f"- FFN against attention (stories260K, zero): the FFN's Δ NLL exceeds the attention's at "
        f"{int((s['zero_ffn_dnll'] > s['zero_attn_dnll']).sum())} of {len(s)} layers, although ΔH_ATTN is the larger "
        f"entropy change at {int((s['dH_attn'] > s['dH_ffn']).sum())} of {len(s)} layers.",
        "- Mean- against zero-ablation (stories260K): the largest difference in Δ NLL is "
        + ", ".join(f"{(s[f'mean_{c}_dnll'] - s[f'zero_{c}_dnll']).abs().max():.3f} nats for {c} (layer "
                    f"{int((s[f'mean_{c}_dnll'] - s[f'zero_{c}_dnll']).abs().idxmax())}, "
                    f"{((s[f'mean_{c}_dnll'] - s[f'zero_{c}_dnll']).abs() / s[f'zero_{c}_dnll_se']).max():.1f} se)"
                    for c in ("ffn", "attn"))
        + ": where it is small, the writes' mean over tokens carries little of their effect on the next-token loss.",
        f"- Signs: the raw-decoded ΔH_FFN is positive at every layer (the FFN's output, decoded raw, has a higher "
        f"entropy than its normed input), while removing the FFN raises the output entropy by "
        f"{s['zero_ffn_dent'].min():.2f}–{s['zero_ffn_dent'].max():.2f} nats: the two are entropies of different "
        "distributions (one module's raw decoding, the whole model's output) and need not move together.",
        "",
        "## Heads (stories260K, zero-ablation)", "",
        "| layer | Σ Δ NLL of the single-head ablations | Δ NLL, whole attention | largest head | its Δ NLL |",
        "|---|---|---|---|---|",
        *[f"| {layer} | {r.sum_heads:+.3f} | {r.attn:+.3f} | {int(r.top_head)} | {fmt(r.top_dnll, r.top_se)} |"
          for layer, r in h.iterrows()], "",
        "## What this shows and does not show at this scale", "",
        "- It shows that the tool measures what a profile cannot: the causal effect of a module on the model's own "
        "prediction, per layer and per head, with standard errors, on a model whose stages the profile gives.",
        "- Whether an FFN 'matters more than its ΔH suggests' is read here from the two share columns and the ratio "
        "row above; with 5 layers, all of them exploration-stage, there is no integration or convergence stage to "
        "compare against, so this run cannot test the paper's claim that exploration-stage FFNs are special; it only "
        "says how the effect is spread within one stage.",
        "- ΔH is measured on raw decodings of single modules (no final norm), Δ NLL on the full model's output after "
        "everything downstream has reacted: a module with a small ΔH can matter a lot through later layers and the "
        "other way round, so neither is a proxy for the other by construction.",
        "- Single-head ablations do not add up to the attention ablation (table above): heads interact through the "
        "nonlinear layers above them, so per-head Δ NLL is a local measure, not a decomposition.",
        "- The tiny random model is a null reference: its deltas come from random weights on stories260K's samples, so "
        "their size and sign say nothing about learned circuits (its Δ NLL are within a few se of 0 and of both signs, "
        "so its share column is not meaningful); they show the pipeline on a GQA architecture and how large ablation "
        "effects are without training.",
        "- One seed, one small dataset of a 260K-parameter model: standard errors are over tokens of "
        f"{n_records} correlated continuations, so they understate the uncertainty across inputs.",
        "",
    ]
    (HERE / "ablation_stories.md").write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
