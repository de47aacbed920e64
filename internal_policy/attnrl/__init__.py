"""AttnRL ("Attention as a Compass", arXiv 2509.26628): attention-guided branch points, as the published code
(github.com/RyanLiu112/AttnRL) computes them.

- `steps`: reasoning steps of a prompt + response (separator rule);
- `fci`: Forward Context Influence of each step from one query-chunked eager-attention pass;
- `select`: branch-point selectors (`attn` = FCI rule, `entropy`, `random`);
- `sampling`: adaptive sampling arithmetic, zero-variance filter, dynamic prompt batch;
- `tree`: branch prefixes and TreeRL process advantages;
- `analysis`: the `internal-policy branch-points` run; `plots` (imported on its own, it loads
  matplotlib): its figures;
- `config`, `trainer`: `AttnRLConfig` and `AttnRLTrainer`, branching rollouts with TreeRL advantages
  on TRL (`internal-policy train --branching ...`); imported on first use, so the rest loads without TRL.

Layers are numbered as in the paper: 1..L (HF 0-based block l-1).
"""

from importlib import import_module

from .analysis import BranchPoints, branch_points, load_branch_points
from .fci import StepAttention, fci_from_attentions, step_attention, step_fci
from .sampling import RunningMean, branch_budget, next_prompt_batch, plan_branching, zero_std_keep
from .select import SELECTORS, select_attn, select_entropy, select_random, step_points
from .steps import SEPARATORS, THINK_END, Steps, sequence_steps, split_steps, token_texts
from .tree import BranchPrefix, Continuation, Leaf, branch_prefixes, tree_advantages

_LAZY = {"AttnRLConfig": "config", "AttnRLTrainer": "trainer"}

__all__ = [
    "AttnRLConfig", "AttnRLTrainer", "SELECTORS", "SEPARATORS", "THINK_END", "BranchPoints", "BranchPrefix",
    "Continuation", "Leaf", "RunningMean",
    "StepAttention", "Steps", "branch_budget", "branch_points", "branch_prefixes", "fci_from_attentions",
    "load_branch_points", "next_prompt_batch", "plan_branching",
    "select_attn", "select_entropy", "select_random", "sequence_steps", "split_steps",
    "step_attention", "step_fci", "step_points", "token_texts", "tree_advantages", "zero_std_keep",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_LAZY[name]}", __name__), name)
