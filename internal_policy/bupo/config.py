"""BuPO configuration: TRL's `GRPOConfig` plus the internal-layer settings (paper §3, Table 8/11).

Layers are numbered as in the paper: k = 1..L (HF 0-based block index k-1); 0 is the embedding. The
official code's `internal_layer` is 0-based: its 5 (Qwen3 scripts) is `internal_layer=6` here, its 26
(OctoThinker script) is 27.

Step units follow the official code: `internal_steps` (s_inter, official `iterative_steps`) and the
stages of `internal_schedule` count **rollout batches** (one generation batch, official `global_steps`),
each of which serves `steps_per_generation × num_iterations / gradient_accumulation_steps` optimizer
steps; TRL's `max_steps`, `save_steps`, `eval_steps` and `logging_steps` count optimizer steps.
`per_device_train_batch_size` is per device: the official mini-batch of 32 prompts × 8 = 256
completions is global (`official_preset` splits it over the devices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

from trl import GRPOConfig

from ..errors import InputError
from .rewards import Scorer

Method = Literal["bupo", "grpo", "freeze", "lowlr"]
METHODS: tuple[str, ...] = get_args(Method)
"""bupo: internal-policy phase then GRPO; grpo: plain GRPO; freeze: GRPO with layers 1..k frozen;
lowlr: GRPO with `lowlr_factor` × learning rate for everything above layer k (paper Table 11)."""

DEFAULT_INTERNAL_STEPS = 30
"""s_inter of the paper (Qwen3-4B) and of both official scripts, in rollout batches."""


@dataclass(frozen=True)
class Stage:
    """One stage of the internal phase: optimise π^layer for `rollouts` rollout batches (layer None: spaced later)."""

    layer: int | None
    rollouts: int


def parse_schedule(text: str) -> list[Stage]:
    """'2:10,4:10' → π^2 for 10 rollouts then π^4 for 10; '10,10' leaves the layers to `spaced_layers`."""
    stages = []
    for item in (part.strip() for part in text.split(",")):
        layer, sep, rollouts = item.rpartition(":")
        if not rollouts.isdigit() or (sep and not layer.isdigit()) or int(rollouts) < 1:
            raise InputError(f"internal_schedule item {item!r} must be LAYER:ROLLOUTS (e.g. 2:10) or ROLLOUTS "
                             "with internal_layer auto or a number; rollouts >= 1")
        stages.append(Stage(int(layer) if sep else None, int(rollouts)))
    if len({s.layer is None for s in stages}) > 1:
        raise InputError(f"internal_schedule {text!r} mixes LAYER:ROLLOUTS and bare ROLLOUTS items; use one form")
    layers = [s.layer for s in stages if s.layer is not None]
    if any(b <= a for a, b in zip(layers, layers[1:])) or any(x < 1 for x in layers):
        raise InputError(f"internal_schedule {text!r}: layers must be >= 1 and strictly increasing (bottom-up)")
    return stages


def spaced_layers(top: int, n: int) -> list[int]:
    """n layers evenly spaced in depth, ending at `top`: round(top·i/n) for i = 1..n (top 6, n 3 → 2, 4, 6)."""
    if n > top:
        raise InputError(f"{n} schedule stages cannot have distinct layers ending at layer {top}; use at most {top}")
    return [max(1, round(top * i / n)) for i in range(1, n + 1)]


def official_preset(world_size: int = 1) -> dict:
    """BuPOConfig values of the official run (run_code/BuPO_qwen3.sh), split over `world_size` devices.

    A rollout batch is 128 prompts × 8 samples; it serves 4 optimizer steps of 32 prompts × 8 = 256
    completions (global, so 256 / world_size per device); s_inter = 30 rollouts = 120 π^k updates;
    300 rollouts = 1,200 optimizer steps; AdamW lr 1e-6, weight decay 0.01, constant schedule, clip 1.0;
    ε = 0.2, β = 0, token-mean loss (TRL `dapo`); responses up to 8,192 tokens; checkpoints every 100
    rollouts and validation every 30 (plus before training). Not reproduced: verl's dual-clip (c = 10).
    """
    if 256 % world_size:
        raise InputError(f"the official mini-batch of 256 completions does not split over {world_size} devices")
    updates_per_rollout = 4
    return dict(
        learning_rate=1e-6, weight_decay=0.01, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        num_generations=8, per_device_train_batch_size=256 // world_size, gradient_accumulation_steps=1,
        steps_per_generation=updates_per_rollout, num_iterations=1, internal_steps=DEFAULT_INTERNAL_STEPS,
        max_steps=300 * updates_per_rollout, max_completion_length=8192, temperature=1.0, top_p=1.0, top_k=0,
        epsilon=0.2, beta=0.0, loss_type="dapo", save_steps=100 * updates_per_rollout,
        eval_steps=30 * updates_per_rollout, eval_on_start=True, num_generations_eval=1, eval_scorer="official",
    )


@dataclass
class BuPOConfig(GRPOConfig):
    """GRPO settings plus BuPO's internal layer k, s_inter (rollout batches), the bottom-up schedule and baselines."""

    method: Method = field(default="bupo", metadata={"help": "bupo: π^k then π_θ; grpo; freeze / lowlr: Table 11"})
    internal_layer: int | str | None = field(
        default=None, metadata={"help": "k in paper numbering (1..L; official 0-based k + 1), or 'auto' = the "
                                        "boundary layer of a profile; with method grpo: the layer tracked"})
    internal_steps: int | None = field(
        default=None, metadata={"help": f"s_inter in rollout batches (official iterative_steps; default "
                                        f"{DEFAULT_INTERNAL_STEPS} for method bupo)"})
    internal_schedule: str | None = field(
        default=None, metadata={"help": "sequential bottom-up schedule LAYER:ROLLOUTS,... e.g. 2:10,4:10 (π^2 for "
                                        "10 rollouts, then π^4 for 10, then π_θ); bare ROLLOUTS,... spaces the "
                                        "layers evenly up to internal_layer (auto: the boundary layer)"})
    force_schedule: bool = field(
        default=False, metadata={"help": "accept schedule layers above the boundary layer (or without a profile)"})
    internal_final_norm: bool = field(
        default=False, metadata={"help": "decode H_k through the final norm (paper: off)"})
    lowlr_factor: float = field(default=0.1, metadata={"help": "learning-rate factor above layer k for method lowlr"})
    eval_scorer: Scorer = field(
        default="math-verify", metadata={"help": "answer checker of the validation during training: math-verify, or "
                                                 "official (last \\boxed{} + the official normalised string match)"})
    num_generations_eval: int | None = field(
        default=None, metadata={"aliases": ["--eval-n", "--eval_n"],
                                "help": "samples per problem for validation during training (Avg@n, Pass@K, Maj@K); "
                                        "per_device_eval_batch_size is rounded to whole problems"})

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"method {self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        internal = self.method == "bupo"
        if internal and self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = True  # blocks above k get no gradient during the internal phase
        if self.num_generations_eval and self.per_device_eval_batch_size % self.num_generations_eval:
            self.per_device_eval_batch_size = self.num_generations_eval  # whole problems per validation batch
        super().__post_init__()
        self._check_layer()
        if self.internal_steps is not None and self.internal_steps < 0:
            raise InputError(f"internal_steps must be >= 0 rollout batches, got {self.internal_steps}")
        if self.internal_schedule is not None:
            if not internal:
                raise InputError(f"internal_schedule needs method bupo, not {self.method!r} (freeze/lowlr train π_θ)")
            if self.internal_steps is not None:
                raise InputError("give either internal_steps or internal_schedule: the schedule sets the phase length")
            stages = parse_schedule(self.internal_schedule)
            if stages[0].layer is not None and isinstance(self.internal_layer, int):
                raise InputError("internal_schedule names its layers; leave internal_layer unset (or 'auto' to check "
                                 "them against the boundary layer)")
            if stages[0].layer is None and self.internal_layer is None:
                raise InputError("a schedule of bare rollout counts needs internal_layer (a number or 'auto'): the "
                                 "layers are spaced evenly up to it")
        elif self.method != "grpo" and self.internal_layer is None:
            raise InputError(f"method {self.method!r} needs internal_layer (a layer number 1..L or 'auto')")
        self._check_compatibility(internal)
        if not 0 < self.lowlr_factor <= 1:
            raise InputError(f"lowlr_factor must be in (0, 1], got {self.lowlr_factor}")
        if self.save_strategy == "steps" and self.save_steps >= 1:
            generate_every = self.steps_per_generation * self.num_iterations  # micro-steps per rollout
            boundary = generate_every // math.gcd(generate_every, self.gradient_accumulation_steps)
            if int(self.save_steps) % boundary:
                raise InputError(f"save_steps={self.save_steps:g} would checkpoint inside a rollout batch (it serves "
                                 f"{self.steps_per_rollout():g} optimizer steps), which a resumed run would sample "
                                 f"anew; use a multiple of {boundary}")

    def _check_layer(self) -> None:
        if isinstance(self.internal_layer, str) and self.internal_layer != "auto":
            if not self.internal_layer.isdigit():
                raise InputError(f"internal_layer {self.internal_layer!r} must be a layer number (1..L) or 'auto'")
            self.internal_layer = int(self.internal_layer)

    def _check_compatibility(self, internal: bool) -> None:
        """Options that would act on π^k instead of π_θ, or break DDP, during the internal phase."""
        if not internal:
            return
        if self.use_vllm and self.vllm_importance_sampling_correction:
            # TRL would weigh π^k old log-probs against vLLM's π_θ sampling log-probs; verl's BuPO has no such term
            raise InputError("BuPO with vLLM rollouts needs vllm_importance_sampling_correction=False: the internal "
                             "phase's old log-probs come from π^k, not from the sampling policy π_θ")
        if self.use_vllm and self.off_policy_mask_threshold is not None:
            raise InputError("BuPO with vLLM cannot use off_policy_mask_threshold: it would compare vLLM's π_θ "
                             "sampling log-probs with π^k's; unset it")
        if self.entropy_coef or self.use_adaptive_entropy or self.top_entropy_quantile < 1.0:
            raise InputError("BuPO cannot use entropy_coef, use_adaptive_entropy or top_entropy_quantile < 1: "
                             "during the internal phase they would act on π^k's entropy, not π_θ's (the paper "
                             "uses neither)")
        if self.ddp_find_unused_parameters is False or self.ddp_static_graph:
            raise InputError("BuPO needs ddp_find_unused_parameters=True and no ddp_static_graph: blocks above k get "
                             "no gradient during the internal phase, and the graph changes at the switch")
        if self.gradient_checkpointing and (self.gradient_checkpointing_kwargs or {}).get("use_reentrant"):
            raise InputError("BuPO needs non-reentrant gradient checkpointing (use_reentrant=False) under DDP with "
                             "find_unused_parameters")

    def steps_per_rollout(self) -> float:
        """Optimizer steps one rollout batch serves: steps_per_generation × num_iterations / grad. accumulation."""
        steps = self.steps_per_generation * self.num_iterations / self.gradient_accumulation_steps
        return int(steps) if steps == int(steps) else steps

    def rollouts_to_steps(self, rollouts: int) -> int:
        """Optimizer steps of `rollouts` rollout batches; refused when that ends inside an optimizer step."""
        steps = rollouts * self.steps_per_generation * self.num_iterations
        if steps % self.gradient_accumulation_steps:
            raise InputError(
                f"{rollouts} rollout batches end inside an optimizer step (a rollout serves "
                f"{self.steps_per_rollout():g} optimizer steps: steps_per_generation × num_iterations / "
                "gradient_accumulation_steps); choose a phase length that is a whole number of optimizer steps")
        return steps // self.gradient_accumulation_steps
