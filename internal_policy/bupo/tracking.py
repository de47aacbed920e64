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
rollouts: π^k's during BuPO's internal phase). Rows are (step, metric, layer, value, k, policy),
written to parquet: `k` is the internal layer a k-specific metric refers to (-1 for the others; a
bottom-up schedule tracks every stage's k), `policy` the policy the last update trained ("pi^2",
"pi_theta"; "init" at step 0). Entropies come from `capture.extract` + `entropy.Decoder` (fp32, nats).
The latest measurement also goes into the trainer's logged scalars (`scalars`, prefix `tracker/`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch
from transformers import TrainerCallback

from ..capture import extract
from ..data import pad_batch, tokenize_records
from ..entropy import Decoder, row_cosine
from ..errors import InputError
from ..models import ModelSpec, context_length, describe, pad_token_id
from ..runs import atomic_write
from ..stats import ENTROPY, NLL, KLOut, decode

TRL_KEYS = {"reward": "reward", "entropy": "trl_entropy"}
"""TRL log keys copied into the table, and their metric names there."""

K_METRICS = ("delta_k", "cos_k", "kl_k")
"""Metrics that refer to an internal layer k (measured once per tracked k)."""

COLUMNS = ["step", "metric", "layer", "value", "k", "policy"]


def _kept(examples, seq_len: int) -> torch.Tensor:
    """Mask [B, T] of kept positions that have a next token inside the sequence."""
    mask = torch.zeros(len(examples), seq_len, dtype=torch.bool)
    for row, e in enumerate(examples):
        mask[row, e.start:min(e.stop, len(e.input_ids) - 1)] = True
    return mask


@torch.no_grad()
def measure(model, tokenizer, records: list[dict], k: int | Sequence[int], spec: ModelSpec | None = None,
            final_norm: bool = False) -> list[dict]:
    """All tracked quantities of `model` on `records` at internal layer(s) k → rows {metric, layer, value, k}.

    `k` is -1 in the rows that do not depend on k. One forward and one decoding of every layer serve all
    the ks; each k after the first decodes only its later layers once more, for KL(π^k ‖ π^l).
    """
    spec = spec or describe(model)
    ks = [k] if isinstance(k, int) else list(k)
    if not ks or not all(1 <= x <= spec.n_layers for x in ks):
        raise InputError(f"tracking layers {ks} must be in 1..{spec.n_layers} (paper numbering)")
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
    # one pass of internal_policy.stats: every layer's entropy and KL(π^k ‖ π^l) for the first k (π^k as the
    # reference), then the later layers' KL for each further k, then the actor's entropy and NLL (perplexity)
    raw = Decoder.from_spec(spec, final_norm=final_norm)
    inner = decode(raw, H, [ENTROPY, KLOut()], reference=(raw, H[ks[0]]))
    kl = {ks[0]: {layer: v["kl_out"] for layer, v in inner.items() if layer > ks[0]}}
    for x in ks[1:]:
        later = {layer: h for layer, h in H.items() if layer > x}
        kl[x] = {layer: v["kl_out"] for layer, v in
                 (decode(raw, later, [KLOut()], reference=(raw, H[x])) if later else {}).items()}
    targets = ids[:, 1:][keep[:, :-1]]
    actor = Decoder.output_of(spec).statistics(H[spec.n_layers], [ENTROPY, NLL()], targets=targets)
    rows = [{"metric": "entropy", "layer": layer, "value": v["entropy"].mean().item(), "k": -1}
            for layer, v in inner.items()]
    rows.append({"metric": "actor_entropy", "layer": spec.n_layers, "value": actor["entropy"].mean().item(), "k": -1})
    for x in ks:
        rows.append({"metric": "delta_k", "layer": x, "k": x,
                     "value": (inner[x]["entropy"] - inner[x - 1]["entropy"]).mean().item()})
        for layer, value in kl[x].items():
            rows.append({"metric": "cos_k", "layer": layer, "k": x, "value": row_cosine(H[x], H[layer]).mean().item()})
            rows.append({"metric": "kl_k", "layer": layer, "k": x, "value": value.mean().item()})
    rows.append({"metric": "perplexity", "layer": spec.n_layers, "value": actor["nll"].mean().exp().item(), "k": -1})
    return rows


