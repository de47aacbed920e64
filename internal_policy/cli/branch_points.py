"""`internal-policy branch-points`: reasoning steps, their FCI and the AttnRL branch points of responses."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("branch-points", help="AttnRL: FCI of every reasoning step and the branch points it picks",
                       description="Split prompt/response records into steps, score each step's Forward Context "
                                   "Influence (FCI) from the attention of one pass, pick AttnRL's branch points; "
                                   "writes steps.parquet, run.json and figures.")
    p.add_argument("--model", default=None, help="local HF model folder or name (default: embedded stories260K)")
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
    p.add_argument("--thinking", choices=("on", "off"), default=None,
                   help="Qwen3-style chat templates: enable_thinking on/off (default: the template's own); "
                        "steps after a '</think>' token always get FCI 0")
    p.add_argument("--chat-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra chat-template option (VALUE parsed as JSON when it can be); repeatable")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--truncate", action="store_true", help="cut records longer than the context instead of failing")
    p.add_argument("--max-figures", type=int, default=50, help="per-record figures to draw (default 50; 0: none)")
    g = p.add_argument_group("response generation (--generate), as in `profile`")
    g.add_argument("--generate", action="store_true",
                   help="sample responses for each prompt, save them to OUT/responses.jsonl, then score them")
    g.add_argument("-n", "--samples", type=int, default=1, help="responses per prompt")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--seed", type=int, default=0, help="seed of --generate sampling")
    g.add_argument("--engine", choices=("auto", "hf", "vllm"), default="auto",
                   help="auto: vLLM when installed and a GPU is present, else HF generate")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
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
    from .profile import chat_options

    check_delta(args.delta)
    check_selection(args.points, args.quantile, args.min_start, args.min_distance)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        resolve_dtype(args.dtype)
    except ValueError as err:
        raise InputError(str(err)) from None
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
