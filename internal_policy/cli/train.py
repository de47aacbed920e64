"""`internal-policy train`: BuPO, plain GRPO or the Table 11 baselines on TRL (defaults: paper Table 8)."""

from __future__ import annotations

import argparse

LAUNCH = """multi-GPU / DeepSpeed / FSDP: run the same command under accelerate, e.g.
  accelerate launch --num_processes 8 --config_file fsdp.yaml $(which internal-policy) train ...
vLLM rollouts: add --use-vllm (TRL's colocate mode)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="BuPO / GRPO training on TRL", epilog=LAUNCH,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train with BuPO (π^k for the first --internal-steps optimizer steps, then π_θ), "
                                   "plain GRPO, or GRPO with layers <= k frozen / 0.1x lr above k.")
    p.add_argument("--model", default=None, help="HF model folder or name (default: embedded stories260K)")
    p.add_argument("--data", required=True, help="math500|amc2023|aime_2024|aime_2025, or a .parquet/.jsonl prompt set")
    p.add_argument("--out", required=True, help="output folder (model, tracking.parquet, phase_log.jsonl, figures)")
    p.add_argument("--method", choices=("bupo", "grpo", "freeze", "lowlr"), default="bupo")
    p.add_argument("--internal-layer", default="auto", help="k, paper numbering 1..L, or 'auto' (boundary layer)")
    p.add_argument("--internal-steps", type=int, default=30, help="s_inter in optimizer steps (default 30)")
    p.add_argument("--internal-final-norm", action="store_true", help="decode H_k through the final norm (paper: off)")
    p.add_argument("--profile-run", help="profile folder for --internal-layer auto (default: profile the probe set)")
    p.add_argument("--reward", default="math", help="math | word:W1,W2 | length:LOW-HIGH (default math)")
    p.add_argument("--probe", help="JSONL of held-out {'text'} or {'prompt','response'} records for entropy tracking")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--num-generations", type=int, default=8, help="rollouts per prompt (G)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="completions per optimizer step and device (paper: 32 prompts x 8 = 256)")
    p.add_argument("--steps-per-generation", type=int, default=1,
                   help="optimizer steps served by one rollout (paper/verl: 4; then --internal-steps counts 4 per rollout "
                        "and must be a multiple of 4)")
    p.add_argument("--max-completion-length", type=int, default=7168)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--epsilon", type=float, default=0.2)
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (paper: 0, no reference model)")
    p.add_argument("--logging-steps", type=int, default=10, help="also the entropy-tracking interval")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 | float32 (CPU: use float32)")
    p.add_argument("--use-vllm", action="store_true")
    p.add_argument("--cpu", action="store_true", help="force CPU")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..bupo import BuPOConfig
    from ..bupo.data import load_prompts
    from ..bupo.plots import plot_fig5, plot_fig7
    from ..bupo.rewards import reward_by_name
    from ..bupo.run import train
    from ..inputs import read_jsonl
    from ..models import load_model

    reward = reward_by_name(args.reward)
    prompts = load_prompts(args.data)
    probe = read_jsonl(args.probe) if args.probe else None
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=None)
    config = BuPOConfig(
        output_dir=args.out, method=args.method,
        internal_layer=None if args.method == "grpo" else args.internal_layer,
        internal_steps=args.internal_steps, internal_final_norm=args.internal_final_norm,
        max_steps=args.max_steps, learning_rate=args.lr, weight_decay=args.weight_decay, lr_scheduler_type="constant",
        max_grad_norm=1.0, num_generations=args.num_generations, per_device_train_batch_size=args.batch_size,
        steps_per_generation=args.steps_per_generation, max_completion_length=args.max_completion_length,
        temperature=args.temperature, top_p=1.0, epsilon=args.epsilon, beta=args.beta,
        logging_steps=args.logging_steps, seed=args.seed, use_vllm=args.use_vllm, vllm_mode="colocate",
        vllm_importance_sampling_correction=False, use_cpu=args.cpu,
        bf16=args.dtype in ("bfloat16", "bf16") and not args.cpu, report_to="none", save_strategy="no",
    )
    track_layer = None if args.internal_layer == "auto" else int(args.internal_layer)
    result = train(model, tokenizer, prompts, reward, config, probe=probe, track_layer=track_layer,
                   profile_run=args.profile_run)
    out = Path(args.out)
    print(f"method={args.method} internal_layer={result.internal_layer} -> {out}")
    if result.tracking is not None:
        plot_fig5(result.tracking, out / "fig5_internal_layer.png", internal_steps=args.internal_steps)
        plot_fig7(result.tracking.assign(method=args.method), out / "fig7_actor_entropy.png", args.internal_steps)
        print(f"tracking: {out / 'tracking.parquet'}, figures: fig5_internal_layer.png, fig7_actor_entropy.png")
    return 0
