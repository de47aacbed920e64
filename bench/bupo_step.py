"""Time of one BuPO internal-phase training step relative to a GRPO step on the same batch.

Both steps run TRL's loss + backward on one fixed batch of prompt/completion ids through the same
`BuPOTrainer`; the internal phase stops the forward after block k (blocks k+1..L and the final norm
never run, forward or backward), so with k well below L the ratio should be clearly below 1.
Model: a random 16-layer Llama (d 256, stories260K tokenizer), k = 4; CPU by default.

The two steps alternate within each of `--rounds` rounds (each takes the median of `--repeats`
steps), so load from other jobs lands on both alike; the result is the median of the per-round
ratios with their min and max. Last line: internal_step_ratio=R min=A max=B rounds=N.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--completion-len", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (>= 3)")
    parser.add_argument("--repeats", type=int, default=3, help="steps of each kind per round")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on cuda)")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")

    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from internal_policy.bupo import BuPOConfig, BuPOTrainer
    from internal_policy.models import default_model_path

    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688,
                                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                                         max_position_embeddings=512))
    with tempfile.TemporaryDirectory() as out:
        config = BuPOConfig(output_dir=out, method="bupo", internal_layer=args.k, internal_steps=1,
                            per_device_train_batch_size=args.batch, num_generations=args.batch, use_cpu=not cuda,
                            bf16=cuda, report_to="none", save_strategy="no")
        trainer = BuPOTrainer(model, lambda completions, **_: [0.0] * len(completions), config,
                              train_dataset=Dataset.from_dict({"prompt": ["x"]}), processing_class=tokenizer)
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by train(); the loss normaliser reads it
    gen = torch.Generator().manual_seed(1)
    device = trainer.accelerator.device
    inputs = {
        "prompt_ids": torch.randint(3, 512, (args.batch, args.prompt_len), generator=gen),
        "prompt_mask": torch.ones(args.batch, args.prompt_len, dtype=torch.long),
        "completion_ids": torch.randint(3, 512, (args.batch, args.completion_len), generator=gen),
        "completion_mask": torch.ones(args.batch, args.completion_len, dtype=torch.long),
        "advantages": torch.randn(args.batch, generator=gen),
        "num_items_in_batch": torch.tensor(float(args.batch * args.completion_len)),
    }
    inputs = {key: value.to(device) for key, value in inputs.items()}

    def step(global_step: int) -> float:
        trainer.state.global_step = global_step  # 0: the internal phase (π^k), 1: π_θ
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer._compute_loss(model, inputs).backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step(0), step(1)  # warm-up
    rounds = []
    for _ in range(args.rounds):
        internal = statistics.median(step(0) for _ in range(args.repeats))
        grpo = statistics.median(step(1) for _ in range(args.repeats))
        rounds.append((internal, grpo))
    ratios = [i / g for i, g in rounds]
    internal, grpo = (statistics.median(x) for x in zip(*rounds))
    print(f"model: {args.layers} layers, k={args.k}; batch {args.batch} x ({args.prompt_len}+{args.completion_len}) "
          f"tokens; {args.device}")
    print(f"internal-phase step (π^{args.k}): {internal * 1e3:.1f} ms   GRPO step (π_θ): {grpo * 1e3:.1f} ms "
          f"(medians over {args.rounds} rounds)")
    print(f"per-round ratios: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"internal_step_ratio={statistics.median(ratios):.3f} min={min(ratios):.3f} max={max(ratios):.3f} "
          f"rounds={args.rounds}")


if __name__ == "__main__":
    main()
