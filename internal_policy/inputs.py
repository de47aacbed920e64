"""Input files → records (plain dicts), whatever the format; `data.py` turns records into tokens.

`read_records(source)` dispatches on what `source` is:
- a shipped benchmark name (`math500`, `amc2023`, `aime_2024`, `aime_2025`): the BuPO evaluation parquet;
- `*.jsonl` / `*.json`: one JSON object per line;
- `*.parquet`: one record per row (null cells are left out);
- a folder written by `datasets.Dataset.save_to_disk` (a `DatasetDict` needs `split`);
- any other file: plain text, one `{"text": ...}` record per paragraph (blank-line separated).

A record holds `text`, or `prompt` (a string or chat messages) with an optional `response`, or
`messages` (a chat whose last assistant message is the response), or the token ids that
`generate` saves (`prompt_ids`, `response_ids`). An `id` column names records; otherwise the
0-based row index does.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

from .errors import InputError

BENCHMARKS = ("math500", "amc2023", "aime_2024", "aime_2025")
"""Evaluation sets shipped in internal_policy/assets/bupo (MIT, Copyright (c) 2025 Interplay-LM)."""


def benchmark_path(name: str) -> Path:
    """Path of a shipped BuPO evaluation set."""
    return Path(str(resources.files("internal_policy") / "assets" / "bupo" / f"{name}.parquet"))


def read_records(source: str | Path, split: str | None = None) -> list[dict]:
    """Read records from a benchmark name, JSONL, parquet, saved HF dataset folder or text file."""
    if str(source) in BENCHMARKS:
        return _read_parquet(benchmark_path(str(source)))
    path = Path(source)
    if path.is_dir():
        return _read_hf_dataset(path, split)
    if not path.is_file():
        raise InputError(f"input {path} does not exist; give a .jsonl, .parquet or text file, a saved HF dataset "
                         f"folder, or one of the shipped benchmarks {', '.join(BENCHMARKS)}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    return _read_text(path)


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file of records; a malformed line is reported with its line number."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"input file {path} does not exist (pass a JSONL file of {{'text': ...}} records)")
    records = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at byte "
                                 f"{err.start + 1} of the line); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}); "
                                 "each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{number}: expected a JSON object like {{\"text\": ...}}, "
                                 f"got {type(record).__name__}")
            record.setdefault("_line", number)
            records.append(record)
    return _checked(records, path)


def _row(row: dict) -> dict:
    """A table row as a record: null cells (a column another record type uses) are left out."""
    return {k: v for k, v in row.items() if v is not None}


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()  # plain Python lists/dicts, nulls as None
    except Exception as err:  # pyarrow raises several types for a file that is not parquet
        raise InputError(f"{path} is not a readable parquet file ({err})") from None
    return _checked([_row(r) for r in rows], path)


def _read_hf_dataset(path: Path, split: str | None) -> list[dict]:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except FileNotFoundError:
        raise InputError(f"{path} is a folder but not a saved HF dataset (datasets.Dataset.save_to_disk); "
                         "give a dataset folder or a file") from None
    if isinstance(data, DatasetDict):
        if split is None and len(data) == 1:
            split = next(iter(data))
        if split not in data:
            raise InputError(f"{path} holds splits {sorted(data)}; choose one with --split")
        data = data[split]
    return _checked([_row(r) for r in data], path)


def _read_text(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is neither .jsonl, .parquet nor UTF-8 text; convert it or give a "
                         "supported file") from None
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return _checked([{"text": p} for p in paragraphs], path)


def _checked(records: list[dict], path: Path) -> list[dict]:
    """At least one record, and every record has a content field (named with its row/line on failure)."""
    if not records:
        raise InputError(f"{path} holds no records")
    for index, record in enumerate(records):
        if not any(record.get(f) is not None for f in ("text", "prompt", "messages", "prompt_ids")):
            where = f"line {record['_line']}" if "_line" in record else f"row {index}"
            raise InputError(f"{path} {where}: no 'text', 'prompt', 'messages' or 'prompt_ids' field "
                             f"(fields: {sorted(k for k in record if k != '_line')})")
    return records
