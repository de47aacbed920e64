"""internal-policy: internal-policy entropy profiling and BuPO training for Hugging Face causal LMs.

Layers are numbered as in the paper (arXiv 2512.19673): 1..L, with 0 for the embedding output.
"""

from .capture import COMPONENTS, capture, extract, forward_until
from .entropy import Decoder, entropy_from_logits
from .models import ModelSpec, UnsupportedModelError, describe, load_model

__version__ = "0.1.0"

__all__ = [
    "COMPONENTS",
    "Decoder",
    "ModelSpec",
    "UnsupportedModelError",
    "capture",
    "describe",
    "entropy_from_logits",
    "extract",
    "forward_until",
    "load_model",
]
