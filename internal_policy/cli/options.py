"""Options shared by the subcommands: one definition each of the model, chat-template and generation options.

`add_model_options` gives --model, --dtype, --device (and --seed where asked). `--dtype auto` means
what the subcommand says in `dtype_help`: for `profile` and `branch-points` the checkpoint's own dtype
(what `models.load_model` does with "auto"), for `train` and `evaluate` `auto_dtype` below (bf16 on a
GPU that supports it, fp32 otherwise: CPU bf16 is slow and lossy). `train` takes --seed from its
config (TrainingArguments' `seed`, same meaning), so it adds the first three only. Choice lists are
the package's own constants (`models.DTYPES`, `generate.ENGINES`), never copies.
"""

from __future__ import annotations

import argparse

from ..generate import ENGINES
from ..models import DTYPES

MODEL_HELP = "local HF model folder or hub name (default: the embedded stories260K)"
DEVICE_HELP = "cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)"
CHECKPOINT_DTYPE = "the checkpoint's own dtype (torch_dtype in its config)"
"""What `--dtype auto` means for the commands that only read a model (`profile`, `branch-points`)."""


def add_model_options(parser: argparse.ArgumentParser, *, dtype_help: str, seed_help: str | None = None,
                      seed_default: int = 0) -> None:
    """Add --model, --dtype (default auto, meaning `dtype_help`), --device and, with `seed_help`, --seed."""
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--dtype", default="auto", help=f"{', '.join(DTYPES)}; auto: {dtype_help}")
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    if seed_help is not None:
        parser.add_argument("--seed", type=int, default=seed_default, help=seed_help)


def auto_dtype(dtype: str, device: str | None) -> str:
    """`--dtype auto` for training/evaluation: bfloat16 on a bf16-capable CUDA device, float32 elsewhere."""
    if dtype != "auto":
        return dtype
    import torch

    cuda = (device or "cuda").startswith("cuda") and torch.cuda.is_available()
    return "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"


def add_chat_options(parser: argparse.ArgumentParser, thinking_note: str = "") -> None:
    """Add --thinking on/off and --chat-option KEY=VALUE (read back with `chat_options`)."""
    parser.add_argument("--thinking", choices=("on", "off"), default=None,
                        help=f"Qwen3-style chat templates: enable_thinking on/off (default: the template's own)"
                             f"{thinking_note}")
    parser.add_argument("--chat-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra chat-template option (VALUE parsed as JSON when it can be); repeatable")


def chat_options(args: argparse.Namespace) -> dict:
    """Chat-template options from --thinking and --chat-option KEY=VALUE."""
    import json

    from ..errors import InputError

    options = {}
    for item in args.chat_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--chat-option expects KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    if args.thinking is not None:
        options["enable_thinking"] = args.thinking == "on"
    return options


def add_generation_options(parser: argparse.ArgumentParser, *, then: str) -> argparse._ArgumentGroup:
    """Add the --generate group (samples, temperature, top-p, max new tokens, engine); return it for more.

    `then` says what the command does with the sampled responses (in --generate's help)."""
    group = parser.add_argument_group("response generation (--generate)")
    group.add_argument("--generate", action="store_true",
                       help=f"sample responses from the model for each prompt, save them to OUT/responses.jsonl, "
                            f"then {then}")
    group.add_argument("-n", "--samples", type=int, default=1, help="responses per prompt")
    group.add_argument("--temperature", type=float, default=1.0, help="paper: 1.0")
    group.add_argument("--top-p", type=float, default=1.0, help="paper: 1.0")
    group.add_argument("--max-new-tokens", type=int, default=512, help="paper's analysis: 3072")
    group.add_argument("--engine", choices=ENGINES, default="auto",
                       help="auto: vLLM when installed and a GPU is present, else HF generate")
    return group


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Add --resume and --quiet (the run folder is --out, which each command describes)."""
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
