"""BuPO (Bottom-up Policy Optimization) on TRL: trainer, rewards, entropy tracking, evaluation."""

from .config import METHODS, BuPOConfig
from .trainer import BuPOTrainer, internal_logps, resolve_internal_layer

__all__ = ["METHODS", "BuPOConfig", "BuPOTrainer", "internal_logps", "resolve_internal_layer"]
