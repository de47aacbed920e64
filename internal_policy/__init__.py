"""internal-policy: internal-policy entropy profiling and BuPO training for Hugging Face causal LMs.

Layers are numbered as in the paper (arXiv 2512.19673): 1..L, with 0 for the embedding output.
"""

__version__ = "0.1.0"

from .ablate import AblationSettings, ablate, load_ablation
from .attnrl import BranchPoints, branch_points, load_branch_points
from .capture import COMPONENTS, capture, extract, forward_until
from .entropy import Decoder, entropy_from_logits
from .generate import Sampling, generate
from .inputs import read_records
from .models import ModelSpec, UnsupportedModelError, describe, load_model
from .predict import Prediction, predict
from .profile import ProfileResult, load_run, profile
from .report import write_report
from .settings import ProfileSettings

__all__ = [
    "AblationSettings",
    "BranchPoints",
    "COMPONENTS",
    "Decoder",
    "ModelSpec",
    "Prediction",
    "ProfileResult",
    "ProfileSettings",
    "Sampling",
    "UnsupportedModelError",
    "ablate",
    "branch_points",
    "capture",
    "describe",
    "entropy_from_logits",
    "extract",
    "forward_until",
    "generate",
    "load_ablation",
    "load_branch_points",
    "load_model",
    "load_run",
    "predict",
    "profile",
    "read_records",
    "write_report",
]
