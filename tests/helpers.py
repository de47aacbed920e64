"""Helpers shared by several test files (test files never import each other).

Synthetic profile runs for the stages and plot tests: per-token values first, summary by groupby.
The summary follows the run-folder schema (summary.csv, tokens.parquet, run.json), computed here
independently with pandas from a random per-token table, so tests can compare figures against
both tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

COMPONENTS = ("layer", "attn_in", "attn", "resid_mid", "ffn_in", "ffn")


def synthetic_tokens(
    n_layers: int = 6,
    n_records: int = 2,
    n_positions: int = 7,
    vocab_size: int = 512,
    ffn_delta: np.ndarray | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Per-token table (tokens.parquet schema); ΔH_FFN per token = ffn_delta[l-1] + noise when given."""
    rng = np.random.default_rng(seed)
    top = np.log(vocab_size)
    rows = []
    for r in range(n_records):
        for pos in range(n_positions):
            token_id = int(rng.integers(0, vocab_size))
            token = f"t{token_id}" if pos % 3 else f" w{pos}$"  # spaces and '$' exercise the label escaping
            h_prev = rng.uniform(0.5, top - 0.5)
            rows.append((f"rec{r}", pos, token_id, token, 0, "layer", h_prev, np.nan, np.nan))
            for layer in range(1, n_layers + 1):
                ent = {c: rng.uniform(0.2, top - 0.2) for c in COMPONENTS}
                if ffn_delta is not None:
                    ent["ffn"] = ent["ffn_in"] + ffn_delta[layer - 1] + rng.normal(0, 0.01)
                delta = {
                    "layer": ent["layer"] - h_prev,
                    "attn": ent["attn"] - ent["attn_in"],
                    "ffn": ent["ffn"] - ent["ffn_in"],
                }
                cos = {"attn": rng.uniform(-1, 1), "ffn": rng.uniform(-1, 1)}
                for comp in COMPONENTS:
                    values = (ent[comp], delta.get(comp, np.nan), cos.get(comp, np.nan))
                    rows.append((f"rec{r}", pos, token_id, token, layer, comp, *values))
                h_prev = ent["layer"]
    cols = ["record_id", "position", "token_id", "token", "layer", "component", "entropy", "delta", "cos_resid"]
    return pd.DataFrame(rows, columns=cols)


def summarise(tokens: pd.DataFrame) -> pd.DataFrame:
    """summary.csv schema from a per-token table (token-weighted means, std over tokens, sums)."""
    grouped = tokens.groupby(["layer", "component"], sort=False)
    out = grouped.agg(
        entropy=("entropy", "mean"),
        entropy_std=("entropy", "std"),
        delta=("delta", "mean"),
        delta_std=("delta", "std"),
        cos_resid=("cos_resid", "mean"),
        cos_resid_std=("cos_resid", "std"),
        n_tokens=("entropy", "size"),
        entropy_sum=("entropy", "sum"),
        delta_sum=("delta", lambda x: x.sum(min_count=1)),
        cos_sum=("cos_resid", lambda x: x.sum(min_count=1)),
    ).reset_index()
    for col, src in (("entropy_sumsq", "entropy"), ("delta_sumsq", "delta"), ("cos_sumsq", "cos_resid")):
        out[col] = grouped[src].apply(lambda x: (x**2).sum(min_count=1)).to_numpy()
    return out


def write_run(run_dir: Path, tokens: pd.DataFrame, vocab_size: int = 512, model: str = "synthetic/tiny") -> Path:
    """A run folder (summary.csv, tokens.parquet, run.json) as `internal-policy profile` writes it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    summarise(tokens).to_csv(run_dir / "summary.csv", index=False)
    tokens.to_parquet(run_dir / "tokens.parquet", index=False)
    meta = {
        "model": model,
        "model_type": "llama",
        "n_layers": int(tokens["layer"].max()),
        "vocab_size": vocab_size,
        "n_records": int(tokens["record_id"].nunique()),
        "n_tokens": int(len(tokens.loc[tokens["layer"] == 0])),
    }
    (run_dir / "run.json").write_text(json.dumps(meta))
    return run_dir


def assert_records_match_tokens(records: pd.DataFrame, tokens: pd.DataFrame, atol: float = 1e-5) -> None:
    """records.parquet against a plain pandas groupby over tokens.parquet: per (record, layer, component) the
    mean and population std of every statistic over that record's tokens, and the token count."""
    key = ["record_id", "layer", "component"]
    if "head" in tokens.columns:  # -1 on the rows without a head: a MultiIndex lookup cannot match <NA>
        key.append("head")
        tokens, records = (t.assign(head=t["head"].fillna(-1).astype(int)) for t in (tokens, records))
    stats = [c for c in ("entropy", "delta", "cos_resid", "nll", "rank", "kl_out") if c in tokens.columns]
    grouped = tokens.groupby(key, dropna=False)[stats]
    sizes = tokens.groupby(key, dropna=False).size().rename("n_tokens")
    expected = grouped.mean().join(grouped.std(ddof=0), rsuffix="_std").join(sizes)
    got = records.set_index(key)
    assert len(got) == len(expected) and not got.index.duplicated().any()
    got = got.loc[expected.index]
    for column in expected.columns:
        np.testing.assert_allclose(got[column].to_numpy(float), expected[column].to_numpy(float), atol=atol,
                                   err_msg=column)
