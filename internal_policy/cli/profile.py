"""`internal-policy profile`: statistics of every internal policy of a model over a set of records.

The options of what is computed are generated from `ProfileSettings` (one flag per field); this
module adds the inputs, the model, generation and output options.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from ..bupo.rewards import SCORERS
from ..inputs import BENCHMARKS
from ..settings import ProfileSettings
from .options import (
    CHECKPOINT_DTYPE,
    add_chat_options,
    add_generation_options,
    add_model_options,
    add_run_options,
    chat_options,
)

SAMPLE_INPUT = "stories.jsonl"


def register(sub: argparse._SubParsersAction) -> None:
    """Add `profile` and its options to the subcommands."""
    p = sub.add_parser("profile", help="entropy (and more statistics) of every internal policy per token",
                       description="Profile internal policies (entropy, Rényi, NLL, rank, KL to the output, top-k); "
                                   "writes summary.csv, records.parquet, tokens.parquet, run.json.")
    add_model_options(p, dtype_help=f"{CHECKPOINT_DTYPE}; entropy is accumulated in fp32 whatever the dtype")
    p.add_argument("--input", default=None,
                   help="records: .jsonl ({'text'}, {'prompt','response'}, {'messages'}), .parquet, a saved HF "
                        f"dataset folder, a plain text file (one record per paragraph), or a shipped benchmark "
                        f"({', '.join(BENCHMARKS)}); default: bundled sample stories")
    p.add_argument("--split", default=None, help="split of a saved HF DatasetDict")
    add_chat_options(p)
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template to use instead of the tokenizer's (e.g. for a base model)")
    p.add_argument("--out", required=True, help="run folder to write (created; --resume continues it)")
    p.add_argument("--device-map", default=None, help="'auto' spreads a model too big for one GPU over all GPUs "
                                                     "(accelerate); overrides --device")
    ProfileSettings.add_arguments(p.add_argument_group("what to compute (ProfileSettings)"))
    g = add_generation_options(p, then="profile them (re-profile later with --input OUT/responses.jsonl)")
    g.add_argument("--scorer", choices=tuple(SCORERS), default="math-verify",
                   help="answer checker for records with a gold answer (answer, reward_model.ground_truth, solution): "
                        "each response gets `correct` 0/1; math-verify is symbolic, official the paper code's rule")
    g.add_argument("--gen-batch-size", type=int, default=None,
                   help="rows per generation batch (default: --batch-size; 256 with vLLM)")
    add_run_options(p)
    p.add_argument("--plot", action="store_true", help="also draw the figures into OUT/figures")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Profile the records (sampling them first with --generate) into --out and report what was written."""
    from transformers.utils import logging as hf_logging

    from .. import dist
    from ..generate import Sampling, generate, pick_engine
    from ..inputs import read_records
    from ..models import default_model_path, load_model, resolve_dtype
    from ..profile import profile

    settings = ProfileSettings.from_args(args, chat=chat_options(args))
    resolve_dtype(args.dtype)  # an unknown name is an InputError before the model loads
    sampling = Sampling(args.samples, args.temperature, args.top_p, args.max_new_tokens, settings.seed)
    if args.generate:
        sampling.check()
        engine = pick_engine(args.engine)
    records = read_records(args.input or resources.files("internal_policy") / "assets" / "samples" / SAMPLE_INPUT,
                           split=args.split)
    device = dist.init(args.device)
    hf_logging.disable_progress_bar()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device, device_map=args.device_map)
    if args.chat_template:
        tokenizer.chat_template = Path(args.chat_template).read_text(encoding="utf-8")
    if args.generate:
        records = generate(model, tokenizer, records, sampling, chat=settings.chat, engine=engine, out_dir=args.out,
                           batch_size=args.gen_batch_size or (256 if engine == "vllm" else settings.batch_size),
                           model_path=args.model or str(default_model_path()), resume=args.resume,
                           progress=not args.quiet, scorer=args.scorer)
    result = profile(model, tokenizer, records, settings, out_dir=args.out, resume=args.resume,
                     progress=not args.quiet, model_name=args.model or "stories260K (embedded)")
    if dist.rank_world()[0] == 0:
        _report(result, args)
    return 0


def _report(result, args: argparse.Namespace) -> None:
    """What the run wrote, the layer-entropy flow in one line, and the figures with --plot."""
    out = Path(args.out)
    if args.generate:
        skipped = result.meta.get("skipped_empty_responses", 0)
        print(f"responses -> {out / 'responses.jsonl'}" + (f" ({skipped} empty ones not profiled)" if skipped else ""))
    if result.meta.get("truncated_tokens"):
        print(f"truncated {result.meta['truncated_tokens']} tokens to fit the model's context")
    layers = result.summary[result.summary["component"] == "layer"]
    if not layers.empty:
        flow = "  ".join(f"L{int(r.layer)}={r.entropy:.3f}" for r in layers.itertuples())
        print(f"layer entropy (nats, raw decoding{' + final norm' if result.meta['final_norm'] else ''}): {flow}")
    if result.groups is not None:
        field = result.meta["group_by"]
        counts = result.records.drop_duplicates("record_id")[field].astype(str).value_counts(sort=False)
        print(f"--group-by {field}: " + ", ".join(f"{value}: {n} records" for value, n in counts.items()))
    print(f"{result.meta['n_records']} records, {result.meta['n_tokens']} tokens -> "
          f"{out / 'summary.csv'}, {out / 'records.parquet'}, {out / 'run.json'}"
          + (f", {out / 'tokens.parquet'}" if result.meta["keep_tokens"] else ""))
    if args.plot:
        from ..plot import plot_run

        paths = plot_run(out, out / "figures")
        print(f"figures -> {out / 'figures'} ({len(paths)} files)")
