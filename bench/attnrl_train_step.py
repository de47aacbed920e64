"""Cost of an AttnRL training step per generated token, against a GRPO step, through the trainers themselves.

One step = the rollout/scoring call (`_generate_and_score_completions`: for AttnRL, TRL's rollouts plus
the FCI pass, the branch-point selection, the continuations, their rewards and the TreeRL batch) plus
TRL's loss and backward on the batch it returns. AttnRL samples several times more tokens per step
(N × T continuations per branched response), so its steps are compared per generated token (initial
completions + continuation tokens kept): a ratio near 1 means the branching machinery adds little
beyond the extra sampling; the FCI pass's share of the AttnRL step is reported on its own.
Model: stories260K (or `--model`), `--prompts` story openings × `--n` responses of up to `--length`
tokens, sentence steps, adaptive sampling off (every response branched, the heaviest case).

The two steps alternate within each of `--rounds` rounds, so load from other jobs lands on both alike;
the result is the median of the per-round ratios with their min and max.
Last line: token_cost_ratio=R min=A max=B fci_share=S rounds=N.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

OPENINGS = ["Once upon a time, there was a little", "One day, a girl named Lily", "Tom and his mom went to the",
            "The sun was shining and", "There was a big", "Sam wanted to play with", "Lily and Ben were",
            "One morning,"]


def trainer_for(branching: str, args, out: str):
    from datasets import Dataset

    from internal_policy.attnrl.config import AttnRLConfig
    from internal_policy.attnrl.trainer import AttnRLTrainer
    from internal_policy.bupo.rewards import target_word_reward
    from internal_policy.models import load_model

    model, tokenizer = load_model(args.model)
    config = AttnRLConfig(output_dir=out, method="grpo", per_device_train_batch_size=args.prompts * args.n,
                          num_generations=args.n, max_completion_length=args.length, use_cpu=args.device == "cpu",
                          bf16=args.device != "cpu", report_to="none", save_strategy="no", seed=0,
                          branching=branching, branch_step_sep=["."], branch_min_distance=4, fci_delta=2)
    trainer = AttnRLTrainer(model, target_word_reward(["tree"]), config,
                            train_dataset=Dataset.from_dict({"prompt": OPENINGS}), processing_class=tokenizer)
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by train(); the loss normaliser reads it
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local HF model folder (default: embedded stories260K)")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (>= 3)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")
    torch.set_num_threads(args.threads)
    inputs = [{"prompt": p} for p in OPENINGS[: args.prompts] for _ in range(args.n)]
    with tempfile.TemporaryDirectory() as out:
        trainers = {b: trainer_for(b, args, f"{out}/{b}") for b in ("none", "attn")}
        fci_seconds = []
        fci = trainers["attn"]._fci

        def timed_fci(questions):
            start = time.perf_counter()
            fci(questions)
            fci_seconds.append(time.perf_counter() - start)

        trainers["attn"]._fci = timed_fci

        def step(trainer) -> tuple[float, int]:
            """Seconds of one rollout call + loss + backward, and the tokens it generated."""
            trainer.model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            batch = trainer._generate_and_score_completions(inputs)
            trainer._compute_loss(trainer.model, batch).backward()
            seconds = time.perf_counter() - start
            tokens = trainer.branch_log[-1]["generated_tokens"] if trainer.branch_log else \
                sum(map(len, trainer._rollout[1]))
            return seconds, tokens

        step(trainers["none"]), step(trainers["attn"])  # warm-up
        rounds = []
        for _ in range(args.rounds):
            grpo, attn = step(trainers["none"]), step(trainers["attn"])
            rounds.append((grpo, attn, fci_seconds[-1]))
    ratios = [(a[0] / a[1]) / (g[0] / g[1]) for g, a, _ in rounds]
    shares = [f / a[0] for _, a, f in rounds]
    grpo_s, grpo_t = (statistics.median(g[i] for g, _, _ in rounds) for i in (0, 1))
    attn_s, attn_t = (statistics.median(a[i] for _, a, _ in rounds) for i in (0, 1))
    print(f"model: {args.model or 'stories260K'}; {args.prompts} prompts x {args.n} responses of up to {args.length} "
          f"tokens; {args.device}, {args.threads} thread(s)")
    print(f"GRPO step: {grpo_s:.2f} s for {grpo_t:,.0f} tokens   AttnRL step: {attn_s:.2f} s for {attn_t:,.0f} tokens "
          f"(medians over {args.rounds} rounds)")
    print(f"per-round token-cost ratios: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"token_cost_ratio={statistics.median(ratios):.3f} min={min(ratios):.3f} max={max(ratios):.3f} "
          f"fci_share={statistics.median(shares):.3f} rounds={args.rounds}")


if __name__ == "__main__":
    main()
