"""EIC stages of the ΔH_FFN curve and the BuPO boundary layer (paper §3, §5.3).

The paper reads its Fig. 3 by eye: exploration (ΔH_FFN > 0, lower layers), integration (≈ 0) and
convergence (< 0, upper layers); BuPO trains the *boundary layer*, the last layer of exploration.
This module makes that reading a stated rule, in three steps:

1. **Label** each layer l = 1..L: ``+1`` if ΔH_FFN > tol, ``-1`` if < -tol, else ``0``, with
   ``tol = max(rel_tol * max_l |ΔH_FFN|, abs_tol)`` (defaults 5 % of the curve's scale, floor
   0.01 nats). Relative, because "≈ 0" in the paper is judged on each model's own axis (Qwen's
   FFN spans -10..+4 nats, Llama's ±0.2).
2. **Despeckle**: an interior run shorter than ``min_run`` layers (default 2: a single layer) whose
   neighbouring runs on both sides share a label takes that label. Runs touching the first or last
   layer are kept: at an edge a short stage cannot be told from noise, and the paper's Llama
   models do converge at the final layer only.
3. **Fit** the three stages in order: exploration = layers 1..a, integration = a+1..b,
   convergence = b+1..L (each may be empty), choosing a <= b to minimise the number of layers whose
   label disagrees with their stage, then the summed distance of those layers' ΔH_FFN from their
   stage's band, then the smallest (a, b). The order E -> I -> C is the paper's finding; the fit
   keeps one stray layer from splitting a stage.

Boundary layer = the last exploration layer, capped at L - 1 so that BuPO's phase 1 always trains
a truncated policy and never just π_θ without its final norm:

- whole curve positive (or positive up to a single converging top layer, as the paper reports for
  Llama / OctoThinker-3B, whose boundary is 27 of 28): boundary = L - 1;
- no exploration stage (e.g. all negative or all ≈ 0): there is no boundary; ``boundary_layer``
  raises :class:`InputError` asking for an explicit layer, and ``stages.json`` stores ``null``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .errors import InputError
from .runs import STAGES, load_run, read_json, write_json

STAGE_NAMES = ("exploration", "integration", "convergence")
_TARGET = {"exploration": 1, "integration": 0, "convergence": -1}


@dataclass(frozen=True)
class Stages:
    """EIC segmentation of one ΔH_FFN curve; layers are 1..L, spans are inclusive (first, last) or None."""

    delta_ffn: tuple[float, ...]
    labels: tuple[int, ...]
    exploration: tuple[int, int] | None
    integration: tuple[int, int] | None
    convergence: tuple[int, int] | None
    boundary_layer: int | None
    tolerance: float
    rel_tol: float
    abs_tol: float
    min_run: int

    @property
    def n_layers(self) -> int:
        """L, the number of transformer blocks."""
        return len(self.delta_ffn)

    def spans(self) -> dict[str, tuple[int, int]]:
        """Non-empty stages in depth order, name -> (first layer, last layer)."""
        return {name: span for name in STAGE_NAMES if (span := getattr(self, name)) is not None}

    def stage_of(self, layer: int) -> str:
        """Name of the stage holding `layer` (1..L)."""
        for name, (first, last) in self.spans().items():
            if first <= layer <= last:
                return name
        raise InputError(f"layer {layer} is outside 1..{self.n_layers}")

    def to_dict(self) -> dict:
        """JSON-ready dict (the content of stages.json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Stages":
        """Inverse of :meth:`to_dict` (JSON turns tuples into lists)."""
        tupled = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**{k: tupled[k] for k in cls.__dataclass_fields__})


def label_layers(delta: np.ndarray, tolerance: float) -> np.ndarray:
    """+1 / 0 / -1 per layer: ΔH above tolerance, within it, below minus it."""
    return np.where(delta > tolerance, 1, np.where(delta < -tolerance, -1, 0))


