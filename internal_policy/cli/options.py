"""Options shared by the subcommands that load a model: one definition of --model, --dtype, --device, --seed.

`train` takes --seed from its config (TrainingArguments' `seed`, same meaning), so it adds the first
three only. `auto_dtype` is what `--dtype auto` means for training and evaluation: bf16 on a GPU that
supports it, fp32 otherwise (CPU bf16 is slow and lossy).
"""

from __future__ import annotations

import argparse

MODEL_HELP = "local HF model folder or hub name (default: the embedded stories260K)"
DEVICE_HELP = "cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)"


def add_model_options(parser: argparse.ArgumentParser, *, dtype_help: str, seed_help: str | None = None,
                      seed_default: int = 0) -> None:
    """Add --model, --dtype (default auto, meaning `dtype_help`), --device and, with `seed_help`, --seed."""
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--dtype", default="auto", help=f"auto, float32, bfloat16, float16; auto: {dtype_help}")
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