class EntropyTracker(TrainerCallback):
    """Measures the probe set at step 0 and at every logging step; the table is `frame()` / `path`.

    `internal_layer` is the k to follow, or several (a bottom-up schedule: each stage's k);
    `policy_at(step)` names the policy 0-based optimizer step `step` trained (BuPOTrainer.policy_at).
    The table is written at every checkpoint and at the end; `restore` reloads it for a resumed run.
    """

    def __init__(self, tokenizer, probe: list[dict], internal_layer: int | Sequence[int],
                 path: str | Path | None = None, final_norm: bool = False,
                 policy_at: Callable[[int], str] | None = None):
        if not probe:
            raise InputError("EntropyTracker needs a non-empty probe set of {'text': ...} or prompt/response records")
        self.tokenizer, self.probe, self.final_norm = tokenizer, probe, final_norm
        self.ks = [internal_layer] if isinstance(internal_layer, int) else list(internal_layer)
        if not self.ks:
            raise InputError("EntropyTracker needs a layer k to follow")
        self.policy_at = policy_at or (lambda step: "")
        self.path = Path(path) if path is not None else None
        self.rows: list[dict] = []
        self._measured: set[int] = set()

    def _measure(self, step: int, model) -> None:
        if step in self._measured:
            return
        self._measured.add(step)
        policy = "init" if step == 0 else self.policy_at(step - 1)
        self.rows += [{"step": step, **row, "policy": policy}
                      for row in measure(model, self.tokenizer, self.probe, self.ks, final_norm=self.final_norm)]

    def scalars(self, step: int) -> dict[str, float]:
        """The measurement at `step` as flat scalars for the trainer's log (means over l for cos_k and kl_k)."""
        out = {}
        for row in (r for r in self.rows if r["step"] == step and r["layer"] != -1):
            if row["metric"] in K_METRICS:
                key = f"tracker/{row['metric']}{row['k']}"
                out.setdefault(key, []).append(row["value"])
            elif row["metric"] != "entropy":
                out[f"tracker/{row['metric']}"] = [row["value"]]
        return {key: sum(values) / len(values) for key, values in out.items()}

    def restore(self, table: pd.DataFrame, upto_step: int) -> None:
        """Take back the rows of an interrupted run up to `upto_step` (its last checkpoint)."""
        kept = table[table["step"] <= upto_step]
        self.rows = kept[COLUMNS].to_dict("records")
        self._measured = set(kept.loc[kept["layer"] != -1, "step"])

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Measure the untrained model (step 0) on the main process."""
        if state.is_world_process_zero:  # the model is the same on every rank; only the main process logs
            self._measure(state.global_step, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        """Measure at every logging step, on the main process."""
        if control.should_log and state.is_world_process_zero:
            self._measure(state.global_step, model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Copy TRL's entropy and reward metrics from the log into the table."""
        for key, metric in TRL_KEYS.items():
            if logs and key in logs:
                self.rows.append({"step": state.global_step, "metric": metric, "layer": -1, "value": float(logs[key]),
                                  "k": -1, "policy": self.policy_at(state.global_step - 1)})

    def on_save(self, args, state, control, **kwargs):
        """Write the table at every checkpoint save."""
        if state.is_world_process_zero:
            self.write()

    def on_train_end(self, args, state, control, **kwargs):
        """Write the final table."""
        if state.is_world_process_zero:
            self.write()

    def write(self) -> None:
        """Write the table to `path` (atomically), if there is one."""
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            frame = self.frame()
            atomic_write(self.path, lambda tmp: frame.to_parquet(tmp, index=False))

    def frame(self) -> pd.DataFrame:
        """The tracked table: step, metric, layer (-1 for TRL metrics), value, k (-1: not k-specific), policy."""
        return pd.DataFrame(self.rows, columns=COLUMNS)
