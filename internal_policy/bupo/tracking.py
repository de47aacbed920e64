"""Entropy tracking during BuPO/GRPO training (paper Fig. 5 and Fig. 7) as a TRL/transformers callback.

At the start and at every logging step the callback measures, on a fixed held-out probe set, at the
kept positions (`internal_policy.data` conventions):
- `actor_entropy`: entropy of π_θ (final norm + unembedding: the model's own output policy);
- `entropy` per layer l = 0..L: entropy of the raw internal policy π^l = softmax(H_l W_Uᵀ + b);
- `delta_k`: ΔH at layer k = H(π^k) − H(π^{k−1}), mean of the per-token difference (Fig. 5b);
- `cos_k` per later layer l: cosine similarity of H_k with H_l (Fig. 5a);
- `kl_k` per later layer l: KL(π^k ‖ π^l) in nats, raw policies on both sides (Fig. 5d);
- `perplexity` of π_θ on the probe's kept next tokens (Fig. 5c);
plus, from TRL's own logs, `reward` and `trl_entropy` (entropy of the policy being optimised on the
rollouts: π^k's during BuPO's internal phase). Rows are (step, metric, layer, value), written to
parquet. Entropies come from `capture.extract` + `entropy.Decoder` (fp32, nats).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from transformers import TrainerCallback

from ..capture import extract
from ..data import pad_batch, tokenize_records
from ..entropy import Decoder, row_cosine
from ..errors import InputError
from ..models import ModelSpec, context_length, describe, pad_token_id
from ..stats import ENTROPY, NLL, KLOut, decode

TRL_KEYS = {"reward": "reward", "entropy": "trl_entropy"}
"""TRL log keys copied into the table, and their metric names there."""


def _kept(examples, seq_len: int) -> torch.Tensor:
    """Mask [B, T] of kept positions that have a next token inside the sequence."""
    mask = torch.zeros(len(examples), seq_len, dtype=torch.bool)
    for row, e in enumerate(examples):
        mask[row, e.start:min(e.stop, len(e.input_ids) - 1)] = True
    return mask


@torch.no_grad()
def measure(model, tokenizer, records: list[dict], k: int, spec: ModelSpec | None = None,
            final_norm: bool = False) -> list[dict]:
    """All tracked quantities of `model` on `records` at internal layer k → rows {metric, layer, value}."""
    spec = spec or describe(model)
    if not 1 <= k <= spec.n_layers:
        raise InputError(f"tracking layer {k} is out of range 1..{spec.n_layers} (paper numbering)")
    examples = tokenize_records(records, tokenizer, context_length(model), truncate=True)
    device = spec.unembed_weight.device
    ids, attention = pad_batch(examples, pad_token_id(tokenizer), device)
    keep = _kept(examples, ids.shape[1]).to(device)
    if not keep.any():
        raise InputError("the probe set has no position with a next token to measure; give longer texts")
    was_training = model.training
    model.eval()
    hidden = extract(model, ids, attention, components=("layer",), spec=spec)
    model.train(was_training)
    H = {layer: hidden[(layer, "layer")][keep] for layer in range(spec.n_layers + 1)}
    # one pass of internal_policy.stats: every layer's entropy and KL(π^k ‖ π^l) (π^k as the reference),
    # then the actor's entropy and NLL (the perplexity) in another
    raw = Decoder.from_spec(spec, final_norm=final_norm)
    inner = decode(raw, H, [ENTROPY, KLOut()], reference=(raw, H[k]))
    targets = ids[:, 1:][keep[:, :-1]]
    actor = Decoder.output_of(spec).statistics(H[spec.n_layers], [ENTROPY, NLL()], targets=targets)
    rows = [{"metric": "entropy", "layer": layer, "value": v["entropy"].mean().item()} for layer, v in inner.items()]
    rows.append({"metric": "actor_entropy", "layer": spec.n_layers, "value": actor["entropy"].mean().item()})
    rows.append({"metric": "delta_k", "layer": k,
                 "value": (inner[k]["entropy"] - inner[k - 1]["entropy"]).mean().item()})
    for layer in range(k + 1, spec.n_layers + 1):
        rows.append({"metric": "cos_k", "layer": layer, "value": row_cosine(H[k], H[layer]).mean().item()})
        rows.append({"metric": "kl_k", "layer": layer, "value": inner[layer]["kl_out"].mean().item()})
    rows.append({"metric": "perplexity", "layer": spec.n_layers, "value": actor["nll"].mean().exp().item()})
    return rows


class EntropyTracker(TrainerCallback):
    """Measures the probe set at step 0 and at every logging step; the table is `frame()` / `path`."""

    def __init__(self, tokenizer, probe: list[dict], internal_layer: int, path: str | Path | None = None,
                 final_norm: bool = False):
        if not probe:
            raise InputError("EntropyTracker needs a non-empty probe set of {'text': ...} or prompt/response records")
        self.tokenizer, self.probe, self.k, self.final_norm = tokenizer, probe, internal_layer, final_norm
        self.path = Path(path) if path is not None else None
        self.rows: list[dict] = []
        self._measured: set[int] = set()

    def _measure(self, step: int, model) -> None:
        if step in self._measured:
            return
        self._measured.add(step)
        for row in measure(model, self.tokenizer, self.probe, self.k, final_norm=self.final_norm):
            self.rows.append({"step": step, **row})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._measure(state.global_step, model)

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        self._measure(state.global_step, model)
        for key, metric in TRL_KEYS.items():
            if logs and key in logs:
                self.rows.append({"step": state.global_step, "metric": metric, "layer": -1, "value": float(logs[key])})

    def on_train_end(self, args, state, control, **kwargs):
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.frame().to_parquet(self.path, index=False)

    def frame(self) -> pd.DataFrame:
        """The tracked table: step, metric, layer (-1 for TRL metrics), value."""
        return pd.DataFrame(self.rows, columns=["step", "metric", "layer", "value"])
