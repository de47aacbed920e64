"""AttnRL training settings: `BuPOConfig` (TRL's `GRPOConfig` + BuPO) plus AttnRL's branching options.

`branching='none'` is plain BuPO / GRPO; `attn` branches at FCI-chosen steps (the published rule),
`random` at random steps under the same start/distance rules, `entropy` at the highest-entropy
tokens (the code's TreeRL-like baseline). The fields become `internal-policy train` options through
TRL's parser (`--branching`, `--branch-points`, ...), and join the run's resume key (`train.json`).
Defaults are the published run's, except `adaptive_sampling` (off: every response is branched, the
code's `uniform` mode) and the distances, which suit responses of thousands of tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from ..bupo.config import BuPOConfig
from ..errors import InputError
from .fci import check_delta
from .steps import SEPARATORS, escape, unescape

Branching = Literal["none", "attn", "entropy", "random"]
BRANCHINGS: tuple[str, ...] = get_args(Branching)


@dataclass
class AttnRLConfig(BuPOConfig):
    """BuPO / GRPO settings plus AttnRL's branching rollouts and TreeRL advantages."""

    branching: Branching = field(default="none", metadata={
        "help": "AttnRL branching rollouts: none (plain GRPO/BuPO), attn (FCI-chosen steps), random (random "
                "steps), entropy (highest-entropy tokens); advantages become TreeRL's"})
    branch_points: int = field(default=2, metadata={"help": "branch points per branched response (N)"})
    branch_samples: int = field(default=2, metadata={"help": "continuations sampled per branch point (T)"})
    fci_delta: int = field(default=4, metadata={
        "help": "Δ: a step's FCI sums the attention it gets from steps >= k+Δ"})
    fci_quantile: float = field(default=0.8, metadata={
        "help": "attn: candidate steps have FCI at or above this quantile of the response's step scores"})
    branch_min_distance: int = field(default=512, metadata={
        "help": "attn/random: tokens between two chosen steps (published 512 for 8k-token responses; scale it)"})
    branch_min_start: int | None = field(default=None, metadata={
        "help": "attn/random: earliest absolute token position of a branch point (default: branch_min_distance)"})
    branch_step_sep: list[str] = field(default_factory=lambda: [escape(s) for s in SEPARATORS], metadata={
        "help": "step separators tried in order, backslash escapes allowed ('.' gives sentences, which suits "
                "stories260K)"})
    adaptive_sampling: bool = field(default=False, metadata={
        "help": "branch ceil(n·e^-acc) responses per question, minority outcome first; all-correct questions "
                "only above the running mean FCI (else dropped). Off: every response is branched"})
    zero_std_filter: bool = field(default=True, metadata={
        "help": "drop questions whose training sequences all share one reward"})
    off_policy_branching: bool = field(default=False, metadata={
        "help": "one-step off-policy: continuations of batch t-1 are sampled with batch t, and step t trains "
                "batch t-1's trees (the first rollout batch trains nothing)"})

    def __post_init__(self):
        super().__post_init__()
        if self.branching not in BRANCHINGS:
            raise InputError(f"branching {self.branching!r} is unknown; choose one of {', '.join(BRANCHINGS)}")
        if self.branching == "none":
            if self.adaptive_sampling or self.off_policy_branching:
                raise InputError("adaptive_sampling and off_policy_branching need branching attn, random or entropy")
            return
        for name in ("branch_points", "branch_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        check_delta(self.fci_delta)
        if not 0 < self.fci_quantile <= 1:
            raise InputError(f"fci_quantile must be in (0, 1], got {self.fci_quantile}; the published value is 0.8")
        if self.branch_min_distance < 0 or (self.branch_min_start or 0) < 0:
            raise InputError("branch_min_distance and branch_min_start must be >= 0 tokens")
        if not self.branch_step_sep or not all(self.branch_step_sep):
            raise InputError(f"branch_step_sep must be non-empty strings, got {self.branch_step_sep!r}")
        if self.use_vllm:
            raise InputError("branching supports transformers generation only: vLLM's sampling log-probs and "
                             "importance weights are not produced for branch rows; unset use_vllm")
        if self.off_policy_branching and self.method == "bupo":
            raise InputError("off_policy_branching trains batch t-1's trees at step t, so a BuPO phase switch "
                             "(π^k -> π_θ) would pair old and current log-probs of different policies; use "
                             "on-policy branching with method bupo")

    @property
    def min_start(self) -> int:
        """Earliest branch-point position (branch_min_start, else branch_min_distance, as the published code)."""
        return self.branch_min_distance if self.branch_min_start is None else self.branch_min_start

    @property
    def separators(self) -> tuple[str, ...]:
        """`branch_step_sep` with backslash escapes resolved."""
        return tuple(unescape(s) for s in self.branch_step_sep)
