"""Profiling runs: statistics of every internal policy (entropy, ΔH, residual cosines, ...) over records.

Each batch runs one forward (or several, see below) that streams the residual decomposition
(`capture`) into a `sites.RowHolder`, which keeps the rows of the kept positions of every site the
`sites.SitePlan` decodes directly; after the forward `stats.decode` computes every requested
statistic of every site in one pass over the vocabulary, stacking all sites of a token chunk into
one matmul per vocabulary chunk (and summing logit blocks where raw decoding is linear). Per-site
counts, sums and sums of squares (float64) make every summary exactly mergeable: across batches,
resumed attempts and ranks.

Memory: the logits stay within two [rows × vocab_chunk] fp32 blocks whatever the number of
layers or tokens; the held hidden rows cost kept_tokens × (direct sites + 1) × d_model of the
model's dtype per forward. A batch whose kept rows exceed `hidden_budget_mb` runs as several
forwards (a long record as several prefixes ending at its kept positions, which a causal model
computes identically), so `--batch-size` bounds the records per shard and the budget the rows per
forward; `--token-sample` shrinks the rows, not the forward.

A run folder holds:
- `summary.csv`: one row per (layer, component): for each column (entropy, delta, cos_resid and each
  statistic) its mean, `_std`, `_se` and the count / sum / sum of squares that merge exactly; with the
  opt-in component `attn_head`, one row per (layer, head) too and an integer `head` column (0-based
  within the layer, empty on the other rows; absent from runs without heads).
  With `group_by=FIELD` (`--group-by`), a leading `group` column: the rows over all records keep an empty
  `group`, and one more set of rows per value of that record field follows (`load_run` returns them
  as `ProfileResult.groups`, the overall rows as `summary`, so readers of the overall profile are unchanged);
- `records.parquet`: one row per (record, layer, component[, head]): the same columns over that record's tokens
  (mean, `_std`, `_se`, count / sum / sum of squares, `n_tokens`), then the record's scalar fields
  (`data.record_fields`, e.g. `correct` from `--generate`); `internal-policy predict` reads it;
- `tokens.parquet`: one row per (kept token, layer, component[, head]) unless `keep_tokens=False`
  (`attn_head` adds L·n_heads rows per token: use `--no-tokens` for big models);
- `run.json`: model, settings (`ProfileSettings`), fingerprints, counts, package version, status;
- `shards/`: what each finished batch wrote (per-record sums, tokens, and a `.done` marker written last).
  A record lies in one batch, so per-record sums are complete in their shard and merge by concatenation;
  the summary and the per-group rows are sums of them;
  the record fields and groups are joined from the input at the end, so they need not match on resume.
  An interrupted run resumes from the shards whose marker exists; nothing finished is recomputed,
  and a run whose settings, records, weights or dtype differ is refused (`settings.resume_key`).

Multi-process: under `torch.distributed` (torchrun / accelerate launch) each rank takes every
world_size-th pending record, writes its own shards, and rank 0 merges them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import __version__
from .capture import Site, capture
from .data import Example, batched, pad_batch, record_fields, record_id, tokenize_records
from .dist import barrier, rank_world
from .entropy import Decoder
from .errors import InputError
from .models import ModelSpec, context_length, describe, pad_token_id
from .runs import HEAD_COLUMN, RECORDS, SUMMARY, TOKENS, ProfileResult, RunDir, head_ints, load_run, read_shard
from .settings import ProfileSettings, describe_change, fingerprints, resume_key
from .sites import ORDER, RowHolder, SitePlan, delta_input
from .stats import decode


def _kept_positions(example: Example, token_sample: float | None, seed: int) -> np.ndarray:
    """Kept positions of one example; with `token_sample`, a seeded random subset (at least one)."""
    positions = np.arange(example.start, example.stop)
    if token_sample is None or token_sample >= 1:
        return positions
    digest = int(hashlib.sha1(example.record_id.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng([seed, digest])
    n = max(1, round(token_sample * len(positions)))
    return np.sort(rng.choice(positions, size=n, replace=False))


def _forwards(batch: list[Example], kept: list[np.ndarray], per_token: int, budget: int):
    """Split a batch into forwards of at most `budget` bytes of held rows: lists of (example, positions)."""
    cap = max(1, budget // max(per_token, 1))
    groups: list[list[tuple[Example, np.ndarray]]] = [[]]
    size = 0
    for example, positions in zip(batch, kept):
        for i in range(0, len(positions), cap):
            part = positions[i : i + cap]
            if size + len(part) > cap and groups[-1]:
                groups.append([])
                size = 0
            groups[-1].append((example, part))
            size += len(part)
    return groups


def _decode_forward(model, spec, plan, decoders, group, pad_id, stats, held):
    """One forward over prefixes of the group's records, then every statistic of every planned site."""
    device = model.get_input_embeddings().weight.device
    prefixes = [replace(e, input_ids=e.input_ids[: p[-1] + 1]) for e, p in group]
    input_ids, attention_mask = pad_batch(prefixes, pad_id, device)
    width = input_ids.shape[1]
    flat = torch.from_numpy(np.concatenate([row * width + p for row, (_, p) in enumerate(group)]))
    holder = RowHolder(flat.to(device), held, decoders[0].weight.device, plan.heads)
    # logits_to_keep=1: no [B, T, V] output logits
    with torch.no_grad(), capture(model, holder, spec, heads=bool(plan.heads)):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    targets = torch.from_numpy(np.concatenate([e.next_tokens(p) for e, p in group]))
    reference = (decoders[1], holder.rows[plan.output]) if plan.output in held else None
    values = decode(decoders[0], {s: holder.rows[s] for s in plan.direct}, stats, targets=targets,
                    reference=reference, sums=plan.sums)
    return {s: {c: v.cpu() for c, v in cols.items()} for s, cols in values.items()}, holder.cos


