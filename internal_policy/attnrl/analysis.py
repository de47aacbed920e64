"""Branch-point analysis: steps, FCI and the points AttnRL would branch at, for prompt/response records.

`branch_points(model, tokenizer, records, ...)` tokenises each record with the package's convention
(prompt with special tokens, response without; `data.tokenize_records`), splits it into steps
(`steps.sequence_steps`), computes every step's FCI in one forward per batch (`fci.step_fci`) and
picks the branch points with the published rule (`select.select_attn`). The result is one row per
(record, step): `record_id`, `step` (0 = the prompt), `start`, `end` (token positions in prompt +
response, end exclusive), `fci`, `selected`, `text`.

With `out_dir` the run is written as it goes, through `runs.RunDir` like a profile run (a folder
that is not a run is refused, a lock keeps a second process out): `run.json` (settings, counts,
status), `shards/` (one parquet per finished batch and its `.done` marker, written atomically, so a
killed run leaves only whole shards) and, at the end, `steps.parquet`. `resume=True` skips the
records already in a finished shard and refuses settings that would change the numbers. Single
process (no torchrun split: one forward per batch is the whole cost).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data import Example, batched, pad_batch, record_id, tokenize_records
from ..errors import InputError
from ..models import context_length, pad_token_id
from ..runs import STEPS, RunDir, read_meta
from .fci import CHUNK_ELEMENTS, attention_modules, check_delta, step_fci
from .select import check_selection, select_attn
from .steps import SEPARATORS, THINK_END, Steps, sequence_steps, token_texts

SETTINGS = ("model", "delta", "quantile", "points", "min_distance", "min_start", "separators", "think_end",
            "chat", "truncate")
"""run.json keys that must match for `resume` to continue a run."""
COLUMNS = ("record_id", "step", "start", "end", "fci", "selected", "text")


@dataclass
class BranchPoints:
    """A branch-point run: `steps` (one row per record × step, see module doc), `meta`, and its folder."""

    steps: pd.DataFrame
    meta: dict
    out_dir: Path | None = None

    def selected(self) -> pd.DataFrame:
        """Only the chosen branch points."""
        return self.steps[self.steps["selected"]].reset_index(drop=True)


def _record_steps(
    records: Sequence[Mapping], examples: list[Example], tokenizer, separators: Sequence[str], think_end: str | None,
) -> tuple[list[tuple[Example, Steps]], int]:
    """Steps of every record; one-step responses are errors for given text, skipped for sampled ids."""
    sampled = {record_id(r, i) for i, r in enumerate(records) if r.get("prompt_ids") is not None}
    out, skipped = [], 0
    for example in examples:
        prompt_length = example.start + 1
        steps = sequence_steps(prompt_length, token_texts(tokenizer, example.input_ids[prompt_length:]),
                               separators, think_end)
        if steps.n_steps < 3:
            if example.record_id in sampled:
                skipped += 1
                continue
            raise InputError(f"record {example.record_id}: the response has {steps.n_steps - 1} step(s); a branch "
                             "point needs at least two response steps (the first is never one). Give a finer "
                             f"--step-sep (now {list(separators)}) or drop the record")
        out.append((example, steps))
    return out, skipped


def _batch_rows(model, tokenizer, batch: list[tuple[Example, Steps]], pad_id: int, settings: dict,
                chunk_elements: int) -> pd.DataFrame:
    """Score one batch: FCI per step, the selected points, step texts."""
    examples = [e for e, _ in batch]
    steps = [s for _, s in batch]
    input_ids, attention_mask = pad_batch(examples, pad_id, model.get_input_embeddings().weight.device)
    fci = step_fci(model, input_ids, attention_mask, steps, settings["delta"], chunk_elements).fci()
    frames = []
    for example, sequence, y in zip(examples, steps, fci):
        chosen = set(select_attn(y, sequence, settings["points"], settings["quantile"], settings["min_start"],
                                 settings["min_distance"]))
        frames.append(pd.DataFrame({
            "record_id": example.record_id,
            "step": np.arange(sequence.n_steps, dtype=np.int64),
            "start": np.array([a for a, _ in sequence.ranges], dtype=np.int64),
            "end": np.array([b for _, b in sequence.ranges], dtype=np.int64),
            "fci": y,
            "selected": [k in chosen for k in range(sequence.n_steps)],
            "text": [tokenizer.decode(list(example.input_ids[a:b]), skip_special_tokens=True)
                     for a, b in sequence.ranges],
        }))
    return pd.concat(frames, ignore_index=True)


def branch_points(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[Mapping],
    *,
    delta: int = 4,
    quantile: float = 0.8,
    points: int = 2,
    min_distance: int = 512,
    min_start: int = 512,
    separators: Sequence[str] = SEPARATORS,
    think_end: str | None = THINK_END,
    chat: Mapping | None = None,
    batch_size: int = 4,
    truncate: bool = False,
    chunk_elements: int = CHUNK_ELEMENTS,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    model_name: str | None = None,
) -> BranchPoints:
    """Steps, FCI and AttnRL branch points of prompt/response `records` (see module docstring).

    `separators` are tried in order (as in the published code); `think_end` (None to disable) silences the steps
    after a thinking model's `</think>`; `chunk_elements` bounds one query block of attention
    probabilities. Settings are checked before the model runs, and every record's steps before the
    first forward, so a bad record costs nothing.
    """
    check_delta(delta)
    check_selection(points, quantile, min_start, min_distance)
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    if not separators or any(not s for s in separators):
        raise InputError(f"step separators must be non-empty strings, got {list(separators)}")
    text_only = [record_id(r, i) for i, r in enumerate(records) if r.get("text") is not None]
    if text_only:
        raise InputError(f"record {text_only[0]} is plain text: branch points need prompt/response records "
                         "({'prompt', 'response'}, {'messages'} or token ids), or --generate responses")
    attention_modules(model)  # a model that cannot run eager attention fails here, before any work
    examples = tokenize_records(records, tokenizer, context_length(model), truncate, chat)
    scored, skipped = _record_steps(records, examples, tokenizer, separators, think_end)
    settings = {"delta": int(delta), "quantile": float(quantile), "points": int(points),
                "min_distance": int(min_distance), "min_start": int(min_start)}
    meta = {
        "model": model_name or getattr(model.config, "_name_or_path", type(model).__name__),
        "model_type": model.config.model_type, **settings, "separators": list(separators), "think_end": think_end,
        "chat": dict(chat or {}), "truncate": truncate, "batch_size": batch_size,
        "skipped_one_step_responses": skipped, "skipped_empty_responses": len(records) - len(examples),
        "truncated_tokens": sum(e.truncated for e, _ in scored), "version": __version__,
        "fci": "y_k = max over layers, heads of sum_{j >= k+delta} alpha[j, k]; y_0 = y_1 = 0",
    }
    run = RunDir(out_dir) if out_dir is not None else None
    done = run.start(meta, SETTINGS, resume) if run else set()
    pending = [(e, s) for e, s in scored if e.record_id not in done]
    pad_id = pad_token_id(tokenizer)
    frames = []
    bar = tqdm(total=sum(len(e.input_ids) for e, _ in pending), unit="tok", unit_scale=True, desc="branch-points",
               disable=not progress)
    started = time.perf_counter()
    steps_of = {e.record_id: s for e, s in pending}
    for batch in batched([e for e, _ in pending], batch_size):
        rows = _batch_rows(model, tokenizer, [(e, steps_of[e.record_id]) for e in batch], pad_id, settings,
                           chunk_elements)
        if run:
            run.write_shard([e.record_id for e in batch], steps=rows)
        else:
            frames.append(rows)
        bar.update(sum(len(e.input_ids) for e in batch))
    bar.close()
    meta["seconds"] = round(time.perf_counter() - started, 3)
    if run:
        frames = [run.read_shards("steps")] if run.shard_names() else []
    order = {e.record_id: i for i, (e, _) in enumerate(scored)}
    steps = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS))
    steps = steps[steps["record_id"].isin(order)]  # a resumed run's shards may hold records no longer given
    steps = steps.assign(_order=steps["record_id"].map(order)).sort_values(["_order", "step"], kind="stable")
    steps = steps.drop(columns="_order").reset_index(drop=True)[list(COLUMNS)]
    meta.update(n_records=int(steps["record_id"].nunique()), n_steps=len(steps),
                n_selected=int(steps["selected"].sum()), status="complete")
    if run:
        run.write(STEPS, lambda p: steps.to_parquet(p, index=False))
        meta = run.finish(meta)
    return BranchPoints(steps, meta, run.path if run else None)


def load_branch_points(run_dir: str | Path) -> BranchPoints:
    """Read a finished branch-point run folder back (a run still marked running is refused)."""
    path = Path(run_dir)
    if not (path / STEPS).is_file():
        raise InputError(f"{path} holds no finished branch-point run (no {STEPS}); run "
                         f"`internal-policy branch-points --out {path}`")
    meta = read_meta(path, "branch-points")
    return BranchPoints(pd.read_parquet(path / STEPS), meta, path)
