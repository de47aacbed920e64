"""`internal-policy ablate`: how much the model's own prediction changes when each module's write is removed.

Writes OUT/ablation.csv (one row per layer × component [× head]) and OUT/run.json; `--plot` draws
OUT/figures/ablation.{png,pdf}, aligned with the ΔH_FFN curve and EIC stages of `--profile RUN` (a
profile run of the same records and model). To redraw with another profile, run the same command
again with `--resume --plot --profile RUN`: a finished run recomputes nothing.
"""

from __future__ import annotations

import argparse
from importlib import resources

from .options import add_chat_options, add_model_options, add_run_options


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `ablate` subcommand."""
    from ..ablate import COMPONENTS, MODES

    p = sub.add_parser("ablate", help="Δ NLL / Δ entropy of the model's output when each module's write is removed",
                       description="Zero- or mean-ablate each attention, FFN (or attention-head) write and measure the "
                                   "model's own output at the kept positions against the unablated run; writes "
                                   "ablation.csv and run.json.")
    add_model_options(p, dtype_help="the checkpoint's (output statistics are fp32 anyway)")
    p.add_argument("--input", default=None, help="records, as for `profile` (default: bundled sample stories)")
    p.add_argument("--split", default=None, help="split of a saved HF DatasetDict")
    add_chat_options(p)
    p.add_argument("--out", required=True, help="run folder to write (created; --resume continues it)")
    p.add_argument("--components", default="attn,ffn",
                   help=f"comma-separated subset of {','.join(COMPONENTS)} (attn_head: one row per head; "
                        "default: attn,ffn)")
    p.add_argument("--layers", default=None, help="paper layers 1..L to ablate, e.g. 1,3,5-8 (default: all)")
    p.add_argument("--mode", choices=MODES, default="zero",
                   help="zero: remove the write; mean: replace it at every position by its mean over the kept tokens")
    p.add_argument("--truncate", action="store_true", help="cut records longer than the context instead of failing")
    p.add_argument("--batch-size", type=int, default=8, help="records per batch (one shard each; default 8)")
    p.add_argument("--copies", type=int, default=None,
                   help="ablated copies of a batch per forward (memory ~ batch size × copies × length; default: as "
                        "many as keep a forward near 4096 token positions)")
    p.add_argument("--plot", action="store_true", help="also draw OUT/figures/ablation.{png,pdf}")
    p.add_argument("--profile", default=None, metavar="RUN",
                   help="with --plot: a profile run of the same records and model, whose ΔH_FFN and EIC stages the "
                        "figure shows")
    add_run_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Ablate, write the table, print the largest effect and where things went; --plot draws the figure."""
    from pathlib import Path

    from transformers.utils import logging as hf_logging

    from ..ablate import AblationSettings, ablate, parse_layers
    from ..errors import InputError
    from ..inputs import read_records
    from ..models import load_model, resolve_device
    from ..settings import csv_list
    from .options import chat_options
    from .profile import SAMPLE_INPUT

    if args.profile is not None and not (Path(args.profile) / "summary.csv").is_file():
        raise InputError(f"--profile {args.profile} is not a finished profile run (no summary.csv); "
                         "run `internal-policy profile` on the same --input first")
    settings = AblationSettings(components=csv_list(args.components),
                                layers=parse_layers(args.layers) if args.layers is not None else None,
                                mode=args.mode, truncate=args.truncate, chat=chat_options(args),
                                batch_size=args.batch_size, copies=args.copies)
    records = read_records(args.input or resources.files("internal_policy") / "assets" / "samples" / SAMPLE_INPUT,
                           split=args.split)
    hf_logging.disable_progress_bar()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=resolve_device(args.device))
    table = ablate(model, tokenizer, records, settings, out_dir=args.out, resume=args.resume,
                   progress=not args.quiet, model_name=args.model or "stories260K (embedded)")
    out = Path(args.out)
    top = table.loc[table["delta_nll"].idxmax()]
    print(f"largest Δ NLL: layer {top.layer} {top.component}"
          + (f" head {int(top['head'])}" if top.component == "attn_head" else "")
          + f" (+{top.delta_nll:.4f} ± {top.delta_nll_se:.4f} nats)")
    print(f"{table.attrs['meta']['n_records']} records, {table.attrs['meta']['n_tokens']} tokens, {len(table)} modules "
          f"-> {out / 'ablation.csv'}, {out / 'run.json'}")
    if args.plot:
        from ..plot import plot_ablation

        paths = plot_ablation(out, args.profile)
        print(f"figure -> {paths[0]}")
    return 0
