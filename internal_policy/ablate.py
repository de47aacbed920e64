"""Module ablation: how much the model's own prediction changes when one module's write is removed.

A *module* is one write to the residual stream: for paper layer l = 1..L (0-based HF block l − 1),
`attn` = A_l, `ffn` = F_l, or `attn_head` = head h's share of A_l, z_h W_O[h] (h 0-based; z_h is
head h's slice of the attention output projection's input, so the projection bias stays). Each
module's write is replaced, in one forward, by
- `zero`: nothing (the write is zeroed), or
- `mean`: its mean over the input's kept tokens: a first, unablated pass averages the write over
  every kept position of every record (token-weighted; for text records every position, for
  prompt + response records the positions that predict a response token, see `data.py`).
  The mean then replaces the write at *every* position of the sequence (prompt positions included):
  mean-ablation as in the circuits literature, so the ablated module carries no token-specific
  information anywhere. For a head, the mean of z_h is substituted (its write is linear in z_h).

and the model's own output distribution (what `model(...).logits` gives: final norm, logit scale,
soft-cap and bias included, fp32 accumulation) is compared with the unablated run at the kept
positions:
- `delta_nll` = mean over kept positions that have a next token of NLL(next token | ablated) −
  NLL(next token | unablated) (a text record's last position has none);
- `delta_entropy` = mean over kept positions of H(ablated output) − H(unablated output), in nats;
- `_se` = the standard error of the mean of those per-token paired differences, sd (ddof = 1) / √n.

Cost. A batch of B records is repeated `copies` times (default: up to `AUTO_TOKENS` positions per
forward) along the batch dimension; a hook on each
ablated module replaces the write in its copy's rows only, so one forward measures `copies`
ablations (the unablated baseline is one of the copies of the first forward), and the output is
decoded from the last block's rows at kept positions only (`stats.decode`, no [B, T, V] logits).
Hooks replace tensors rather than reading them, which `capture` (read-only streaming) does not do.

Run folder (`out_dir`): `ablation.csv`, `run.json` (model, settings, fingerprints, baseline means,
status), `means.npz` (mean mode: the mean writes, so a resumed run reuses them) and `shards/` (one
per batch: per-module count / sum / sum of squares of the differences, a `.done` marker last). A
killed run resumes from its finished shards to exactly the same table; changed settings, records,
weights or dtype are refused (as for `profile`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .capture import _first
from .data import Example, batched, pad_batch, tokenize_records
from .entropy import Decoder
from .errors import InputError
from .models import ModelSpec, context_length, describe, pad_token_id
from .runs import RunDir, read_json
from .settings import FINGERPRINT, describe_change, fingerprints
from .stats import decode, resolve

COMPONENTS = ("attn", "ffn", "attn_head")
"""Ablatable writes, in table order within a layer."""
MODES = ("zero", "mean")
ABLATION = "ablation.csv"
MEANS = "means.npz"
COLUMNS = ("layer", "component", "head", "delta_nll", "delta_nll_se", "delta_entropy", "delta_entropy_se",
           "n_tokens", "n_next_tokens")
_STATS = resolve(["entropy", "nll"])
AUTO_TOKENS = 4096
"""Token positions per forward that the default `copies` aims at (batch × copies × padded length); picked by hand
on a loaded 2-core CPU, not a measured optimum (`bench/ablate_copies.py --copies K` compares sizes)."""


@dataclass(frozen=True)
class Unit:
    """One ablated module: paper layer (1..L), component, and the 0-based head for `attn_head`."""

    layer: int
    component: str
    head: int | None = None

    @property
    def name(self) -> str:
        """'<layer>.<component>[.<head>]', e.g. '3.attn_head.5'."""
        return f"{self.layer}.{self.component}" + (f".{self.head}" if self.head is not None else "")


def parse_layers(text: str) -> tuple[int, ...]:
    """'1,3,5-8' → (1, 3, 5, 6, 7, 8): paper layers, sorted, without repeats."""
    layers: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match or (match[2] and int(match[2]) < int(match[1])):
            raise InputError(f"--layers: {part!r} is not a layer or a range a-b (paper layers 1..L), e.g. 1,3,5-8")
        layers.update(range(int(match[1]), int(match[2] or match[1]) + 1))
    return tuple(sorted(layers))


@dataclass(frozen=True)
class AblationSettings:
    """What an ablation run computes. `batch_size` and `copies` change only float rounding (not in the resume key)."""

    components: tuple[str, ...] = ("attn", "ffn")
    layers: tuple[int, ...] | None = None
    """Paper layers 1..L to ablate (None: all)."""
    mode: str = "zero"
    truncate: bool = False
    chat: dict = field(default_factory=dict)
    batch_size: int = 8
    """Records per batch (one shard each)."""
    copies: int | None = None
    """Ablated copies of a batch per forward (memory grows with batch_size × copies × length); None: as many as
    keep a forward at about `AUTO_TOKENS` token positions."""

    KEY = ("components", "layers", "mode", "truncate", "chat")

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        components = (self.components,) if isinstance(self.components, str) else tuple(self.components)
        unknown = [c for c in components if c not in COMPONENTS]
        if unknown or not components:
            raise InputError(f"--components: unknown component(s) {unknown or '(none given)'}; "
                             f"choose from {', '.join(COMPONENTS)}")
        set_("components", tuple(c for c in COMPONENTS if c in components))
        if self.layers is not None:
            set_("layers", tuple(sorted({int(x) for x in self.layers})))
        if self.mode not in MODES:
            raise InputError(f"--mode: unknown mode {self.mode!r}; choose zero or mean")
        for name in ("batch_size", "copies"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        set_("chat", dict(self.chat))

    def resume_key(self) -> dict:
        """The settings a resumed run must match, JSON-normalised."""
        data = json.loads(json.dumps(asdict(self)))
        return {k: data[k] for k in self.KEY}


def units(spec: ModelSpec, settings: AblationSettings) -> list[Unit]:
    """The modules to ablate, by layer then component (heads 0..H−1); bad layers or unsupported heads raise."""
    n = spec.n_layers
    layers = settings.layers if settings.layers is not None else tuple(range(1, n + 1))
    outside = [x for x in layers if not 1 <= x <= n]
    if outside or not layers:
        raise InputError(f"--layers {outside or '(none)'} out of range: this model has layers 1..{n} (paper numbering; "
                         "the embedding, layer 0, writes no module)")
    heads = spec.head_projections() if "attn_head" in settings.components else []
    found = []
    for layer in layers:
        for component in settings.components:
            if component != "attn_head":
                found.append(Unit(layer, component))
                continue
            found += [Unit(layer, component, h) for h in range(heads[layer - 1].n_heads)]
    return found


@dataclass(frozen=True)
class Where:
    """Where a unit's write is hooked: `module`'s output, or with `pre` its input (a head's z_h, in the output
    projection's input); `columns` = the feature slice holding the write; `key` names the hooked tensor's mean."""

    module: nn.Module
    pre: bool
    columns: slice
    key: str


def locate(spec: ModelSpec, chosen: Sequence[Unit]) -> dict[Unit, Where]:
    """The hook site of every unit (one `head_projection` per layer)."""
    found: dict[Unit, Where] = {}
    head_dims: dict[int, tuple[nn.Module, int]] = {}
    for unit in chosen:
        key = Unit(unit.layer, unit.component).name
        if unit.head is None:
            module = spec.block_part(unit.layer - 1, getattr(spec.layout, unit.component))
            found[unit] = Where(module, False, slice(None), key)
            continue
        if unit.layer not in head_dims:
            projection = spec.head_projection(unit.layer - 1)
            head_dims[unit.layer] = (projection.module, projection.head_dim)
        module, d = head_dims[unit.layer]
        found[unit] = Where(module, True, slice(unit.head * d, (unit.head + 1) * d), key)
    return found


def _hook(pre: bool, edit):
    """A forward (pre-)hook that passes the tensor carrying the write through `edit` (tuples kept)."""
    if pre:
        return lambda _m, args: (edit(args[0]), *args[1:])

    def hook(_module, _args, out):
        return (edit(out[0]), *out[1:]) if isinstance(out, (tuple, list)) else edit(out)
    return hook


def _kept_mask(batch: Sequence[Example], width: int) -> torch.Tensor:
    """[B, T] bool: the kept positions [start, stop) of each record."""
    t = torch.arange(width)
    return torch.stack([(t >= e.start) & (t < e.stop) for e in batch])


def mean_writes(model: nn.Module, spec: ModelSpec, examples: Sequence[Example], chosen: Sequence[Unit],
                batch_size: int = 8, progress: bool = False, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Token-weighted mean of each hooked tensor over every kept position of `examples` (float64, by `Where.key`:
    `<layer>.attn`, `<layer>.ffn`, `<layer>.attn_head` = the output projection's input, all heads)."""
    targets = {w.key: (w.module, w.pre) for w in locate(spec, chosen).values()}
    sums: dict[str, torch.Tensor] = {}
    count = 0
    device = model.get_input_embeddings().weight.device
    bar = tqdm(total=len(examples), unit="rec", desc="ablate: mean writes", disable=not progress)
    for batch in batched(examples, batch_size):
        ids, mask = pad_batch(batch, pad_id, device)
        kept = _kept_mask(batch, ids.shape[1])

        def add(key, kept=kept):
            def edit(x):
                part = x[kept.to(x.device)].double().sum(0)
                sums[key] = sums[key] + part if key in sums else part
                return x
            return edit

        handles = [m.register_forward_pre_hook(_hook(True, add(k))) if pre
                   else m.register_forward_hook(_hook(False, add(k))) for k, (m, pre) in targets.items()]
        try:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        finally:
            for handle in handles:
                handle.remove()
        count += int(kept.sum())
        bar.update(len(batch))
    bar.close()
    return {k: (v / count).cpu().numpy() for k, v in sums.items()}


@torch.no_grad()
def _measure(model, spec, where, batch, group, means, pad_id) -> torch.Tensor:
    """One forward of len(group) copies of `batch`, copy k with group[k] ablated (None: none).

    Returns [copies, 2, n_kept] fp32: the output entropy and the next-token NLL (NaN: no next token)."""
    device = model.get_input_embeddings().weight.device
    ids, mask = pad_batch(batch, pad_id, device)
    rows, width = ids.shape
    edits: dict[nn.Module, tuple[bool, list]] = {}
    for k, unit in enumerate(group):
        if unit is not None:
            at = where[unit]
            value = 0.0 if means is None else torch.as_tensor(means[at.key][at.columns])
            edits.setdefault(at.module, (at.pre, []))[1].append((slice(k * rows, (k + 1) * rows), at.columns, value))

    def replace(changes):
        def edit(x):
            x = x.clone()
            for r, c, value in changes:
                x[r, :, c] = value.to(x) if torch.is_tensor(value) else value
            return x
        return edit

    positions = [np.arange(e.start, e.stop) for e in batch]
    flat = torch.from_numpy(np.concatenate([row * width + p for row, p in enumerate(positions)]))
    targets = torch.from_numpy(np.concatenate([e.next_tokens(p) for e, p in zip(batch, positions)]))
    n = len(flat)
    held: list[torch.Tensor] = []
    last = spec.layers[-1]
    index = (torch.arange(len(group))[:, None] * rows * width + flat).reshape(-1)
    handles = [m.register_forward_pre_hook(_hook(True, replace(ch))) if pre
               else m.register_forward_hook(_hook(False, replace(ch))) for m, (pre, ch) in edits.items()]
    handles.append(last.register_forward_hook(
        lambda _m, _a, out: held.append(_first(out).reshape(-1, spec.d_model)[index.to(_first(out).device)])))
    try:
        copies = len(group)
        model(input_ids=ids.repeat(copies, 1), attention_mask=mask.repeat(copies, 1), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    values = decode(Decoder.output_of(spec), {0: held[0]}, _STATS, targets=targets.repeat(len(group)))[0]
    return torch.stack([values["entropy"], values["nll"]]).reshape(2, len(group), n).transpose(0, 1).cpu()


def _moments(name: str, values: torch.Tensor) -> dict:
    """Count, sum and sum of squares (float64) of the non-NaN values, as `<name>_n`, `_sum`, `_sumsq`."""
    x = values.double()[~torch.isnan(values)]
    return {f"{name}_n": len(x), f"{name}_sum": x.sum().item(), f"{name}_sumsq": x.square().sum().item()}


def _sums(units_: Sequence[Unit], measured: Mapping[Unit | None, torch.Tensor]) -> pd.DataFrame:
    """Per unit: the moments of the paired differences ablated − unablated; a `baseline` row: the unablated values."""
    base = measured[None].double()
    rows = [{"layer": u.layer, "component": u.component, "head": -1 if u.head is None else u.head,
             **_moments("entropy", measured[u][0] - base[0]), **_moments("nll", measured[u][1] - base[1])}
            for u in units_]
    rows.append({"layer": 0, "component": "baseline", "head": -1, **_moments("entropy", base[0]),
                 **_moments("nll", base[1])})
    return pd.DataFrame(rows)


def _ablate_batch(model, spec, where, batch, chosen, means, copies, pad_id, bar) -> pd.DataFrame:
    """All ablations of one batch in forwards of `copies` copies; the per-unit sums."""
    order: list[Unit | None] = [None, *chosen]
    copies = copies or max(1, AUTO_TOKENS // (len(batch) * max(len(e.input_ids) for e in batch)))
    measured: dict[Unit | None, torch.Tensor] = {}
    tokens = sum(len(e.input_ids) for e in batch)
    for start in range(0, len(order), copies):
        group = order[start : start + copies]
        for unit, values in zip(group, _measure(model, spec, where, batch, group, means, pad_id)):
            measured[unit] = values
        bar.update(tokens * len(group))
    return _sums(chosen, measured)


def summarize(sums: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The ablation table (see module docstring) and the unablated means, from per-batch sums in any number."""
    totals = sums.groupby(["layer", "component", "head"], sort=False, as_index=False).sum()
    out = totals[["layer", "component", "head"]].copy()
    for name in ("nll", "entropy"):
        n = totals[f"{name}_n"].astype(float)
        mean = totals[f"{name}_sum"] / n
        var = (totals[f"{name}_sumsq"] - n * mean**2).clip(lower=0) / (n - 1)
        out[f"delta_{name}"] = mean
        out[f"delta_{name}_se"] = np.sqrt(var / n).where(n > 1)
    out["n_tokens"] = totals["entropy_n"].astype(np.int64)
    out["n_next_tokens"] = totals["nll_n"].astype(np.int64)
    base = out[out["component"] == "baseline"].iloc[0]
    baseline = {"nll": float(base["delta_nll"]), "entropy": float(base["delta_entropy"])}
    out = out[out["component"] != "baseline"]
    rank = out["component"].map({c: i for i, c in enumerate(COMPONENTS)})
    out = out.assign(_rank=rank).sort_values(["layer", "_rank", "head"]).drop(columns="_rank")
    out["head"] = out["head"].astype("Int64").where(out["head"] >= 0)
    return out[list(COLUMNS)].reset_index(drop=True), baseline


def _describe(key: str, saved, now) -> str:
    """How a resume error names one difference (the fingerprints as for `profile`, else the flag and values)."""
    if key in FINGERPRINT:
        return describe_change(key, saved, now)
    return f"--{key.replace('_', '-')} ({json.dumps(saved)} -> {json.dumps(now)})"


def _mean_file(run: RunDir, compute) -> dict[str, np.ndarray]:
    """The mean writes of a run folder (computed and written once, read back on resume)."""
    if (run.path / MEANS).is_file():
        with np.load(run.path / MEANS) as saved:
            return {k: saved[k] for k in saved.files}
    means = compute()
    run.write(MEANS, lambda p: p.write_bytes(_npz_bytes(means)))
    return means


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def ablate(
    model: nn.Module,
    tokenizer,
    records: Sequence[Mapping],
    settings: AblationSettings | None = None,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    model_name: str | None = None,
    **options,
) -> pd.DataFrame:
    """Ablate every chosen module of `model` over `records`; the ablation table (see module docstring).

    `settings` and/or keyword `options` (fields of `AblationSettings`: components, layers, mode,
    batch_size, copies, ...) say what to ablate. With `out_dir`, results are written batch by batch
    and `resume=True` continues an interrupted run. The table's `attrs["meta"]` holds the run.json content.
    """
    settings = settings or AblationSettings()
    if options:
        settings = AblationSettings(**{**asdict(settings), **options})
    spec = describe(model)
    chosen = units(spec, settings)
    where = locate(spec, chosen)
    examples = tokenize_records(records, tokenizer, context_length(model), settings.truncate, settings.chat,
                                vocab_size=model.get_input_embeddings().weight.shape[0])
    layers = sorted({u.layer for u in chosen})
    fingerprint = fingerprints(model, spec, examples, tokenizer, weights=out_dir is not None)
    key = {**settings.resume_key(), "layers": layers, **fingerprint}
    meta = {"model": model_name or getattr(model.config, "_name_or_path", type(model).__name__),
            "model_type": spec.model_type, "n_layers": spec.n_layers, "n_heads": spec.n_heads,
            **asdict(settings), **key, "n_records": len(examples), "n_modules": len(chosen),
            "truncated_tokens": sum(e.truncated for e in examples), "version": __version__,
            "layer_numbering": "paper: 1..L, 0 = embedding output; head: 0-based within the layer"}
    pad_id = pad_token_id(tokenizer)
    run = RunDir(out_dir) if out_dir is not None else None
    done = run.start(meta, list(key), resume, describe=_describe) if run is not None else set()
    started = time.perf_counter()
    means = None
    if settings.mode == "mean":
        compute = lambda: mean_writes(model, spec, examples, chosen, settings.batch_size, progress, pad_id)  # noqa: E731
        means = _mean_file(run, compute) if run is not None else compute()
    pending = [e for e in examples if e.record_id not in done]
    bar = tqdm(total=sum(len(e.input_ids) for e in pending) * (len(chosen) + 1), unit="tok", unit_scale=True,
               desc=f"ablate ({len(chosen)} modules)", disable=not progress)
    parts = []
    for batch in batched(pending, settings.batch_size):
        sums = _ablate_batch(model, spec, where, batch, chosen, means, settings.copies, pad_id, bar)
        if run is None:
            parts.append(sums)
        else:
            run.write_shard([e.record_id for e in batch], sums=sums)
    bar.close()
    if run is not None:  # every shard in name order: a resumed run adds up exactly as an uninterrupted one
        parts = [run.read_shards("sums")]
    table, baseline = summarize(pd.concat(parts, ignore_index=True))
    meta.update(baseline=baseline, n_tokens=int(table["n_tokens"].iloc[0]),
                seconds=round(time.perf_counter() - started, 3), status="complete")
    if run is not None:
        run.write(ABLATION, lambda p: table.to_csv(p, index=False))
        meta = run.finish(meta)
    table.attrs["meta"] = meta
    return table


def load_ablation(run_dir: str | Path) -> pd.DataFrame:
    """A finished ablation run's table (`attrs["meta"]`: its run.json)."""
    path = Path(run_dir)
    if not (path / ABLATION).is_file():
        raise InputError(f"{path} holds no finished ablation run (no {ABLATION}); "
                         f"run `internal-policy ablate --out {path}`")
    table = pd.read_csv(path / ABLATION, dtype={"head": "Int64"})
    table.attrs["meta"] = read_json(path / "run.json")
    return table
