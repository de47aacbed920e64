"""Cost of module ablation with several ablated copies per forward (`--copies`) against one copy per forward.

Methods, on one random-weight model and set of records, all through `internal_policy.ablate` (attn, ffn and
attn_head of every layer, zero mode, `--batch` records per batch):
  `copies1`:  one ablated copy per forward (one Python-level forward per module per batch);
  `copiesK`:  `--copies` ablated copies per forward (default: the package's default, about 4096 token
              positions per forward);
  `loop`:     the plain way: one forward per module per record, full `model(...).logits`, log_softmax
              (what the test reference does, in fp32).
The methods are interleaved over `--rounds` rounds after a warm-up; each round's time ratio to `copiesK`
is taken and the median is reported with its min-max.
Model: a random Llama (d 256, 8 heads, `--layers` layers, |V| 8192); records of `--length` random tokens.
Last line: copies1_over_copiesK=R copies1_min=.. copies1_max=.. loop_over_copiesK=R2 loop_min=.. loop_max=..
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from internal_policy.ablate import ablate  # noqa: E402
from internal_policy.models import default_model_path  # noqa: E402


def build(args):
    """(model, tokenizer, records): seeded random weights and token ids given as prompt_ids / response_ids."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).to(args.device).eval()
    gen = torch.Generator().manual_seed(1)
    records = [{"id": str(i), "prompt_ids": torch.randint(3, 8192, (8,), generator=gen).tolist(),
                "response_ids": torch.randint(3, 8192, (args.length,), generator=gen).tolist()}
               for i in range(args.records)]
    return model, AutoTokenizer.from_pretrained(default_model_path()), records


def loop(model, records):
    """One forward per module per record with a zeroing hook; per-token NLL and entropy from full logits."""
    from internal_policy.models import describe

    spec = describe(model)
    modules = [spec.block_part(i, c) for i in range(spec.n_layers) for c in (spec.layout.attn, spec.layout.ffn)]
    projections = [spec.head_projection(i) for i in range(spec.n_layers)]
    edits = [(m, False, slice(None)) for m in modules] + [
        (p.module, True, slice(h * p.head_dim, (h + 1) * p.head_dim)) for p in projections for h in range(p.n_heads)]
    for module, pre, cols in [(None, False, None), *edits]:
        def zero(x, cols=cols):
            x = x.clone()
            x[..., cols] = 0
            return x
        handle = None if module is None else (
            module.register_forward_pre_hook(lambda _m, a: (zero(a[0]), *a[1:])) if pre
            else module.register_forward_hook(lambda _m, _a, out: (zero(out[0]), *out[1:]) if isinstance(out, tuple)
                                              else zero(out)))
        for r in records:
            ids = torch.tensor([r["prompt_ids"] + r["response_ids"]], device=model.device)
            with torch.no_grad():
                logp = model(input_ids=ids).logits[0, 7:-1].float().log_softmax(-1)
            (-(logp.exp() * logp).sum(-1)).sum().item()
            logp.gather(-1, ids[0, 8:, None]).sum().item()
        if handle is not None:
            handle.remove()


def timed(method, model, tok, records, args) -> float:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    if method == "loop":
        loop(model, records)
    else:
        ablate(model, tok, records, components=("attn", "ffn", "attn_head"), batch_size=args.batch,
               copies=1 if method == "copies1" else args.copies, progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--records", type=int, default=8)
    parser.add_argument("--length", type=int, default=96, help="response tokens per record")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--copies", type=int, default=None, help="default: the package's (about 4096 positions per "
                        "forward)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model, tok, records = build(args)
    methods = ("copiesK", "copies1", "loop")
    for method in methods:  # warm-up
        timed(method, model, tok, records, args)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.rounds):  # interleaved, so drift hits all alike
        for method in methods:
            times[method].append(timed(method, model, tok, records, args))
    ratio = {m: [t / base for t, base in zip(times[m], times["copiesK"])] for m in methods[1:]}
    n_modules = args.layers * (2 + 8)
    print(f"model: random llama d=256, {args.layers} layers x 8 heads, |V|=8192; {args.records} records x "
          f"{8 + args.length} tokens; {n_modules} modules; batch {args.batch}, copies {args.copies or 'default'}; "
          "device "
          f"{args.device}, {torch.get_num_threads()} threads")
    medians = "   ".join(f"{m} {statistics.median(times[m]):.2f}" for m in methods)
    print("median s over", args.rounds, "rounds:", medians)
    c1, lp = ratio["copies1"], ratio["loop"]
    print(f"copies1_over_copiesK={statistics.median(c1):.3f} copies1_min={min(c1):.3f} copies1_max={max(c1):.3f} "
          f"loop_over_copiesK={statistics.median(lp):.3f} loop_min={min(lp):.3f} loop_max={max(lp):.3f}")


if __name__ == "__main__":
    main()