def _record_sums(owner: np.ndarray, site: Site, columns: dict[str, torch.Tensor], head: dict) -> pd.DataFrame:
    """Per record (`owner[i]` owns token i): n_tokens and each column's count, sum and sum of squares of its
    non-NaN values (NaN sums where there are none), one row per record of this site (`head`: its head entry)."""
    frame = pd.DataFrame({name: v.numpy() for name, v in columns.items()})
    by, squares = frame.groupby(owner, sort=False), frame.pow(2).groupby(owner, sort=False)
    parts = {"n": by.count(), "sum": by.sum(min_count=1), "sumsq": squares.sum(min_count=1)}
    out = pd.concat([parts[k].add_suffix(f"_{k}") for k in parts], axis=1)
    out = out[[f"{name}_{k}" for name in frame.columns for k in parts]]
    keys = pd.DataFrame({"record_id": out.index, "layer": site[0], "component": site[1], **head,
                         "n_tokens": by.size()})
    return pd.concat([keys, out], axis=1).reset_index(drop=True)


def _texts(ids: np.ndarray, tokenizer) -> np.ndarray:
    """Token texts of an id array (each distinct id decoded once)."""
    unique, inverse = np.unique(ids, return_inverse=True)
    texts = np.array([tokenizer.decode([int(t)]) for t in unique], dtype=object)
    return texts[inverse].reshape(ids.shape)


