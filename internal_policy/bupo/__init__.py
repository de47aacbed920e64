"""BuPO (Bottom-up Policy Optimization) on TRL: trainer, rewards, entropy tracking, evaluation.

Layers are numbered as in the paper: k = 1..L (HF 0-based block k-1).
"""

from .config import METHODS, BuPOConfig
from .data import BENCHMARKS, load_prompts, prompt_text
from .evaluate import evaluate, pass_at_k, pass_at_k_curve, score_completions, summarize
from .rewards import check_answer, length_window_reward, math_reward, reward_by_name, target_word_reward
from .run import TrainResult, train
from .tracking import EntropyTracker, measure
from .trainer import BuPOTrainer, internal_logps, resolve_internal_layer

__all__ = [
    "BENCHMARKS", "METHODS", "BuPOConfig", "BuPOTrainer", "EntropyTracker", "TrainResult", "check_answer",
    "evaluate", "internal_logps", "length_window_reward", "load_prompts", "math_reward", "measure", "pass_at_k",
    "pass_at_k_curve", "prompt_text", "resolve_internal_layer", "reward_by_name", "score_completions", "summarize",
    "target_word_reward", "train",
]
