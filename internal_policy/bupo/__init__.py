"""BuPO (Bottom-up Policy Optimization) on TRL: trainer, rewards, entropy tracking, evaluation.

Layers are numbered as in the paper: k = 1..L (HF 0-based block k-1). Names are imported on first use,
so light modules (rewards, official_math, data) load without TRL.
"""

from importlib import import_module

_WHERE = {
    "METHODS": "config", "BuPOConfig": "config", "official_preset": "config",
    "BENCHMARKS": "data", "load_prompts": "data", "prompt_text": "data",
    "evaluate": "evaluate", "pass_at_k": "evaluate", "pass_at_k_curve": "evaluate", "score_completions": "evaluate",
    "summarize": "evaluate",
    "SCORERS": "rewards", "check_answer": "rewards", "length_window_reward": "rewards", "math_reward": "rewards",
    "official_math_reward": "rewards", "reward_by_name": "rewards", "target_word_reward": "rewards",
    "official_check": "official_math",
    "TrainResult": "run", "train": "run",
    "EntropyTracker": "tracking", "measure": "tracking",
    "BuPOTrainer": "trainer", "internal_logps": "trainer", "resolve_internal_layer": "trainer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
