"""`internal-policy evaluate`: Avg@n and unbiased Pass@K of a model on the shipped benchmarks or any prompt set."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Avg@K / Pass@K with the boxed-answer checker",
                       description="Sample n completions per problem (temperature 1, top_p 1), check the last "
                                   "\\boxed{} answer with math-verify, write scores.parquet, table.csv, pass_at_k.png.")
    p.add_argument("--model", default=None, help="HF model folder or name (default: embedded stories260K)")
    p.add_argument("--data", nargs="+", default=["math500", "amc2023", "aime_2024", "aime_2025"],
                   help="benchmark names or .parquet/.jsonl prompt sets with 'prompt' and 'answer'")
    p.add_argument("--out", required=True)
    p.add_argument("-n", "--samples", type=int, default=16, help="samples per problem (paper: 16 / 32, Pass@K n=300)")
    p.add_argument("--limit", type=int, help="first N problems of each set (quick checks)")
    p.add_argument("--max-new-tokens", type=int, default=3072)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..bupo.data import load_prompts
    from ..bupo.evaluate import evaluate, pass_at_k_curve, summarize
    from ..bupo.plots import plot_pass_at_k
    from ..models import load_model
    from ..runs import writable_dir

    writable_dir(args.out)  # fail now, not after sampling
    sets = {Path(str(d)).stem: load_prompts(d) for d in args.data}
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    scores = evaluate(model, tokenizer, sets, args.samples, limit=args.limit, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scores.to_parquet(out / "scores.parquet", index=False)
    table = summarize(scores)
    table.to_csv(out / "table.csv", index=False)
    plot_pass_at_k({args.model or "stories260K": pass_at_k_curve(scores)}, out / "pass_at_k.png")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    print(f"-> {out / 'table.csv'}, {out / 'scores.parquet'}, {out / 'pass_at_k.png'}")
    return 0
