"""Float64 full-softmax references of every statistic, written from the textbook formulas (no chunking).

`reference_stats` takes whole logit rows; `check_stats` compares a computed table with it: scalars to
1e-4 (+ 5e-6 relative, and optionally + `per_logit`·max|z| of the row: fp32 logits of magnitude M
carry rounding of ~M·6e-8 per operation, which the synthetic tests, with |z| up to ~600 and KL up
to ~370 nats, reach), and the discrete statistics (rank, top1_agree, top-k ids) exactly wherever the reference is
not within TIE of a tie (rank: within the counts allowed by logits closer than TIE to z_y).
"""

from __future__ import annotations

import math

import numpy as np
import torch

TIE = 1e-4


def reference_stats(z: torch.Tensor, y: torch.Tensor | None = None, z_out: torch.Tensor | None = None,
                    alphas=(2.0,), k: int = 0) -> dict[str, np.ndarray]:
    """Statistics of softmax(z) per row (float64): z [n, V], next tokens y [n] (−1: none), output logits z_out."""
    z = z.double()
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    out = {"entropy": -(p * logp).sum(-1), "logit_scale": z.abs().amax(-1)}
    for a in alphas:
        name = "renyiinf" if math.isinf(a) else f"renyi{a:g}"
        out[name] = -logp.max(-1).values if math.isinf(a) else torch.logsumexp(a * logp, -1) / (1 - a)
    if y is not None:
        has = y >= 0
        zy = z.gather(1, y.clamp(min=0)[:, None])
        out["nll"] = torch.where(has, -logp.gather(1, y.clamp(min=0)[:, None])[:, 0], math.nan)
        out["rank_lo"] = torch.where(has, 1 + (z > zy + TIE).sum(-1), math.nan).double()
        out["rank_hi"] = torch.where(has, 1 + (z > zy - TIE).sum(-1) - 1, math.nan).double()  # minus z_y itself
    if z_out is not None:
        logp_out = torch.log_softmax(z_out.double(), dim=-1)
        out["kl_out"] = (logp_out.exp() * (logp_out - logp)).sum(-1)
        out["logit_scale"] = torch.maximum(out["logit_scale"], z_out.double().abs().amax(-1))
        out["top1_agree"] = (z.argmax(-1) == z_out.argmax(-1)).double()
        out["top1_clear"] = torch.minimum(_gap(z, 2)[:, 0], _gap(z_out.double(), 2)[:, 0]) > TIE
    if k:
        ids = z.topk(k, dim=-1).indices  # by logit: probabilities far below the top underflow to 0 (ties)
        out["topk_probs"], out["topk_ids"] = p.gather(1, ids), ids
        out["topk_clear"] = (_gap(z, min(k + 1, z.shape[1])) > TIE).all(-1)
    return {name: v.detach().numpy() for name, v in out.items()}


def _gap(z: torch.Tensor, m: int) -> torch.Tensor:
    """Differences between consecutive values of the m largest logits of each row [n, m-1]."""
    top = z.topk(m, dim=-1).values
    return top[:, :-1] - top[:, 1:] if m > 1 else torch.full((z.shape[0], 1), math.inf, dtype=z.dtype)


def check_stats(ours: dict, ref: dict, atol: float = 1e-4, rtol: float = 5e-6, per_logit: float = 0.0) -> None:
    """Assert a table of statistics (column → array) equals the reference (see module docstring)."""
    for name, expected in ref.items():
        if name.startswith(("rank", "top1_clear", "topk")) or name in ("top1_agree", "logit_scale"):
            continue
        got = np.asarray(ours[name], dtype=float)
        assert (np.isnan(got) == np.isnan(expected)).all(), name
        ok = ~np.isnan(expected)
        excess = (np.abs(got[ok] - expected[ok]) - atol - rtol * np.abs(expected[ok])
                  - (per_logit * ref["logit_scale"][ok] if per_logit else 0))
        assert excess.max(initial=0) <= 0, (name, np.abs(got[ok] - expected[ok]).max())
    if "rank_lo" in ref:
        got = np.asarray(ours["rank"], dtype=float)
        assert (np.isnan(got) == np.isnan(ref["rank_lo"])).all()
        ok = ~np.isnan(got)
        assert ((ref["rank_lo"][ok] <= got[ok]) & (got[ok] <= ref["rank_hi"][ok])).all(), "rank"
    if "top1_agree" in ref:
        clear = ref["top1_clear"]
        np.testing.assert_array_equal(np.asarray(ours["top1_agree"], dtype=float)[clear], ref["top1_agree"][clear])
    if "topk_ids" in ref:
        ids, probs = np.stack(list(ours["topk_ids"])), np.stack(list(ours["topk_probs"]))
        np.testing.assert_allclose(np.sort(probs, 1), np.sort(ref["topk_probs"], 1), atol=atol, rtol=0)
        clear = ref["topk_clear"]
        np.testing.assert_array_equal(ids[clear], ref["topk_ids"][clear])
