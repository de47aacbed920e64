"""Profiling speed, memory and agreement: the official visualisation method against this package.

In one process, on the same random-weight model, tokens and device, this times
  (a) `official`: the method of the BuPO repository's `visualization/plot_internal_entropy.py`,
      re-implemented from that script's aggregation: fp32 model, eager
      attention with `output_attentions` and `output_hidden_states`, one sample at a time, hooks
      copying every activation to the CPU, then per module one `lm_head` call with a full softmax
      and log_softmax for its input and one for its output (so H_{l-1} is decoded twice), plus the
      final logits' entropy;
  (b) `engine`: the per-site path: `capture` streaming each tensor (kept positions gathered) into
      `Decoder.entropy`, each unique tensor decoded on its own, batched, `logits_to_keep=1`;
  (c) `profile`: `internal_policy.profile.profile(...)`, the public API (in memory, per-token
      table): every site of a token chunk stacked into one matmul per vocabulary chunk, H_l's logits
      summed from H_{l-1}, A_l and F_l (raw fp32 decoding is linear);
  (d) `profile-all`: the same with `stats=["all"]` (entropy, renyi2, nll, rank, kl_out, top1_agree);
  (e) `six-linear` / `six-plain`: `profile` with all six components, with and without the sums.
(a)-(d) decode the sites the official method reports (layer, attn_in, attn, ffn_in, ffn) and keep
the same positions (those predicting a response token), so the entropies can be compared one by one.
Records carry token ids as text through a pass-through tokenizer: the model has random weights and
no vocabulary, and both methods then see identical tokens.

The methods run interleaved, one after another within each of `--rounds` rounds (default 3), and
every ratio is taken within a round and reported as the median over rounds with its min-max: a
neighbour's load on a shared machine then lands on all methods of a round rather than on one. The
matmul reference rate is measured inside each round too.

Reported: tokens/s of each method; the speedup of `profile` over `official`; the fraction of the
unembedding roofline, i.e. (decodings x 2*d*|V| FLOPs) / elapsed time over the rate of one large
`torch.mm` of the decoder's shape class (every decoding counted as a full matmul, also those the
linear path replaces by a sum); the time of all scalar statistics over entropy alone; the speed of
the linear path over the plain path with all six components (and their largest per-token entropy
difference); peak memory of each method (CUDA: `max_memory_allocated` above what was allocated
before; CPU: a fresh child process per method, peak RSS (VmHWM, reset through
/proc/self/clear_refs) above the RSS after building the model); the extra peak of the per-site
engine over a plain forward pass at 2x tokens and 2x layers; and the peak of `stats.decode` with
all statistics above its inputs (the held rows) at 2x tokens and 2x sites: decoding memory that
grows with neither.

The last line is `speedup=X roofline=Y peak_mem_ratio=Z stats_ratio=S linear_speedup=P`
(peak_mem_ratio = official peak / profile peak; stats_ratio = profile-all / profile time).
Run: `python bench/profile_speed.py` (CPU, d=512, 8 layers, |V|=32000),
`python bench/profile_speed.py --shape qwen3-0.6b` (CPU, d=1024, 28 layers, |V|=151936, 64 kept
tokens in one batch) or `python bench/profile_speed.py --device cuda --shape qwen3-8b` (bf16
package vs fp32 official).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from internal_policy.capture import COMPONENTS as ALL_SIX  # noqa: E402
from internal_policy.capture import capture  # noqa: E402
from internal_policy.entropy import Decoder  # noqa: E402
from internal_policy.models import ModelSpec, describe  # noqa: E402
from internal_policy.profile import profile  # noqa: E402
from internal_policy.stats import decode, resolve  # noqa: E402

SHAPES = {
    "small": dict(arch="llama", hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                  intermediate_size=1408, vocab_size=32000),
    "qwen3-0.6b": dict(arch="qwen3", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936),
    "qwen3-8b": dict(arch="qwen3", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936),
}
LENGTHS = {"small": (3, 64, 320), "qwen3-0.6b": (1, 16, 64), "qwen3-8b": (8, 256, 1024)}
"""Default (samples, prompt tokens, response tokens) per shape."""
COMPONENTS = ("layer", "attn_in", "attn", "ffn_in", "ffn")
"""The sites the official method reports; both package paths decode exactly these."""
METHODS = ("official", "engine", "profile", "profile-all", "six-linear", "six-plain")
PROFILE_OPTIONS = {"profile": dict(components=COMPONENTS), "profile-all": dict(components=COMPONENTS, stats=["all"]),
                   "six-linear": dict(components=ALL_SIX), "six-plain": dict(components=ALL_SIX, linear=False)}
"""`profile` calls of the package methods (same tokens, batch size and device)."""


class IdTokenizer:
    """Pass-through tokenizer: text is space-separated token ids (so both methods see the same ids)."""

    pad_token_id = eos_token_id = unk_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


def build_models(shape: str, device: str, layers: int | None = None,
                 reference_needed: bool = True) -> tuple[torch.nn.Module | None, torch.nn.Module]:
    """(official fp32 model, package model): the same weights; the package's is bf16 on CUDA.
    `reference_needed=False` builds only the package model on CUDA (memory children of package
    methods: the weights' values do not matter there, and a 2x-layer fp32 copy would not fit)."""
    import transformers as tf

    params = dict(SHAPES[shape])
    if layers:
        params["num_hidden_layers"] = layers
    config_cls = {"llama": tf.LlamaConfig, "qwen3": tf.Qwen3Config}[params.pop("arch")]
    config = config_cls(**params, tie_word_embeddings=False, max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device(device):
        if device != "cpu" and not reference_needed:
            return None, tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        reference = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        if device == "cpu":
            return reference, reference  # CPU: fp32 for both (CPU bf16 matmuls are slow, not a fair package setting)
        package = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    package.load_state_dict(reference.state_dict())
    return reference, package


def make_samples(args, vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(1, vocab, (args.prompt + args.response,), generator=gen) for _ in range(args.samples)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def full_softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The official per-module readout: softmax and log_softmax of the full logits, then -Σ p log p."""
    probs = torch.softmax(logits, dim=-1)
    log_probs = torch.log_softmax(logits, dim=-1)
    return -(probs * log_probs).sum(dim=-1)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def official(model, samples: list[torch.Tensor], start: int, device: str) -> dict:
    """The official method, one sample at a time; returns {(layer, component): per-token entropies}."""
    spec = describe(model)
    saved: dict[tuple[int, str], dict] = {}
    handles = []
    for i, block in enumerate(spec.layers):
        def on_block(_m, args, kwargs, out, i=i, block=block):
            h = args[0] if args else kwargs["hidden_states"]
            saved.setdefault((i, "attn"), {})["input"] = block.input_layernorm(h).detach().cpu()
            saved[(i, "layer")] = {"input": h.detach().cpu(), "output": _first(out).detach().cpu()}

        def on_attn(_m, _a, out, i=i):
            saved.setdefault((i, "attn"), {})["output"] = _first(out).detach().cpu()

        def on_mlp(_m, args, out, i=i):
            saved[(i, "ffn")] = {"input": args[0].detach().cpu(), "output": _first(out).detach().cpu()}

        handles += [block.register_forward_hook(on_block, with_kwargs=True),
                    block.self_attn.register_forward_hook(on_attn), block.mlp.register_forward_hook(on_mlp)]
    site = {("attn", "input"): (1, "attn_in"), ("attn", "output"): (1, "attn"), ("ffn", "input"): (1, "ffn_in"),
            ("ffn", "output"): (1, "ffn"), ("layer", "input"): (0, "layer"), ("layer", "output"): (1, "layer")}
    found, rows = defaultdict(list), []
    model.set_attn_implementation("eager")
    try:
        for ids in samples:
            saved.clear()
            out = model(ids[None].to(device), output_attentions=True, output_hidden_states=True, use_cache=False)
            kept = slice(start, ids.shape[0] - 1)
            found["final"].append(full_softmax_entropy(out.logits[0, kept]).cpu())
            del out
            for (i, kind), acts in saved.items():
                pair = {}
                for io in ("input", "output"):
                    x = acts[io][0, kept].to(device)
                    pair[io] = full_softmax_entropy(model.lm_head(x)).cpu()
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
                    offset, component = site[(kind, io)]
                    key = (i + offset, component)
                    if key not in found or len(found[key]) < len(found["final"]):
                        found[key].append(pair[io])
                rows += [{"module": f"layer_{i}_{kind}", "position": p, "input_entropy": float(a),
                          "output_entropy": float(b), "entropy_change": float(b - a)}
                         for p, (a, b) in enumerate(zip(pair["input"], pair["output"]))]
    finally:
        model.set_attn_implementation("sdpa")
        for handle in handles:
            handle.remove()
    return {key: torch.cat(parts) for key, parts in found.items()}


@torch.no_grad()
def engine(model, samples: list[torch.Tensor], start: int, device: str, batch_size: int) -> dict:
    """This package's engine: capture → gather kept rows → Decoder.entropy, each unique tensor once."""
    spec = describe(model)
    decoder = Decoder.from_spec(spec)
    found = defaultdict(list)
    for first in range(0, len(samples), batch_size):
        ids = torch.stack(samples[first : first + batch_size]).to(device)
        width = ids.shape[1]
        index = torch.cat([row * width + torch.arange(start, width - 1) for row in range(ids.shape[0])]).to(device)

        def on_tensor(layer, component, x, alias, index=index):
            if component in COMPONENTS:
                rows = x.reshape(-1, x.shape[-1]).index_select(0, index) if alias is None else None
                found[(layer, component)].append(decoder.entropy(rows) if alias is None else found[alias][-1])

        with capture(model, on_tensor, spec):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return {key: torch.cat(parts).cpu() for key, parts in found.items()}


def run_profile(model, samples: list[torch.Tensor], start: int, batch_size: int, **options):
    """The public API on the same tokens (prompt/response records of ids)."""
    records = [{"id": str(n), "prompt": " ".join(map(str, ids[:start + 1].tolist())),
                "response": " ".join(map(str, ids[start + 1 :].tolist()))} for n, ids in enumerate(samples)]
    return profile(model, IdTokenizer(), records, batch_size=batch_size, progress=False, **options)


def plain_forward(model, samples, device, batch_size) -> None:
    with torch.no_grad():
        for first in range(0, len(samples), batch_size):
            model(input_ids=torch.stack(samples[first : first + batch_size]).to(device), use_cache=False,
                  logits_to_keep=1)


def run_method(name, models, samples, args):
    reference, package = models
    start = args.prompt - 1  # positions predicting a response token: prompt-1 .. T-2
    if name == "official":
        return official(reference, samples, start, args.device)
    if name == "engine":
        return engine(package, samples, start, args.device, args.batch_size)
    if name in PROFILE_OPTIONS:
        return run_profile(package, samples, start, args.batch_size, **PROFILE_OPTIONS[name])
    return plain_forward(package, samples, args.device, args.batch_size)


def timed(name, models, samples, args):
    sync(args.device)
    began = time.perf_counter()
    result = run_method(name, models, samples, args)
    sync(args.device)
    return result, time.perf_counter() - began


def matmul_rate(d: int, vocab: int, device: str, dtype: torch.dtype, rows: int) -> float:
    """FLOP/s of one [rows, d] x [d, vocab] product in the decoder's dtypes (fp32 output), best of 3."""
    x = torch.randn(rows, d, device=device).to(dtype)
    w = torch.randn(vocab, d, device=device).to(dtype)
    fp32_out = dtype != torch.float32

    def mm():
        return torch.mm(x, w.T, out_dtype=torch.float32) if fp32_out else torch.mm(x, w.T)

    mm()
    best = math.inf
    for _ in range(3):
        sync(device)
        began = time.perf_counter()
        mm()
        sync(device)
        best = min(best, time.perf_counter() - began)
    return 2 * rows * d * vocab / best


def decoder_split(decoder: Decoder, d: int, device: str, rows: int) -> tuple[float, float]:
    """(seconds of the chunked matmuls alone, seconds of `Decoder.entropy`) on one random token chunk, best of 3."""
    x = torch.randn(rows, d, device=device).to(decoder.weight.dtype)
    vocab_chunk = decoder._chunks()[1]

    def matmuls():
        w, rows_ = decoder.mm_weight(), decoder.prepare(x)
        for start in range(0, decoder.vocab_size, vocab_chunk):
            decoder.add_bias(decoder.matmul(rows_, w, start, start + vocab_chunk), start, start + vocab_chunk)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            sync(device)
            began = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - began)
        return min(times)

    return best(matmuls), best(lambda: decoder.entropy(x))


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def decode_inputs(args, spec: ModelSpec) -> tuple:
    """Random held rows as `profile` holds them for the official sites, with targets and reference rows."""
    g = torch.Generator(device=args.device).manual_seed(2)
    tokens, d = args.samples * args.response, spec.d_model
    n_sites = (1 + len(COMPONENTS) * spec.n_layers) * (args.site_factor or 1)
    dtype = spec.unembed_weight.dtype
    rows = {i: torch.randn(tokens, d, device=args.device, generator=g).to(dtype) for i in range(n_sites)}
    targets = torch.randint(0, spec.vocab_size, (tokens,), device=args.device, generator=g)
    return rows, targets, rows[n_sites - 1]


def peak_memory(name, models, samples, args) -> int:
    """Peak bytes a method adds: CUDA in process; CPU in this (fresh child) process, via VmHWM.

    `decode-all` is `stats.decode` with every statistic on random held rows; its inputs exist before the
    peak is reset, so what is measured is the decoding's own memory."""
    spec = describe(models[1])
    run = lambda: run_method(name, models, samples, args)  # noqa: E731
    if name == "decode-all":
        decoder = Decoder.from_spec(spec)
        rows, targets, ref = decode_inputs(args, spec)
        run = lambda: decode(decoder, rows, resolve(["all"]), targets=targets, reference=(decoder, ref))  # noqa: E731
    if args.device.startswith("cuda"):
        sync(args.device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        sync(args.device)
        return torch.cuda.max_memory_allocated() - base
    base = _rss_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (Linux ≥ 4.0)
        run()
        return (_rss_kib("VmHWM") - base) * 1024
    except OSError:  # no clear_refs: the lifetime peak, still from a fresh process
        run()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024


def peak_in_child(name: str, *extra: str) -> int:
    """Run this script again to measure one method's peak memory in a process of its own.

    On CPU glibc keeps freed multi-MB blocks in its heap once its mmap threshold has adapted, so
    peak RSS would measure fragmentation rather than live tensors; the child fixes the threshold
    (MALLOC_MMAP_THRESHOLD_=128 KiB), so large tensors are mapped and unmapped as they live and die.
    """
    argv = [sys.executable, __file__, *sys.argv[1:], *extra, "--memory-of", name]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def decoding_memory(args, base: dict[str, int]) -> dict[str, float]:
    """MiB the per-site decodings add over a plain forward (engine peak − forward peak), at the default size,
    at twice the response tokens and at twice the layers; each in fresh processes."""
    def extra(*more: str) -> float:
        peaks = base if not more else {m: peak_in_child(m, *more) for m in ("engine", "forward")}
        return (peaks["engine"] - peaks["forward"]) / 2**20

    layers = SHAPES[args.shape]["num_hidden_layers"]
    return {"base": extra(), "2x tokens": extra("--response", str(2 * args.response)),
            "2x layers": extra("--layers", str(2 * layers))}


def stats_memory(args) -> dict[str, float]:
    """MiB `stats.decode` with all statistics adds above its held rows: default, 2x tokens, 2x sites."""
    if args.device.startswith("cuda"):
        return {}  # measured in process on CUDA would need the rows of 2x tokens next to the model; CPU only
    return {"base": peak_in_child("decode-all") / 2**20,
            "2x tokens": peak_in_child("decode-all", "--response", str(2 * args.response)) / 2**20,
            "2x sites": peak_in_child("decode-all", "--site-factor", "2") / 2**20}


def compare(ref: dict, other: dict) -> tuple[float, float]:
    """(max |per-token difference|, max |difference of per-site means|) over the sites both report."""
    keys = [k for k in ref if k in other]
    token = max((ref[k].double() - other[k].double()).abs().max().item() for k in keys)
    mean = max(abs(ref[k].double().mean().item() - other[k].double().mean().item()) for k in keys)
    return token, mean


def spread(values: list[float]) -> str:
    """Median (min-max) of per-round values."""
    return f"{statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens per sample")
    parser.add_argument("--response", type=int, default=None, help="response tokens per sample")
    parser.add_argument("--batch-size", type=int, default=None, help="package batch size (default: all samples)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all methods (>= 3)")
    parser.add_argument("--memory-of", choices=(*METHODS, "forward", "decode-all"), help=argparse.SUPPRESS)
    parser.add_argument("--site-factor", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = LENGTHS[args.shape]
    args.samples = args.samples or defaults[0]
    args.prompt = args.prompt or defaults[1]
    args.response = args.response or defaults[2]
    args.batch_size = args.batch_size or args.samples
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(args.device))

    models = build_models(args.shape, args.device, args.layers, reference_needed=args.memory_of in (None, "official"))
    samples = make_samples(args, SHAPES[args.shape]["vocab_size"])
    if args.memory_of:
        print(json.dumps({"peak_bytes": peak_memory(args.memory_of, models, samples, args)}))
        return

    spec = describe(models[1])
    d, vocab, layers = spec.d_model, spec.vocab_size, spec.n_layers
    tokens = args.samples * args.response
    pkg_dtype = models[1].dtype
    print(f"device={args.device} shape={args.shape} d={d} layers={layers} |V|={vocab} samples={args.samples} "
          f"prompt={args.prompt} response={args.response} kept tokens={tokens} package dtype={pkg_dtype} "
          f"threads={torch.get_num_threads()} rounds={args.rounds}")
    warm = [s[: args.prompt + 8] for s in samples[:1]]
    for name in METHODS:  # warm-up: kernels, allocator, lazy init
        run_method(name, models, warm, args)

    decoder = Decoder.from_spec(spec)
    token_chunk, vocab_chunk = decoder._chunks()
    decodings = (1 + len(COMPONENTS) * layers) * tokens
    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        seconds = {"rate": max(matmul_rate(d, vocab, args.device, pkg_dtype, token_chunk),  # the whole unembedding
                               matmul_rate(d, min(vocab_chunk, vocab), args.device, pkg_dtype, token_chunk))}
        results = {}
        for name in METHODS:
            results[name], seconds[name] = timed(name, models, samples, args)
        rounds.append(seconds)
        print(f"round {r + 1}: " + ", ".join(f"{n} {seconds[n]:.2f} s" for n in METHODS)
              + f"; matmul {seconds['rate'] / 1e9:.1f} GFLOP/s")
    per_round = {
        "speedup": [x["official"] / x["profile"] for x in rounds],
        "engine speedup": [x["official"] / x["engine"] for x in rounds],
        "roofline profile": [decodings * 2 * d * vocab / x["rate"] / x["profile"] for x in rounds],
        "roofline engine": [decodings * 2 * d * vocab / x["rate"] / x["engine"] for x in rounds],
        "stats ratio": [x["profile-all"] / x["profile"] for x in rounds],
        "linear speedup": [x["six-plain"] / x["six-linear"] for x in rounds],
    }
    for name in METHODS:
        print(f"{name:>12}: {tokens / statistics.median(x[name] for x in rounds):10.1f} tokens/s (median round)")

    summary = results["profile"].summary.set_index(["layer", "component"])["entropy"]
    profile_means = {key: torch.tensor([value]) for key, value in summary.items()}
    official_means = {key: value.mean()[None] for key, value in results["official"].items() if key != "final"}
    token_diff, mean_diff = compare(results["official"], results["engine"])
    _, profile_mean_diff = compare(official_means, profile_means)
    print(f"agreement with the fp32 official method: engine max |ΔH| per token {token_diff:.2e} nats, per-site mean "
          f"{mean_diff:.2e}; profile per-site mean {profile_mean_diff:.2e} nats "
          f"(mean H over sites {torch.cat(list(results['engine'].values())).mean():.3f}, "
          f"ln|V|={math.log(vocab):.3f})")
    tolerance = 0.02 if cuda else 1e-3
    agree = max(mean_diff, profile_mean_diff) <= tolerance
    print(f"agree (per-site means within {tolerance} nats): {agree}")
    key = ["record_id", "position", "layer", "component"]
    six = results["six-linear"].tokens.merge(results["six-plain"].tokens, on=key, suffixes=("", "_plain"))
    six_diff = (six["entropy"] - six["entropy_plain"]).abs().max()
    all_diff = (results["profile-all"].tokens["entropy"] - results["profile"].tokens["entropy"]).abs().max()

    rate = statistics.median(x["rate"] for x in rounds)
    print(f"matmul rate ({'bf16→fp32' if pkg_dtype != torch.float32 else 'fp32'}, median round): {rate / 1e9:.1f} "
          f"GFLOP/s; {decodings} decodings x 2·d·|V|, each counted as a full matmul; roofline fraction: engine "
          f"{spread(per_round['roofline engine'])}, profile {spread(per_round['roofline profile'])}")
    print(f"all scalar statistics / entropy alone (same tokens, official sites): {spread(per_round['stats ratio'])}; "
          f"their entropies differ by {all_diff:.1e}")
    print(f"linear path / plain path, all six components raw: speedup {spread(per_round['linear speedup'])}; "
          f"max per-token entropy difference {six_diff:.1e} nats (within 1e-4: {six_diff <= 1e-4})")
    _, forward_s = timed("forward", models, samples, args)
    mm_s, entropy_s = decoder_split(decoder, d, args.device, token_chunk)
    profile_s = statistics.median(x["profile"] for x in rounds)
    print(f"where the rest goes: one token chunk's decoding is {mm_s / entropy_s:.0%} matmuls "
          f"({mm_s * 1e3:.1f} of {entropy_s * 1e3:.1f} ms; the rest is exp and reductions); "
          f"the plain forward pass is {forward_s / profile_s:.0%} of profile's time")

    peaks = {}
    for name in ("official", "engine", "profile", "forward"):
        peaks[name] = peak_memory(name, models, samples, args) if cuda else peak_in_child(name)
    mib = {k: v / 2**20 for k, v in peaks.items()}
    block = 2 * token_chunk * min(vocab_chunk, vocab) * 4 / 2**20  # logits + exp buffers, fp32
    print("peak memory above the loaded model (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in mib.items())
          + " (profile also holds its per-token table and the kept hidden rows)")
    del models
    if cuda:
        torch.cuda.empty_cache()
    growth = decoding_memory(args, {k: peaks[k] for k in ("engine", "forward")})
    print("per-site decoding memory over a plain forward (MiB): " + ", ".join(f"{k} {v:.1f}" for k, v in growth.items())
          + f"; bound: two decoder blocks = {block:.0f} MiB; bounded: {max(growth.values()) <= block}")
    held = stats_memory(args)
    if held:
        print("stats.decode with all statistics, above its held rows (MiB): "
              + ", ".join(f"{k} {v:.1f}" for k, v in held.items())
              + f" (three decoder blocks: {1.5 * block:.0f} MiB, plus the stacked rows); "
              + "flat (2x tokens, 2x sites within half a decoder block of base): "
              + f"{max(held.values()) <= held['base'] + block / 4}")
    print(f"engine speedup over official: {spread(per_round['engine speedup'])}; "
          f"profile: {spread(per_round['speedup'])}")
    print(f"speedup={statistics.median(per_round['speedup']):.2f} "
          f"roofline={statistics.median(per_round['roofline profile']):.2f} "
          f"peak_mem_ratio={peaks['official'] / max(peaks['profile'], 1):.2f} "
          f"stats_ratio={statistics.median(per_round['stats ratio']):.2f} "
          f"linear_speedup={statistics.median(per_round['linear speedup']):.2f}")


if __name__ == "__main__":
    main()