def _profile_batch(model, spec, plan, decoders, batch, pad_id, settings, tokenizer):
    """Run one batch; return (per-record-and-site sums, per-token DataFrame or None)."""
    stats = settings.statistics()
    kept = [_kept_positions(e, settings.token_sample, settings.seed) for e in batch]
    held = set(plan.direct) | ({plan.output} if any(st.needs_output for st in stats) else set())
    per_token = len(held) * spec.d_model * spec.unembed_weight.element_size()
    found: dict[Site, dict[str, list]] = {}
    cosines: dict[Site, list] = {}
    for group in _forwards(batch, kept, per_token, int(settings.hidden_budget_mb * 2**20)):
        values, cos = _decode_forward(model, spec, plan, decoders, group, pad_id, stats, held)
        for site, cols in values.items():
            for column, v in cols.items():
                found.setdefault(site, {}).setdefault(column, []).append(v)
        for site, v in cos.items():
            cosines.setdefault(site, []).append(v)
    values = {s: {c: torch.cat(parts) for c, parts in cols.items()} for s, cols in found.items()}
    n = sum(len(p) for p in kept)
    nan = torch.full((n,), float("nan"), dtype=torch.float64)
    owner = np.repeat([e.record_id for e in batch], [len(p) for p in kept])
    record_sums, blocks = [], []
    for site in plan.sites:
        own = values[plan.source[site]]
        before = delta_input(site)
        columns = {
            "entropy": own["entropy"].double(),
            "delta": own["entropy"].double() - values[plan.source[before]]["entropy"].double() if before else nan,
            "cos_resid": torch.cat(cosines[site]).double() if site in cosines else nan,
            **{c: own[c].double() for st in stats if not st.per_token for c in st.columns if c != "entropy"},
        }
        record_sums.append(_record_sums(owner, site, columns, _head_of(plan, site)))
        if settings.keep_tokens:
            block = pd.DataFrame({"layer": site[0], "component": site[1], **_head_of(plan, site),
                                  **{name: v.float().numpy() for name, v in columns.items()}})
            for st in stats:
                if st.per_token:
                    for column in st.columns:
                        block[column] = list(own[column].numpy())
                    if "topk_ids" in st.columns:
                        block["topk_tokens"] = list(_texts(own["topk_ids"].numpy(), tokenizer))
            blocks.append(block)
    tokens = None
    if settings.keep_tokens and blocks:
        token_ids = np.concatenate([np.asarray(e.input_ids)[p] for e, p in zip(batch, kept)])
        ids = {
            "record_id": np.concatenate([[e.record_id] * len(p) for e, p in zip(batch, kept)]),
            "position": np.concatenate(kept).astype(np.int64),
            "token_id": token_ids.astype(np.int64),
        }
        ids["token"] = _texts(token_ids, tokenizer)
        head = pd.DataFrame(ids)
        tokens = _sort_tokens([pd.concat([head, block], axis=1) for block in blocks])
    return head_ints(pd.concat(record_sums, ignore_index=True)), tokens


def _head_of(plan: SitePlan, site) -> dict:
    """The `head` entry of a table row: the head of an `attn_head` site, <NA> elsewhere, none without heads."""
    return {HEAD_COLUMN: site[2] if len(site) > 2 else pd.NA} if plan.heads else {}


def summarize(sums: pd.DataFrame, keys: Sequence[str] = ()) -> pd.DataFrame:
    """Summary table from per-site sums (any number of records, batches, attempts or ranks): exact merging.

    Rows are per (`keys`..., layer, component[, head]). Every `<name>_sum` column gives `<name>` (mean over
    its `<name>_n` finite values), `<name>_std` and `<name>_se`; the counts and sums are kept so that
    summaries merge again."""
    sums = head_ints(sums)
    by = [*keys, "layer", "component", *([HEAD_COLUMN] if HEAD_COLUMN in sums.columns else [])]
    totals = sums.groupby(by, sort=False, as_index=False, dropna=False).sum(min_count=1)
    names = [c.removesuffix("_sum") for c in sums.columns if c.endswith("_sum")]
    out = totals[by].copy()
    for name in names:
        n = totals[f"{name}_n"].astype(float)
        mean = totals[f"{name}_sum"] / n
        var = (totals[f"{name}_sumsq"] / n - mean**2).clip(lower=0)
        out[name] = mean
        out[f"{name}_std"] = np.sqrt(var)
        out[f"{name}_se"] = np.sqrt(var / n)
    out["n_tokens"] = totals["n_tokens"].astype(np.int64)
    for name in names:
        out[f"{name}_n"] = totals[f"{name}_n"].astype(np.int64)
        out[f"{name}_sum"] = totals[f"{name}_sum"]
        out[f"{name}_sumsq"] = totals[f"{name}_sumsq"]
    out["component"] = pd.Categorical(out["component"], categories=ORDER, ordered=True)
    out = out.sort_values(by, kind="stable").reset_index(drop=True)
    out["component"] = out["component"].astype(str)
    return out


