"""Cost of AttnRL's FCI pass against one log-prob forward on the same batch, in time and peak memory.

Methods, on one random-weight model and batch:
  `logprob`:     a forward with the model's usual attention (sdpa), then the per-token log-probs of the
                 batch's tokens (logits → log_softmax → gather), as an old-log-prob pass computes them;
  `fci`:         the FCI pass alone: the forward inside `internal_policy.attnrl.step_attention` (the
                 model's eager attention in query blocks, each block's probabilities reduced to step ×
                 step matrices at once), `logits_to_keep=1`, then `.fci()`;
  `fci+logprob`: both in one forward (the published AttnRL code computes FCI alongside its old-log-prob
                 pass; `AttnRLTrainer` runs the FCI pass on its own);
  `forward`:     a plain sdpa forward with `logits_to_keep=1` (the memory baseline of `fci`);
  `eager`:       the same with HF's eager attention (full T × T per layer, no FCI): the reference for
                 the query-blocked design (`--query-block` sets the block; see the FCI module doc).
Times: the methods are interleaved over `--rounds` rounds after a warm-up; each round's ratio to
`logprob` is taken and the median is reported with its min-max. Memory: the peak of `fci` above
`forward` (CPU: a fresh child process per method, peak RSS via VmHWM with glibc's mmap threshold
fixed, as in profile_speed.py; CUDA: max_memory_allocated), at the default size and at twice the
layers: the FCI pass holds one query block of one layer at a time, so it should not grow with layers.
Model: a random Llama (d 512, 8 heads, 8 layers, |V| 32000), 2 × (64 + 960) tokens, steps of 8-48 tokens.
Last line: fci_overhead=R (fci / logprob) fci_overhead_min=.. fci_overhead_max=.. fci_alongside=R2
((fci+logprob) / logprob) extra_mib=X extra_mib_2x_layers=Y
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from profile_speed import _rss_kib  # noqa: E402

from internal_policy.attnrl import fci as fci_module  # noqa: E402
from internal_policy.attnrl.fci import step_attention  # noqa: E402
from internal_policy.attnrl.steps import Steps  # noqa: E402


def build(args):
    """(model, input_ids, steps) for the configured size; weights and steps are seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(args.device).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (args.batch, args.prompt + args.response), generator=gen).to(args.device)
    steps = []
    for _ in range(args.batch):
        bounds, at = [0, args.prompt], args.prompt
        while at < args.prompt + args.response:
            at = min(at + int(torch.randint(8, 49, (1,), generator=gen)), args.prompt + args.response)
            bounds.append(at)
        steps.append(Steps(tuple(zip(bounds[:-1], bounds[1:]))))
    return model, ids, steps


@torch.no_grad()
def logprobs(model, ids) -> torch.Tensor:
    """Per-token log-probs of ids[:, 1:] from one forward."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]


@torch.no_grad()
def forward(model, ids) -> None:
    model(input_ids=ids, use_cache=False, logits_to_keep=1)


def run(method: str, model, ids, steps) -> None:
    if method in ("logprob", "forward"):
        (logprobs if method == "logprob" else forward)(model, ids)
        return
    if method == "eager":
        model.set_attn_implementation("eager")
        forward(model, ids)
        model.set_attn_implementation("sdpa")
        return
    with step_attention(model, steps, ids.shape[1]) as probe:
        (logprobs if method == "fci+logprob" else forward)(model, ids)
    probe.fci()


def timed(method, model, ids, steps, device) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    run(method, model, ids, steps)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_bytes(method, model, ids, steps, device) -> int:
    """Peak memory `method` adds above what is held before it (see module docstring)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(method, model, ids, steps)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (Linux >= 4.0)
    run(method, model, ids, steps)
    return (_rss_kib("VmHWM") - base) * 1024


def child_peak(method: str, *extra: str) -> int:
    """Peak of one method measured in a fresh process of this script (CPU; see profile_speed.peak_in_child)."""
    argv = [sys.executable, __file__, *sys.argv[1:], *extra, "--memory-of", method]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def extra_mib(args, *extra: str) -> float:
    """MiB the FCI pass holds above a plain forward."""
    if args.device.startswith("cuda"):
        sizes = dict(vars(args))
        if extra:
            sizes["layers"] = int(extra[1])
        model, ids, steps = build(argparse.Namespace(**sizes))
        run("fci", model, ids, steps)  # warm-up: lazy allocations out of the measurement
        peaks = {m: peak_bytes(m, model, ids, steps, args.device) for m in ("fci", "forward")}
    else:
        peaks = {m: child_peak(m, *extra) for m in ("fci", "forward")}
    return (peaks["fci"] - peaks["forward"]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=960)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--query-block", type=int, default=fci_module.QUERY_BLOCK, help="most queries per block")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fci_module.QUERY_BLOCK = args.query_block
    model, ids, steps = build(args)
    if args.memory_of:  # child process: one method's peak, as JSON
        print(json.dumps({"peak_bytes": peak_bytes(args.memory_of, model, ids, steps, args.device)}))
        return
    methods = ("logprob", "fci", "fci+logprob", "forward", "eager")
    for method in methods:  # warm-up
        timed(method, model, ids, steps, args.device)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.rounds):  # interleaved, so drift hits all alike
        for method in methods:
            times[method].append(timed(method, model, ids, steps, args.device))
    ratio = {m: [t / base for t, base in zip(times[m], times["logprob"])] for m in methods[1:3]}
    n_steps = sum(s.n_steps for s in steps)
    print(f"model: llama d=512, {args.layers} layers, |V|=32000; batch {args.batch} x ({args.prompt}+{args.response}) "
          f"tokens, {n_steps} steps; query blocks of {args.query_block}; device {args.device}, "
          f"{torch.get_num_threads()} threads")
    print("median ms over", args.rounds, "rounds:", "   ".join(f"{m} {statistics.median(times[m]) * 1e3:.1f}"
                                                           for m in methods))
    base = extra_mib(args)
    doubled = extra_mib(args, "--layers", str(2 * args.layers))
    print(f"FCI pass memory above a plain forward: {base:.1f} MiB ({args.layers} layers), "
          f"{doubled:.1f} MiB ({2 * args.layers} layers)")
    fci, alongside = ratio["fci"], ratio["fci+logprob"]
    print(f"fci_overhead={statistics.median(fci):.3f} fci_overhead_min={min(fci):.3f} fci_overhead_max={max(fci):.3f} "
          f"fci_alongside={statistics.median(alongside):.3f} extra_mib={base:.1f} extra_mib_2x_layers={doubled:.1f}")


if __name__ == "__main__":
    main()
