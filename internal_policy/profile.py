"""Profiling runs: internal-policy entropies, ΔH and residual cosines over a set of records.

One forward per batch streams the residual decomposition (`capture`) into `_BatchConsumer`, which
gathers the kept positions, decodes each unique tensor once (`Decoder.entropy`) and drops it, so
memory does not grow with the number of layers. Per-site counts, sums and sums of squares
(float64) make every summary exactly mergeable: across batches, resumed attempts and ranks.

A run folder holds:
- `summary.csv`: one row per (layer, component): means, stds, standard errors and the raw sums;
- `tokens.parquet`: one row per (kept token, layer, component) unless `keep_tokens=False`;
- `run.json`: model, settings, counts, package version, status;
- `shards/`: what each finished batch wrote (sums, tokens, and a `.done` marker written last).
  An interrupted run resumes from the shards whose marker exists; nothing finished is recomputed.

Multi-process: under `torch.distributed` (torchrun / accelerate launch) each rank takes every
world_size-th pending record, writes its own shards, and rank 0 merges them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import __version__
from .capture import COMPONENTS, Site, capture
from .data import Example, batched, pad_batch, tokenize_records
from .dist import atomic_write, barrier, check_resume, rank_world
from .entropy import Decoder, row_cosine
from .errors import InputError
from .models import ModelSpec, context_length, describe, pad_token_id
from .runs import ProfileResult, claim_run_dir, finished_ids, load_run, read_json, read_shard, remove_unfinished

ORDER = ("attn_in", "attn", "resid_mid", "ffn_in", "ffn", "layer")
"""Forward order of the components inside one layer (used to sort tables)."""
DELTA_OF = {"layer": "layer", "attn": "attn_in", "ffn": "ffn_in"}
"""ΔH pairs: component → the input it is compared with (for `layer`, the previous layer's H)."""
COSINE_OF = {"attn": "layer", "ffn": "resid_mid"}
"""Residual cosines: cos(A_l, H_{l-1}) and cos(F_l, resid_mid)."""
STATS = ("entropy", "delta", "cos")
SETTINGS = ("model", "final_norm", "components", "token_sample", "seed", "truncate", "chat")
"""run.json keys that must match for `resume` to continue a run."""


def check_components(components: Sequence[str] | None) -> tuple[str, ...]:
    """Validate a component subset (None = all six)."""
    if components is None:
        return COMPONENTS
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise InputError(f"unknown component(s) {unknown or '(none given)'}; choose from {', '.join(COMPONENTS)}")
    return tuple(c for c in COMPONENTS if c in components)


class _BatchConsumer:
    """Capture callback for one batch: entropies of the needed sites and the residual cosines."""

    def __init__(self, decoder: Decoder, index: torch.Tensor, decode: set[str]):
        self.decoder, self.index, self.decode = decoder, index, decode
        self.entropy: dict[Site, torch.Tensor] = {}
        self.cos: dict[Site, torch.Tensor] = {}
        self.last_rows: dict[str, torch.Tensor] = {}

    def __call__(self, layer: int, component: str, x: torch.Tensor | None, alias: Site | None) -> None:
        if alias is not None:
            rows = self.last_rows[alias[1]]
            if component in self.decode:  # reuse the alias's entropy; decode only if it was not needed
                known = self.entropy.get(alias)
                self.entropy[(layer, component)] = known if known is not None else self.decoder.entropy(rows).cpu()
            self.last_rows[component] = rows
            return
        rows = x.detach().reshape(-1, x.shape[-1]).index_select(0, self.index.to(x.device))
        rows = rows.to(self.decoder.weight.device)  # with device_map, blocks sit on several GPUs
        if component in COSINE_OF:
            self.cos[(layer, component)] = row_cosine(rows, self.last_rows[COSINE_OF[component]]).cpu()
        if component in self.decode:
            self.entropy[(layer, component)] = self.decoder.entropy(rows).cpu()
        self.last_rows[component] = rows


def _kept_positions(example: Example, token_sample: float | None, seed: int) -> np.ndarray:
    """Kept positions of one example; with `token_sample`, a seeded random subset (at least one)."""
    positions = np.arange(example.start, example.stop)
    if token_sample is None or token_sample >= 1:
        return positions
    digest = int(hashlib.sha1(example.record_id.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng([seed, digest])
    n = max(1, round(token_sample * len(positions)))
    return np.sort(rng.choice(positions, size=n, replace=False))


def _profile_batch(model, spec, decoder, batch, pad_id, components, token_sample, seed, tokenizer, keep_tokens):
    """Run one batch; return (per-site sums DataFrame, per-token DataFrame or None, n kept tokens)."""
    device = model.get_input_embeddings().weight.device
    input_ids, attention_mask = pad_batch(batch, pad_id, device)
    width = input_ids.shape[1]
    kept = [_kept_positions(e, token_sample, seed) for e in batch]
    flat = torch.from_numpy(np.concatenate([row * width + p for row, p in enumerate(kept)]))
    decode = set(components) | {DELTA_OF[c] for c in components if c in DELTA_OF}
    consumer = _BatchConsumer(decoder, flat.to(device), decode)
    with torch.no_grad(), capture(model, consumer, spec):  # logits_to_keep=1: no [B, T, V] output logits
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)

    sites = [(0, "layer")] if "layer" in components else []
    sites += [(layer, c) for layer in range(1, spec.n_layers + 1) for c in ORDER if c in components]
    sums, blocks = [], []
    n = len(flat)
    for layer, component in sites:
        entropy = consumer.entropy[(layer, component)].double()
        delta = cos = torch.full((n,), float("nan"), dtype=torch.float64)
        if component in DELTA_OF and (component != "layer" or layer > 0):
            before = (layer - 1, "layer") if component == "layer" else (layer, DELTA_OF[component])
            delta = entropy - consumer.entropy[before].double()
        if (layer, component) in consumer.cos:
            cos = consumer.cos[(layer, component)].double()
        row = {"layer": layer, "component": component, "n_tokens": n}
        for name, values in zip(STATS, (entropy, delta, cos)):
            valid = not torch.isnan(values).all()
            row[f"{name}_sum"] = values.sum().item() if valid else float("nan")
            row[f"{name}_sumsq"] = values.square().sum().item() if valid else float("nan")
        sums.append(row)
        if keep_tokens:
            blocks.append(pd.DataFrame({"layer": layer, "component": component, "entropy": entropy.float().numpy(),
                                        "delta": delta.float().numpy(), "cos_resid": cos.float().numpy()}))
    tokens = None
    if keep_tokens and blocks:
        token_ids = np.concatenate([np.asarray(e.input_ids)[p] for e, p in zip(batch, kept)])
        ids = {
            "record_id": np.concatenate([[e.record_id] * len(p) for e, p in zip(batch, kept)]),
            "position": np.concatenate(kept).astype(np.int64),
            "token_id": token_ids.astype(np.int64),
        }
        texts = {t: tokenizer.decode([int(t)]) for t in np.unique(token_ids)}
        ids["token"] = np.array([texts[t] for t in token_ids], dtype=object)
        head = pd.DataFrame(ids)
        tokens = _sort_tokens([pd.concat([head, block], axis=1) for block in blocks])
    return pd.DataFrame(sums), tokens, n


def summarize(sums: pd.DataFrame) -> pd.DataFrame:
    """Summary table from per-site sums (any number of batches, attempts or ranks): exact merging."""
    totals = sums.groupby(["layer", "component"], sort=False, as_index=False).sum(min_count=1)
    n = totals["n_tokens"].astype(float)
    out = totals[["layer", "component"]].copy()
    names = {"entropy": "entropy", "delta": "delta", "cos": "cos_resid"}
    for stat, column in names.items():
        mean = totals[f"{stat}_sum"] / n
        var = (totals[f"{stat}_sumsq"] / n - mean**2).clip(lower=0)
        out[column] = mean
        out[f"{column}_std"] = np.sqrt(var)
        out[f"{column}_se"] = np.sqrt(var / n)
    out["n_tokens"] = totals["n_tokens"].astype(np.int64)
    for stat in STATS:
        out[f"{stat}_sum"] = totals[f"{stat}_sum"]
        out[f"{stat}_sumsq"] = totals[f"{stat}_sumsq"]
    out["component"] = pd.Categorical(out["component"], categories=ORDER, ordered=True)
    out = out.sort_values(["layer", "component"]).reset_index(drop=True)
    out["component"] = out["component"].astype(str)
    return out


def _sort_tokens(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """One batch's per-token table in a stable order: record, position, then layer and forward order."""
    tokens = pd.concat(parts, ignore_index=True)
    rank = tokens["component"].map({c: i for i, c in enumerate(ORDER)})
    order = np.lexsort((rank.to_numpy(), tokens["layer"].to_numpy(), tokens["position"].to_numpy(),
                        tokens["record_id"].to_numpy().astype(str)))
    return tokens.iloc[order].reset_index(drop=True)


def _concat_parquet(parts: list[Path], target: Path) -> None:
    """Append parquet shards into one file one at a time, so memory holds a single shard."""
    import pyarrow.parquet as pq

    writer = None
    try:
        for part in parts:
            table = read_shard(part)
            writer = writer or pq.ParquetWriter(target, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


class _RunDir:
    """The on-disk state of a run: settings, finished shards, final tables."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.shards = self.path / "shards"

    def start(self, meta: dict, resume: bool, rank: int) -> set[str]:
        """Check resumability; return the ids of records already finished."""
        run_json = self.path / "run.json"
        self.lock = claim_run_dir(self.path, lock=rank == 0)
        if run_json.exists():
            check_resume(self.path, read_json(run_json), meta, SETTINGS, resume)
        barrier()
        if rank == 0:
            atomic_write(run_json, lambda p: p.write_text(json.dumps({**meta, "status": "running"}, indent=2)))
            self.shards.mkdir(parents=True, exist_ok=True)
            remove_unfinished(self.shards)
        barrier()
        return finished_ids(self.shards)

    def write_shard(self, record_ids: list[str], sums: pd.DataFrame, tokens: pd.DataFrame | None) -> None:
        """Write one batch's results; the `.done` marker goes last, so a killed write leaves no trace."""
        name = hashlib.sha1("\n".join(sorted(record_ids)).encode()).hexdigest()[:16]
        atomic_write(self.shards / f"{name}.sums.parquet", lambda p: sums.to_parquet(p, index=False))
        if tokens is not None:
            atomic_write(self.shards / f"{name}.tokens.parquet", lambda p: tokens.to_parquet(p, index=False))
        atomic_write(self.shards / f"{name}.done", lambda p: p.write_text(json.dumps(record_ids)))

    def finish(self, meta: dict, keep_tokens: bool) -> ProfileResult:
        """Merge every finished shard into summary.csv / tokens.parquet and mark the run complete."""
        names = sorted(p.name.split(".")[0] for p in self.shards.glob("*.done"))
        sums = pd.concat([read_shard(self.shards / f"{n}.sums.parquet").to_pandas() for n in names], ignore_index=True)
        summary = summarize(sums)
        atomic_write(self.path / "summary.csv", lambda p: summary.to_csv(p, index=False))
        if keep_tokens:
            atomic_write(self.path / "tokens.parquet",
                          lambda p: _concat_parquet([self.shards / f"{n}.tokens.parquet" for n in names], p))
        n_records = sum(len(json.loads((self.shards / f"{n}.done").read_text())) for n in names)
        first = summary.iloc[0]
        meta = {**meta, "n_records": n_records, "n_tokens": int(first["n_tokens"]), "status": "complete"}
        atomic_write(self.path / "run.json", lambda p: p.write_text(json.dumps(meta, indent=2)))
        self.lock.release(force=True)  # also a hold left by an interrupted attempt in this process
        return ProfileResult(summary, meta, self.path)


def profile(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[Mapping],
    *,
    chat: Mapping | None = None,
    components: Sequence[str] | None = None,
    final_norm: bool = False,
    batch_size: int = 8,
    truncate: bool = False,
    token_sample: float | None = None,
    seed: int = 0,
    keep_tokens: bool = True,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    model_name: str | None = None,
    spec: ModelSpec | None = None,
) -> ProfileResult:
    """Profile internal-policy entropies of `model` over `records` (see module docstring).

    With `out_dir`, results are written batch by batch and `resume=True` continues an interrupted
    run; without it everything stays in memory. `chat` holds chat-template options for chat records
    (e.g. `{"enable_thinking": False}` for Qwen3). `token_sample` (0 < f < 1) decodes a seeded random
    fraction of the kept positions; the summary's `*_se` columns give each mean's standard error.
    """
    components = check_components(components)
    if token_sample is not None and not 0 < token_sample <= 1:
        raise InputError(f"token_sample must be a fraction in (0, 1], got {token_sample}")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    spec = spec or describe(model)
    decoder = Decoder.from_spec(spec, final_norm=final_norm)
    examples = tokenize_records(records, tokenizer, context_length(model), truncate, chat,
                                vocab_size=model.get_input_embeddings().weight.shape[0])
    rank, world = rank_world()
    meta = {
        "model": model_name or getattr(model.config, "_name_or_path", type(model).__name__),
        "model_type": spec.model_type, "n_layers": spec.n_layers, "vocab_size": spec.vocab_size,
        "d_model": spec.d_model, "dtype": str(spec.unembed_weight.dtype).removeprefix("torch."),
        "device": str(spec.unembed_weight.device), "final_norm": final_norm, "components": list(components),
        "token_sample": token_sample, "seed": seed, "truncate": truncate, "chat": dict(chat or {}),
        "skipped_empty_responses": len(records) - len(examples),
        "truncated_tokens": sum(e.truncated for e in examples), "world_size": world, "version": __version__,
        "layer_numbering": "paper: 1..L, 0 = embedding output",
    }
    run = _RunDir(Path(out_dir)) if out_dir is not None else None
    done = run.start(meta, resume, rank) if run else set()
    pending = [e for e in examples if e.record_id not in done]
    mine = pending[rank::world]
    pad_id = pad_token_id(tokenizer)
    all_sums, all_tokens = [], []
    bar = tqdm(total=sum(len(e.input_ids) for e in mine), unit="tok", unit_scale=True,
               desc=f"profile{f' rank {rank}' if world > 1 else ''}", disable=not progress)
    started = time.perf_counter()
    for batch in batched(mine, batch_size):
        sums, tokens, _ = _profile_batch(model, spec, decoder, batch, pad_id, components, token_sample, seed,
                                         tokenizer, keep_tokens)
        if run:
            run.write_shard([e.record_id for e in batch], sums, tokens)
        else:
            all_sums.append(sums)
            all_tokens.append(tokens)
        bar.update(sum(len(e.input_ids) for e in batch))
    bar.close()
    meta["seconds"] = round(time.perf_counter() - started, 3)
    if run is None:
        summary = summarize(pd.concat(all_sums, ignore_index=True))
        tokens = pd.concat(all_tokens, ignore_index=True) if keep_tokens else None
        meta.update(n_records=len(examples), n_tokens=int(summary.iloc[0]["n_tokens"]), status="complete")
        return ProfileResult(summary, meta, _tokens=tokens)
    barrier()
    result = run.finish(meta, keep_tokens) if rank == 0 else None
    barrier()
    return result if result is not None else load_run(run.path)
