"""`internal-policy profile`: internal-policy entropies of a model over a set of records."""

from __future__ import annotations

import argparse
import os
from importlib import resources
from pathlib import Path

SAMPLE_INPUT = "stories.jsonl"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="entropy of every internal policy (layer, attn, ffn, ...) per token",
                       description="Profile internal-policy entropies; writes summary.csv, tokens.parquet, run.json.")
    p.add_argument("--model", default=None, help="local HF model folder or name (default: embedded stories260K)")
    p.add_argument("--input", default=None, help="JSONL of {'text'} or {'prompt','response'} records "
                                                 "(default: bundled sample stories)")
    p.add_argument("--out", required=True, help="run folder to write (created; --resume continues it)")
    p.add_argument("--final-norm", action="store_true", help="apply the final norm before decoding (logit lens); "
                                                             "default: raw h·W_Uᵀ as in the paper")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (entropy is fp32 anyway)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--components", default=None, help="comma-separated subset of "
                                                       "layer,attn_in,attn,resid_mid,ffn_in,ffn (default: all)")
    p.add_argument("--truncate", action="store_true", help="cut records longer than the context instead of failing")
    p.add_argument("--token-sample", type=float, default=None, help="decode a random fraction of positions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tokens", action="store_true", help="skip tokens.parquet (summary only; for big runs)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--plot", action="store_true", help="also draw the figures into OUT/figures")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def _init_distributed(device: str | None) -> str:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1): join the process group, pick this rank's GPU."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device or ("cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return f"cuda:{local}" if cuda else "cpu"


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from ..data import read_jsonl
    from ..errors import InputError
    from ..models import load_model, resolve_dtype
    from ..profile import check_components, profile

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    components = check_components(args.components.split(",") if args.components else None)
    try:
        resolve_dtype(args.dtype)
    except ValueError as err:
        raise InputError(str(err)) from None
    source = args.input or resources.files("internal_policy") / "assets" / "samples" / SAMPLE_INPUT
    records = read_jsonl(Path(str(source)))
    device = _init_distributed(args.device)
    hf_logging.disable_progress_bar()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    result = profile(
        model, tokenizer, records, components=components, final_norm=args.final_norm,
        batch_size=args.batch_size, truncate=args.truncate, token_sample=args.token_sample, seed=args.seed,
        keep_tokens=not args.no_tokens, out_dir=args.out, resume=args.resume, progress=not args.quiet,
        model_name=args.model or "stories260K (embedded)",
    )
    if result.meta.get("truncated_tokens"):
        print(f"truncated {result.meta['truncated_tokens']} tokens to fit the model's context")
    out = Path(args.out)
    layers = result.summary[result.summary["component"] == "layer"]
    if not layers.empty:
        flow = "  ".join(f"L{int(r.layer)}={r.entropy:.3f}" for r in layers.itertuples())
        print(f"layer entropy (nats, raw decoding{' + final norm' if args.final_norm else ''}): {flow}")
    print(f"{result.meta['n_records']} records, {result.meta['n_tokens']} tokens -> "
          f"{out / 'summary.csv'}, {out / 'run.json'}" + ("" if args.no_tokens else f", {out / 'tokens.parquet'}"))
    if args.plot:
        from ..plot import plot_run

        paths = plot_run(out, out / "figures")
        print(f"figures -> {out / 'figures'} ({len(paths)} files)")
    return 0