def despeckle(labels: np.ndarray, min_run: int) -> np.ndarray:
    """Relabel interior runs shorter than `min_run` whose two neighbouring runs agree (see module doc)."""
    out = labels.copy()
    changed = True
    while changed:
        changed = False
        starts = np.flatnonzero(np.r_[True, out[1:] != out[:-1]])
        ends = np.r_[starts[1:], len(out)]
        for i in range(1, len(starts) - 1):
            short = ends[i] - starts[i] < min_run
            if short and out[starts[i - 1]] == out[starts[i + 1]]:
                out[starts[i] : ends[i]] = out[starts[i - 1]]
                changed = True
                break
    return out


def _band_distance(delta: np.ndarray, target: int, tol: float) -> np.ndarray:
    """How far each ΔH lies outside the band of a stage (> tol, [-tol, tol], < -tol)."""
    if target == 1:
        return np.maximum(tol - delta, 0.0)
    if target == -1:
        return np.maximum(delta + tol, 0.0)
    return np.maximum(np.abs(delta) - tol, 0.0)


def _fit(labels: np.ndarray, delta: np.ndarray, tol: float) -> tuple[int, int]:
    """Best ordered split (a, b): exploration 1..a, integration a+1..b, convergence b+1..L."""
    n = len(labels)
    miss = {t: np.r_[0, np.cumsum(labels != t)] for t in (1, 0, -1)}
    dist = {t: np.r_[0.0, np.cumsum(_band_distance(delta, t, tol))] for t in (1, 0, -1)}

    def cost(a: int, b: int) -> tuple[int, float]:
        parts = ((1, 0, a), (0, a, b), (-1, b, n))
        return (
            sum(int(miss[t][hi] - miss[t][lo]) for t, lo, hi in parts),
            sum(float(dist[t][hi] - dist[t][lo]) for t, lo, hi in parts),
        )

    return min(((a, b) for a in range(n + 1) for b in range(a, n + 1)), key=lambda ab: (cost(*ab), ab))


def segment(delta_ffn: Sequence[float], rel_tol: float = 0.05, abs_tol: float = 0.01, min_run: int = 2) -> Stages:
    """EIC stages and boundary layer of a ΔH_FFN curve given for layers 1..L (index 0 = layer 1)."""
    delta = np.asarray(delta_ffn, dtype=np.float64)
    if delta.ndim != 1 or len(delta) < 2:
        raise InputError(f"need a ΔH_FFN curve over at least 2 layers, got shape {delta.shape}")
    if not np.all(np.isfinite(delta)):
        bad = [i + 1 for i in np.flatnonzero(~np.isfinite(delta))]
        raise InputError(f"ΔH_FFN is NaN/inf at layers {bad}; re-run the profile with the ffn component")
    if rel_tol < 0 or abs_tol < 0 or min_run < 1:
        raise InputError("need rel_tol >= 0, abs_tol >= 0 and min_run >= 1")
    tol = max(rel_tol * float(np.max(np.abs(delta))), abs_tol)
    labels = despeckle(label_layers(delta, tol), min_run)
    a, b = _fit(labels, delta, tol)
    n = len(delta)
    spans = [(1, a), (a + 1, b), (b + 1, n)]
    exploration, integration, convergence = (span if span[0] <= span[1] else None for span in spans)
    return Stages(
        delta_ffn=tuple(float(x) for x in delta),
        labels=tuple(int(x) for x in labels),
        exploration=exploration,
        integration=integration,
        convergence=convergence,
        boundary_layer=min(a, n - 1) if a > 0 else None,
        tolerance=tol,
        rel_tol=rel_tol,
        abs_tol=abs_tol,
        min_run=min_run,
    )


def describe(stages: Stages) -> str:
    """Human-readable table of ΔH_FFN, labels and stages, then the stage spans and the boundary layer."""
    sign = {1: "+", 0: "0", -1: "-"}
    lines = [
        f"tolerance {stages.tolerance:.4g} nats = max({stages.rel_tol:g} x max|ΔH_FFN|, {stages.abs_tol:g}); "
        f"min run {stages.min_run}",
        "layer      ΔH_FFN  label  stage",
    ]
    for layer, (d, lab) in enumerate(zip(stages.delta_ffn, stages.labels), start=1):
        lines.append(f"{layer:5d}  {d:10.4f}  {sign[lab]:>5}  {stages.stage_of(layer)}")
    for name, (first, last) in stages.spans().items():
        lines.append(f"{name:<13} layers {first}-{last}")
    k = stages.boundary_layer
    capped = " exploration reaches layer L, so capped at L-1;" if stages.exploration == (1, stages.n_layers) else ""
    lines.append(
        f"boundary layer: {k} (BuPO internal layer;{capped} 0-based HF block index {k - 1})"
        if k is not None
        else "boundary layer: none (no exploration stage; give BuPO an explicit internal layer)"
    )
    return "\n".join(lines)


