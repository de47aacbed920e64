"""`internal-policy branch-points`: reasoning steps, their FCI and the AttnRL branch points of responses."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import (
    CHECKPOINT_DTYPE,
    add_chat_options,
    add_generation_options,
    add_model_options,
    add_run_options,
    chat_options,
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `branch-points` and its options to the subcommands."""
    p = sub.add_parser("branch-points", help="AttnRL: FCI of every reasoning step and the branch points it picks",
                       description="Split prompt/response records into steps, score each step's Forward Context "
                                   "Influence (FCI) from the attention of one pass, pick AttnRL's branch points; "
                                   "writes steps.parquet, run.json and figures.")
    add_model_options(p, dtype_help=CHECKPOINT_DTYPE, seed_help="seed of --generate sampling")
    p.add_argument("--input", required=True,
                   help="prompt/response records: .jsonl ({'prompt','response'}, {'messages'}, token ids), "
                        ".parquet, a saved HF dataset folder, or prompts with --generate")
    p.add_argument("--split", default=None, help="split of a saved HF DatasetDict")
    p.add_argument("--out", required=True, help="run folder to write (created; --resume continues it)")
    p.add_argument("--delta", type=int, default=4, help="Δ: FCI sums attention from steps ≥ k+Δ (published: 4)")
    p.add_argument("--quantile", type=float, default=0.8, help="candidates: FCI at or above this quantile of "
                                                                "the response's step scores (published: 0.8)")
    p.add_argument("--points", type=int, default=2, help="branch points per response (published: 2)")
    p.add_argument("--min-distance", type=int, default=512,
                   help="tokens between chosen steps (published: 512; scale it down for short responses)")
    p.add_argument("--min-start", type=int, default=512,
                   help="earliest absolute token position of a branch point (published: 512)")
    p.add_argument("--step-sep", action="append", default=None, metavar="SEP",
                   help=r"step separator, backslash escapes allowed; repeat for fallbacks tried in order "
                        r"(default: '\n\n' then '\n'; with none found every token is a step)")
    add_chat_options(p, thinking_note="; steps after a '</think>' token always get FCI 0")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--truncate", action="store_true", help="cut records longer than the context instead of failing")
    p.add_argument("--max-figures", type=int, default=50, help="per-record figures to draw (default 50; 0: none)")
    add_generation_options(p, then="score them")
    add_run_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Score the records' steps (sampling them first with --generate), write the run and its figures."""
    from transformers.utils import logging as hf_logging

    from ..attnrl.analysis import branch_points
    from ..attnrl.fci import check_delta
    from ..attnrl.plots import plot_branch_points
    from ..attnrl.select import check_selection
    from ..attnrl.steps import SEPARATORS, unescape
    from ..dist import init
    from ..errors import InputError
    from ..generate import Sampling, generate, pick_engine
    from ..inputs import read_records
    from ..models import default_model_path, load_model, resolve_dtype

    check_delta(args.delta)
    check_selection(args.points, args.quantile, args.min_start, args.min_distance)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    resolve_dtype(args.dtype)  # an unknown name is an InputError before the model loads
    separators = tuple(unescape(s) for s in args.step_sep) if args.step_sep else SEPARATORS
    chat = chat_options(args)
    sampling = Sampling(args.samples, args.temperature, args.top_p, args.max_new_tokens, args.seed)
    if args.generate:
        sampling.check()
        engine = pick_engine(args.engine)
    records = read_records(args.input, split=args.split)
    hf_logging.disable_progress_bar()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=init(args.device))
    if args.generate:
        records = generate(model, tokenizer, records, sampling, chat=chat, engine=engine, out_dir=args.out,
                           batch_size=args.batch_size, model_path=args.model or str(default_model_path()),
                           resume=args.resume, progress=not args.quiet)
    result = branch_points(
        model, tokenizer, records, delta=args.delta, quantile=args.quantile, points=args.points,
        min_distance=args.min_distance, min_start=args.min_start, separators=separators, chat=chat,
        batch_size=args.batch_size, truncate=args.truncate, out_dir=args.out, resume=args.resume,
        progress=not args.quiet, model_name=args.model or "stories260K (embedded)",
    )
    out, meta = Path(args.out), result.meta
    skipped = meta["skipped_one_step_responses"] + meta["skipped_empty_responses"]
    print(f"{meta['n_records']} records, {meta['n_steps']} steps, {meta['n_selected']} branch points -> "
          f"{out / 'steps.parquet'}, {out / 'run.json'}" + (f" ({skipped} sampled responses with < 2 steps skipped)"
                                                            if skipped else ""))
    paths = plot_branch_points(out, out / "figures", max_records=max(args.max_figures, 0))
    print(f"figures -> {out / 'figures'} ({len(paths)} files)")
    return 0