def _sort_tokens(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """One batch's per-token table in a stable order: record, position, then layer, forward order and head."""
    tokens = head_ints(pd.concat(parts, ignore_index=True))
    rank = tokens["component"].map({c: i for i, c in enumerate(ORDER)})
    # lexsort is stable: the heads of a layer stay in the order of the parts (the plan's, head 0 first)
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


def _merge(run: RunDir, meta: dict, keep_tokens: bool, fields: pd.DataFrame, group_by: str | None) -> ProfileResult:
    """Merge every finished shard into summary.csv / records.parquet / tokens.parquet and mark the run complete."""
    summary, groups, records = _tables(run.read_shards("records"), fields, group_by)
    run.write(SUMMARY, lambda p: _with_groups(summary, groups).to_csv(p, index=False))
    run.write(RECORDS, lambda p: records.to_parquet(p, index=False))
    if keep_tokens:
        run.write(TOKENS, lambda p: _concat_parquet(run.shard_files("tokens"), p))
    meta = run.finish({**meta, "n_records": len(run.finished_ids()), "n_tokens": int(summary.iloc[0]["n_tokens"])})
    return ProfileResult(summary, meta, run.path, groups=groups, _records=records)


def _fields(records: Sequence[Mapping], examples: list[Example], group_by: str | None) -> pd.DataFrame:
    """One row per profiled record: `record_id` and its scalar fields (`data.record_fields`), in input order.

    Fields of mixed types become text (one parquet type per column). With `group_by`, every record must
    have that field: otherwise an InputError before any work is done."""
    kept = {e.record_id for e in examples}
    rows = [{"record_id": record_id(r, i), **record_fields(r)} for i, r in enumerate(records)]
    table = pd.DataFrame([r for r in rows if r["record_id"] in kept])
    for column in table.columns:
        values = table[column].dropna()
        if table[column].dtype == object and len({type(v) for v in values}) > 1:
            table[column] = table[column].map(lambda v: v if pd.isna(v) else str(v))
    if group_by is not None:
        missing = table["record_id"][table[group_by].isna()] if group_by in table else table["record_id"]
        if len(missing):
            have = ", ".join(c for c in table.columns if c != "record_id") or "none"
            hint = ("records get `correct` from --generate on prompts with a gold answer (answer, "
                    "reward_model.ground_truth, solution)" if group_by == "correct" else
                    f"scalar fields the records have: {have}")
            raise InputError(f"--group-by {group_by}: {len(missing)} of {len(table)} records have no {group_by!r} "
                             f"field (first: record {missing.iloc[0]}); {hint}")
    return table


def _tables(record_sums: pd.DataFrame, fields: pd.DataFrame, group_by: str | None):
    """(summary, per-group summary or None, records table) from the per-record sums and the record fields.

    The summary sums every record's sums; the per-group rows those of each group's records (`group`: the
    field's value as text)."""
    summary = summarize(record_sums.drop(columns="record_id"))
    table = summarize(record_sums, keys=["record_id"])
    extra = [c for c in fields.columns if c not in table.columns]
    records = fields[["record_id", *extra]].merge(table, on="record_id")[[*table.columns, *extra]]
    if group_by is None:
        return summary, None, records
    group = fields.set_index("record_id")[group_by].astype(str).rename("group")
    keyed = record_sums.join(group, on="record_id").drop(columns="record_id")
    return summary, summarize(keyed, keys=["group"]), records


def _with_groups(summary: pd.DataFrame, groups: pd.DataFrame | None) -> pd.DataFrame:
    """summary.csv: the overall rows, then with groups a leading `group` column (empty on the overall rows)."""
    return summary if groups is None else pd.concat([summary.assign(group=None), groups])[groups.columns]


def profile(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[Mapping],
    settings: ProfileSettings | None = None,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    model_name: str | None = None,
    spec: ModelSpec | None = None,
    **options,
) -> ProfileResult:
    """Profile the internal policies of `model` over `records` (see module docstring).

    `settings` (a `ProfileSettings`) and/or keyword `options` (any of its fields, e.g.
    `components=["layer"]`, `stats=["all"]`, `topk=5`, `final_norm=True`, `token_sample=0.25`,
    `chat={"enable_thinking": False}`) say what to compute. With `out_dir`, results are written
    batch by batch and `resume=True` continues an interrupted run with the same resume key;
    without it everything stays in memory.
    """
    settings = (settings or ProfileSettings()).updated(**options)
    spec = spec or describe(model)
    decoders = (Decoder.from_spec(spec, final_norm=settings.final_norm), Decoder.output_of(spec))
    linear = settings.linear and not settings.final_norm and spec.unembed_weight.dtype == torch.float32
    plan = SitePlan.build(spec, settings.components, linear)
    examples = tokenize_records(records, tokenizer, context_length(model), settings.truncate, settings.chat,
                                vocab_size=model.get_input_embeddings().weight.shape[0])
    fields = _fields(records, examples, settings.group_by)
    rank, world = rank_world()
    fingerprint = fingerprints(model, spec, examples, tokenizer, weights=out_dir is not None)
    meta = {
        "model": model_name or getattr(model.config, "_name_or_path", type(model).__name__),
        "model_type": spec.model_type, "n_layers": spec.n_layers, "vocab_size": spec.vocab_size,
        "d_model": spec.d_model, "device": str(spec.unembed_weight.device), **settings.to_json(), **fingerprint,
        "skipped_empty_responses": len(records) - len(examples),
        "truncated_tokens": sum(e.truncated for e in examples), "world_size": world, "version": __version__,
        "layer_numbering": "paper: 1..L, 0 = embedding output",
    }
    run = RunDir(out_dir) if out_dir is not None else None
    keys = list(resume_key(settings, fingerprint))
    done = run.start(meta, keys, resume, rank=rank, describe=describe_change) if run else set()
    pending = [e for e in examples if e.record_id not in done]
    mine = pending[rank::world]
    pad_id = pad_token_id(tokenizer)
    all_records, all_tokens = [], []
    bar = tqdm(total=sum(len(e.input_ids) for e in mine), unit="tok", unit_scale=True,
               desc=f"profile{f' rank {rank}' if world > 1 else ''}", disable=not progress)
    started = time.perf_counter()
    for batch in batched(mine, settings.batch_size):
        record_sums, tokens = _profile_batch(model, spec, plan, decoders, batch, pad_id, settings, tokenizer)
        if run:
            run.write_shard([e.record_id for e in batch], records=record_sums, tokens=tokens)
        else:
            all_records.append(record_sums)
            all_tokens.append(tokens)
        bar.update(sum(len(e.input_ids) for e in batch))
    bar.close()
    meta["seconds"] = round(time.perf_counter() - started, 3)
    if run is None:
        summary, groups, records = _tables(pd.concat(all_records, ignore_index=True), fields, settings.group_by)
        tokens = pd.concat(all_tokens, ignore_index=True) if settings.keep_tokens else None
        meta.update(n_records=len(examples), n_tokens=int(summary.iloc[0]["n_tokens"]), status="complete")
        return ProfileResult(summary, meta, groups=groups, _tokens=tokens, _records=records)
    barrier()
    result = _merge(run, meta, settings.keep_tokens, fields, settings.group_by) if rank == 0 else None
    barrier()
    return result if result is not None else load_run(run.path)
