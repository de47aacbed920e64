"""Records → token ids and the positions to measure.

A record is `{"text": ...}` (every position is kept) or `{"prompt": ..., "response": ...}`: the
prompt is tokenised with special tokens, the response without, the two are concatenated and the
kept positions are those whose *next* token is a response token (the positions at which the
model produces the response). Kept positions are always one contiguous span `[start, stop)`.
An optional `"id"` names the record; otherwise its 0-based index in the input does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError


@dataclass(frozen=True)
class Example:
    """One tokenised record: ids, and the kept span of positions [start, stop)."""

    record_id: str
    input_ids: tuple[int, ...]
    start: int
    stop: int
    truncated: int = 0  # tokens cut from the end to fit the model's context

    @property
    def n_kept(self) -> int:
        return self.stop - self.start


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file of records; a malformed line is reported with its line number."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"input file {path} does not exist (pass a JSONL file of {{'text': ...}} records)")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}); "
                                 "each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{number}: expected a JSON object like {{\"text\": ...}}, got {type(record).__name__}")
            record.setdefault("_line", number)
            records.append(record)
    if not records:
        raise InputError(f"{path} holds no records")
    return records


def _where(record: dict, index: int) -> str:
    line = record.get("_line")
    return f"record {record.get('id', index)!s}" + (f" (line {line})" if line else "")


def tokenize_record(
    record: dict, tokenizer, index: int, max_length: int | None = None, truncate: bool = False
) -> Example:
    """Tokenise one record into an `Example` (see module docstring for the kept positions)."""
    where = _where(record, index)
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: 'text' is empty; remove the record or give it text")
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        start, stop = 0, len(ids)
    elif "prompt" in record and "response" in record:
        prompt, response = record["prompt"], record["response"]
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise InputError(f"{where}: 'prompt' and 'response' must be strings")
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        if not response_ids:
            raise InputError(f"{where}: the response tokenises to nothing; remove the record or give it a response")
        ids = prompt_ids + response_ids
        start, stop = max(len(prompt_ids) - 1, 0), len(ids) - 1
        if stop <= start:
            raise InputError(f"{where}: no position predicts a response token (empty prompt and one-token response)")
    else:
        raise InputError(f"{where}: expected a 'text' field or 'prompt' and 'response' fields, got {sorted(record)}")
    cut = 0
    if max_length is not None and len(ids) > max_length:
        if not truncate:
            raise InputError(f"{where} has {len(ids)} tokens, longer than the model's context of {max_length}; "
                             "shorten it or pass --truncate to cut the end")
        cut = len(ids) - max_length
        ids = ids[:max_length]
        stop = min(stop, max_length)
        if stop <= start:
            raise InputError(f"{where}: nothing left to measure after truncating to {max_length} tokens")
    record_id = str(record.get("id", index))
    return Example(record_id, tuple(int(i) for i in ids), start, stop, cut)


def tokenize_records(
    records: Sequence[dict], tokenizer, max_length: int | None = None, truncate: bool = False
) -> list[Example]:
    """Tokenise all records; record ids must be unique (they key results and resumption)."""
    examples = [tokenize_record(r, tokenizer, i, max_length, truncate) for i, r in enumerate(records)]
    seen: set[str] = set()
    for example in examples:
        if example.record_id in seen:
            raise InputError(f"record id {example.record_id!r} appears twice; ids must be unique")
        seen.add(example.record_id)
    return examples


def pad_batch(examples: Sequence[Example], pad_id: int, device: torch.device | str = "cpu"):
    """Right-pad a batch: (input_ids [B,T], attention_mask [B,T]); right padding keeps positions exact."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        mask[row, : len(example.input_ids)] = 1
    return ids.to(device), mask.to(device)


def batched(examples: Iterable[Example], batch_size: int) -> Iterator[list[Example]]:
    """Batches of similar length (longest first) so padding wastes little; order is deterministic."""
    ordered = sorted(examples, key=lambda e: -len(e.input_ids))
    for start in range(0, len(ordered), batch_size):
        yield ordered[start : start + batch_size]