def ffn_delta(summary: pd.DataFrame) -> pd.Series:
    """ΔH_FFN per layer 1..L (index = layer) from a summary table (rows with component == "ffn")."""
    missing = {"layer", "component", "delta"} - set(summary.columns)
    if missing:
        raise InputError(f"summary table lacks columns {sorted(missing)}; pass the summary.csv of a profile run")
    ffn = summary.loc[summary["component"] == "ffn"].set_index("layer")["delta"].sort_index()
    if ffn.empty:
        raise InputError("summary has no 'ffn' rows; profile with the ffn component to find EIC stages")
    expected = list(range(1, int(ffn.index.max()) + 1))
    if list(ffn.index) != expected:
        raise InputError(f"ffn rows cover layers {list(ffn.index)}, expected 1..{expected[-1]} once each")
    return ffn.astype(float)


def stages_from_summary(summary: pd.DataFrame, **params: float) -> Stages:
    """EIC stages of a profile's summary table; `params` go to :func:`segment`."""
    return segment(ffn_delta(summary).to_numpy(), **params)


def require_boundary(stages: Stages) -> int:
    """The boundary layer, or a clear error when the curve has no exploration stage."""
    if stages.boundary_layer is None:
        raise InputError(
            "ΔH_FFN has no exploration stage (no layer with ΔH_FFN > "
            f"{stages.tolerance:.3g} nats before the curve flattens or falls), so there is no boundary "
            "layer; pass an explicit internal layer instead of 'auto'"
        )
    return stages.boundary_layer


def boundary_layer(summary: pd.DataFrame, **params: float) -> int:
    """BuPO's internal layer k (1..L-1): the last layer of the exploration stage of ΔH_FFN."""
    return require_boundary(stages_from_summary(summary, **params))


def write_stages(path: str | Path, stages: Stages) -> Path:
    """Store `stages` as JSON at `path` (a run folder means RUN_DIR/stages.json); return the file written."""
    path = Path(path)
    path = path / STAGES if path.is_dir() else path
    try:
        write_json(path, stages.to_dict())
    except OSError as err:
        message = f"cannot write {path} ({err.strerror}); pass --out FILE to write the stages elsewhere"
        raise InputError(message) from None
    return path


def run_stages(run_dir: str | Path) -> Stages:
    """Stages of a run, read-only: stages.json if it matches summary.csv, else recomputed with its parameters.

    Nothing is written, so read-only runs can be plotted; `internal-policy stages` stores a segmentation.
    """
    run_dir = Path(run_dir)
    delta = tuple(ffn_delta(load_run(run_dir).summary).to_list())
    path = run_dir / STAGES
    params: dict[str, float] = {}
    if path.is_file():
        stored = _read_stages(path)
        if len(stored.delta_ffn) == len(delta) and np.allclose(stored.delta_ffn, delta, rtol=1e-9, atol=0):
            return stored
        params = {"rel_tol": stored.rel_tol, "abs_tol": stored.abs_tol, "min_run": stored.min_run}
    return segment(delta, **params)


def _read_stages(path: Path) -> Stages:
    """A stored segmentation; a damaged file is an InputError."""
    data = read_json(path)
    try:
        return Stages.from_dict(data)
    except (TypeError, KeyError, AttributeError):
        raise InputError(f"{path} is not a stages file written by `internal-policy stages`; delete it or "
                         "write it again with that command") from None


def run_boundary_layer(run_dir: str | Path) -> int:
    """Boundary layer of a profile run folder (for BuPO's ``internal_layer="auto"``)."""
    return require_boundary(run_stages(run_dir))
