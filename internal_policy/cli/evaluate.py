"""`internal-policy evaluate`: Avg@n, unbiased Pass@K and Maj@K on the shipped benchmarks or any prompt set."""

from __future__ import annotations

import argparse

from ..bupo.rewards import SCORERS
from ..inputs import BENCHMARKS
from .options import add_model_options

OUTPUTS = ("scores.parquet", "table.csv", "pass_at_k.png", "pass_at_k.pdf")
"""What `evaluate` writes into --out; a folder already holding any of them is refused (nothing is overwritten)."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    """Add `evaluate` and its options to the subcommands."""
    p = sub.add_parser("evaluate", help="Avg@K / Pass@K / Maj@K with a boxed-answer checker",
                       description="Sample n completions per problem (temperature 1, top_p 1), check the last "
                                   "\\boxed{} answer, write scores.parquet, table.csv, pass_at_k.png/.pdf.")
    add_model_options(p, dtype_help="bfloat16 on a GPU that supports it, float32 on CPU",
                      seed_help="sampling seed (batch i uses seed + i)")
    p.add_argument("--data", nargs="+", default=list(BENCHMARKS),
                   help=f"benchmark names ({', '.join(BENCHMARKS)}) or .parquet/.jsonl prompt sets with 'prompt' "
                        "and 'answer'")
    p.add_argument("--out", required=True)
    p.add_argument("-n", "--samples", type=_positive, default=16,
                   help="samples per problem (paper: 16 / 32, Pass@K n=300)")
    p.add_argument("--limit", type=_positive, help="first N problems of each set (quick checks; default: all)")
    p.add_argument("--scorer", choices=tuple(SCORERS), default="math-verify",
                   help="math-verify (symbolic equivalence) or official (the official code's last \\boxed{} + "
                        "normalised string equality, comparable with the paper's numbers)")
    p.add_argument("--max-new-tokens", type=_positive, default=3072)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=_positive, default=16)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Sample and score every problem of the prompt sets, write the tables and the Pass@K figure."""
    from pathlib import Path

    from ..bupo.data import load_prompts, require_answers
    from ..bupo.evaluate import evaluate, pass_at_k_curve, summarize
    from ..bupo.plots import pass_at_k_figure
    from ..errors import InputError
    from ..models import load_model, resolve_device
    from ..plot import save_figure
    from ..runs import writable_dir
    from .options import auto_dtype

    sets = {Path(str(d)).stem: load_prompts(d) for d in args.data}
    for name, frame in sets.items():
        require_answers(frame, name)  # before loading the model
    out = writable_dir(args.out)  # fail now, not after sampling
    held = [name for name in OUTPUTS if (out / name).exists()]
    if held:
        raise InputError(f"--out {out} already holds {', '.join(held)}; give a new folder (nothing is overwritten)")
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, dtype=auto_dtype(args.dtype, device), device=device)
    scores = evaluate(model, tokenizer, sets, args.samples, limit=args.limit, scorer=args.scorer,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                      batch_size=args.batch_size, seed=args.seed)
    scores.to_parquet(out / "scores.parquet", index=False)
    table = summarize(scores)
    table.to_csv(out / "table.csv", index=False)
    figures = save_figure(pass_at_k_figure({args.model or "stories260K": pass_at_k_curve(scores)}), out, "pass_at_k")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    print(f"-> {out / 'table.csv'}, {out / 'scores.parquet'}, {', '.join(str(p) for p in figures)}")
    return 0
