"""TRL's chunked log-prob kernel against `entropy.Decoder` for per-row entropy of a bf16 model.

`trl.kernels.ChunkedLogProbFunction` (TRL 1.16: `apply(hidden, weight, bias, targets, temperature,
chunk_size, final_logit_softcapping, logit_scale, outputs)`) returns, besides the target log-prob,
the per-row entropy of softmax(hidden·Wᵀ + b) for any hidden rows, chunked over the vocabulary with
an online log-sum-exp, on CPU (torch ops) and GPU (Triton). Its forward computes each logits tile in
the inputs' dtype: bf16 logits for a bf16 model. This script measures, on the same rows:
- the error of each method against a float64 full softmax: on the embedded stories260K model
  (trained; raw H_l of every layer, the package's readout) cast to bf16, and on a random
  Qwen3-0.6B-shaped unembedding (d = 1024, |V| = 151,936) with rows scaled to give entropies
  across 0..ln|V|;
- the CPU time of each on the Qwen3-0.6B shape, interleaved over rounds (median ratio, min-max).

Methods: `package` = Decoder.entropy (bf16 weights upcast to fp32 on CPU; fp32-output matmuls on
CUDA); `trl-bf16` = TRL with the bf16 tensors as given; `trl-fp32` = TRL on fp32 copies (what the
package would have to pass to get fp32 tiles). Last line: `trl_bf16_max_err=E trl_fp32_max_err=E
package_max_err=E trl_bf16_time_ratio=R trl_fp32_time_ratio=R` (ratios = TRL time / package time).

    HF_HUB_OFFLINE=1 python bench/trl_entropy.py [--rows 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from trl.kernels import ChunkedLogProbFunction  # noqa: E402

from internal_policy.capture import extract  # noqa: E402
from internal_policy.entropy import Decoder  # noqa: E402
from internal_policy.models import describe, load_model  # noqa: E402

CHUNK = 1024  # vocabulary entries per tile for both (the package's CPU default)


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Float64 full-softmax entropy of the bf16 values as stored."""
    logp = torch.log_softmax(x.double() @ w.double().T, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def methods(w: torch.Tensor) -> dict:
    """name -> function(rows) -> per-row entropy, for a bf16 unembedding w."""
    decoder = Decoder(w, vocab_chunk=CHUNK)
    targets = {}

    def trl(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        y = targets.setdefault(len(x), torch.zeros(len(x), dtype=torch.long))
        return ChunkedLogProbFunction.apply(x, weight, None, y, 1.0, CHUNK, None, 1.0, ("entropy",))[1]

    w32 = w.float()
    return {"package": decoder.entropy, "trl-bf16": lambda x: trl(x, w), "trl-fp32": lambda x: trl(x.float(), w32)}


def errors(x: torch.Tensor, w: torch.Tensor) -> dict[str, float]:
    ref = reference(x, w)
    with torch.no_grad():
        return {name: (fn(x).double() - ref).abs().max().item() for name, fn in methods(w).items()}


def stories_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """Raw H_l of every layer of stories260K on one sample sentence, and its unembedding, in bf16."""
    model, tok = load_model(dtype="bfloat16")
    spec = describe(model)
    ids = torch.tensor([tok("Once upon a time, there was a little girl who loved her red ball.")["input_ids"]])
    found = extract(model, ids, components=("layer",), spec=spec)
    rows = torch.cat([found[(layer, "layer")][0] for layer in range(spec.n_layers + 1)])
    return rows, spec.unembed_weight.detach()


def qwen_shape(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A Qwen3-0.6B-shaped bf16 unembedding and rows of norms 1..300 (entropies from near 0 to near ln|V|)."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(151936, 1024, generator=g) * 0.02).bfloat16()
    x = torch.randn(rows, 1024, generator=g)
    x = x / x.norm(dim=1, keepdim=True) * torch.logspace(0, 2.5, rows)[:, None]
    return x.bfloat16(), w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256, help="rows of the Qwen3-0.6B-shaped timing problem")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, TRL ChunkedLogProbFunction on CPU")
    err = {}
    for what, (x, w) in {"stories260K bf16 (raw H_0..H_5)": stories_rows(),
                         f"Qwen3-0.6B shape, {args.rows} rows": qwen_shape(args.rows)}.items():
        found = errors(x, w)
        print(f"{what}: max |H - H_float64| nats: " + ", ".join(f"{k} {v:.2e}" for k, v in found.items()))
        for k, v in found.items():
            err[k] = max(err.get(k, 0.0), v)
    x, w = qwen_shape(args.rows)
    fns = methods(w)
    with torch.no_grad():
        for fn in fns.values():  # warm-up
            fn(x[:8])
        rounds = []
        for _ in range(args.rounds):  # interleaved: a neighbour's load hits every method of a round alike
            seconds = {}
            for name, fn in fns.items():
                began = time.perf_counter()
                fn(x)
                seconds[name] = time.perf_counter() - began
            rounds.append(seconds)
            print("round: " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()))
    ratio = {k: [r[k] / r["package"] for r in rounds] for k in ("trl-bf16", "trl-fp32")}
    for k, v in ratio.items():
        print(f"{k} time / package time: median {statistics.median(v):.2f} (min {min(v):.2f}, max {max(v):.2f})")
    print(f"trl_bf16_max_err={err['trl-bf16']:.2e} trl_fp32_max_err={err['trl-fp32']:.2e} "
          f"package_max_err={err['package']:.2e} trl_bf16_time_ratio={statistics.median(ratio['trl-bf16']):.2f} "
          f"trl_fp32_time_ratio={statistics.median(ratio['trl-fp32']):.2f}")


if __name__ == "__main__":
    main()
