"""What `attn_head` costs: `profile` with the six default components against the same plus per-head rows.

On a random-weight Llama-shaped model (defaults: d = 512, 8 layers, 8 heads, |V| = 32,000) and the same
tokens, each of `--rounds` rounds runs both settings one after the other (order alternating), and the
ratio is taken within the round: reported as the median over rounds with min-max. Alongside it, the
ratio of decoded sites (direct sites of the `SitePlan`), which the time should roughly follow when the
unembedding matmuls dominate. `keep_tokens=False`: the cost measured is the decoding, not the tables.
Last line: `sites_ratio=R time_ratio=R time_ratio_min=R time_ratio_max=R` (with heads / without).

    HF_HUB_OFFLINE=1 python bench/heads_cost.py [--layers 8] [--heads 8] [--d 512] [--vocab 32000]
        [--tokens 256] [--rounds 3]
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

from internal_policy.capture import COMPONENTS  # noqa: E402
from internal_policy.models import describe, load_model  # noqa: E402
from internal_policy.profile import profile  # noqa: E402
from internal_policy.sites import SitePlan  # noqa: E402

WITH_HEADS = (*COMPONENTS, "attn_head")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per record (4 records)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=args.d, intermediate_size=4 * args.d, num_hidden_layers=args.layers,
                            num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                            max_position_embeddings=args.tokens + 8)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    _, tokenizer = load_model()  # any tokenizer: the records are given as token ids
    records = [{"id": str(i), "prompt_ids": [1], "response_ids": torch.randint(3, args.vocab, (args.tokens,)).tolist()}
               for i in range(4)]
    spec = describe(model)
    sites = {c: len(SitePlan.build(spec, c, linear=True).direct) for c in (COMPONENTS, WITH_HEADS)}
    for components in (COMPONENTS, WITH_HEADS):  # warm-up: first-call allocations and lazy imports are not timed
        profile(model, tokenizer, records[:1], components=components, keep_tokens=False, progress=False)
    ratios = []
    for r in range(args.rounds):
        seconds = {}
        for components in (COMPONENTS, WITH_HEADS) if r % 2 == 0 else (WITH_HEADS, COMPONENTS):
            start = time.perf_counter()
            profile(model, tokenizer, records, components=components, keep_tokens=False, progress=False)
            seconds[components] = time.perf_counter() - start
        ratios.append(seconds[WITH_HEADS] / seconds[COMPONENTS])
        print(f"round {r + 1}: default {seconds[COMPONENTS]:.2f} s, with attn_head {seconds[WITH_HEADS]:.2f} s "
              f"(ratio {ratios[-1]:.2f})")
    sites_ratio = sites[WITH_HEADS] / sites[COMPONENTS]
    print(f"decoded sites: default {sites[COMPONENTS]}, with attn_head {sites[WITH_HEADS]}")
    print(f"sites_ratio={sites_ratio:.2f} time_ratio={statistics.median(ratios):.2f} "
          f"time_ratio_min={min(ratios):.2f} time_ratio_max={max(ratios):.2f}")


if __name__ == "__main__":
    main()
