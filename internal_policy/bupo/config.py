"""BuPO configuration: TRL's `GRPOConfig` plus the internal-layer settings (paper §3, Table 8/11).

Layers are numbered as in the paper: k = 1..L (HF 0-based block index k-1); 0 is the embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from ..errors import InputError

METHODS = ("bupo", "grpo", "freeze", "lowlr")
"""bupo: internal-policy phase then GRPO; grpo: plain GRPO; freeze: GRPO with layers 1..k frozen;
lowlr: GRPO with `lowlr_factor` × learning rate for everything above layer k (paper Table 11)."""


@dataclass
class BuPOConfig(GRPOConfig):
    """GRPO settings plus BuPO's internal layer k, internal steps s_inter and the Table 11 baselines."""

    method: str = field(default="bupo", metadata={"help": f"one of {METHODS}"})
    internal_layer: int | str | None = field(
        default=None, metadata={"help": "k in paper numbering (1..L), or 'auto' = boundary layer of a profile"})
    internal_steps: int = field(default=30, metadata={"help": "s_inter: optimizer steps that optimise π^k"})
    internal_final_norm: bool = field(default=False, metadata={"help": "decode H_k through the final norm (paper: off)"})
    lowlr_factor: float = field(default=0.1, metadata={"help": "learning-rate factor above layer k for method='lowlr'"})

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise InputError(f"method {self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        if self.method != "grpo" and self.internal_layer is None:
            raise InputError(f"method {self.method!r} needs internal_layer (a layer number 1..L or 'auto')")
        if isinstance(self.internal_layer, str) and self.internal_layer != "auto":
            if not self.internal_layer.isdigit():
                raise InputError(f"internal_layer {self.internal_layer!r} must be a layer number or 'auto'")
            self.internal_layer = int(self.internal_layer)
        if self.internal_steps < 0:
            raise InputError(f"internal_steps must be >= 0, got {self.internal_steps}")
        if self.method == "bupo" and self.use_vllm and self.vllm_importance_sampling_correction:
            # TRL would weigh π^k old log-probs against vLLM's π_θ sampling log-probs; verl's BuPO has no such term
            raise InputError("BuPO with vLLM rollouts needs vllm_importance_sampling_correction=False: the internal "
                             "phase's old log-probs come from π^k, not from the sampling policy π_θ")
        if not 0 < self.lowlr_factor <= 1:
            raise InputError(f"lowlr_factor must be in (0, 1], got {self.lowlr_factor}")
