"""The run folder: the tables a profiling run leaves on disk, and reading them back.

Figures, stage detection and BuPO's `internal_layer="auto"` read runs through it (pandas only).
Layers are numbered as in the paper: 1..L, 0 = the embedding output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import InputError

SUMMARY = "summary.csv"
TOKENS = "tokens.parquet"
RUN_JSON = "run.json"


@dataclass
class ProfileResult:
    """Tables of one run: `summary` (per layer × component), `tokens` (per token, or None), `meta`.

    For a run on disk, `tokens` is read from `tokens.parquet` on first access (it can be large).
    """

    summary: pd.DataFrame
    meta: dict
    out_dir: Path | None = None
    _tokens: pd.DataFrame | None = None

    @property
    def tokens(self) -> pd.DataFrame | None:
        path = self.out_dir / TOKENS if self.out_dir is not None else None
        if self._tokens is None and path is not None and path.exists():
            self._tokens = pd.read_parquet(path)
        return self._tokens


def load_run(run_dir: str | Path) -> ProfileResult:
    """Read a finished run folder back into a `ProfileResult`."""
    path = Path(run_dir)
    if not (path / SUMMARY).is_file():
        raise InputError(f"{path} holds no finished run (no summary.csv); run `internal-policy profile --out {path}`")
    meta_path = path / RUN_JSON
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return ProfileResult(pd.read_csv(path / SUMMARY), meta, path)
