"""Prompt sets for BuPO training and evaluation: a DataFrame of `prompt` and `answer`.

`prompt` is a string or chat messages, `answer` the gold final answer (empty for toy rewards). Any
input `inputs.read_records` reads works: the shipped benchmarks, the official BuPO parquet layout
(`prompt` messages + `reward_model.ground_truth`), JSONL `{"prompt": ..., "answer": ...}` (or a MATH-style
`solution`, whose last box is the answer), a saved HF dataset. `messages` records count as prompts too (a
final assistant message is dropped).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from ..data import prompt_of, render_prompt
from ..errors import InputError
from ..inputs import BENCHMARKS, read_records
from .rewards import last_boxed

__all__ = ["BENCHMARKS", "gold_answer", "load_prompts", "prompt_text", "require_answers"]


def gold_answer(record: Mapping) -> str | None:
    """A record's gold final answer: the first non-blank of `answer`, `reward_model.ground_truth` (the shipped
    sets), `final_answer` and the last `\\boxed{}` of a worked `solution` (MATH); None when it has none (never a
    silent empty answer; 0 is an answer)."""
    truth = record["reward_model"].get("ground_truth") if isinstance(record.get("reward_model"), Mapping) else None
    solution = record.get("solution")
    for value in (record.get("answer"), truth, record.get("final_answer"),
                  last_boxed(str(solution)) if solution is not None else None):
        if value is not None and str(value).strip():
            return str(value)
    return None


def load_prompts(source: str | Path) -> pd.DataFrame:
    """A prompt set from a shipped benchmark name or any file `read_records` reads → DataFrame[prompt, answer]."""
    records = read_records(source)
    prompts = [prompt_of(record, index) for index, record in enumerate(records)]
    return pd.DataFrame({"prompt": prompts, "answer": [gold_answer(r) or "" for r in records]})


def require_answers(prompts: pd.DataFrame, name: str) -> None:
    """Refuse a prompt set with records lacking a gold answer: a math checker would score them 0 silently."""
    missing = [i for i, a in enumerate(prompts["answer"]) if not str(a).strip()]
    if missing:
        raise InputError(f"{name}: {len(missing)} of {len(prompts)} records have no gold answer (first: record "
                         f"{missing[0]}); give an 'answer' (or reward_model.ground_truth / final_answer) field, or "
                         "use a reward that needs none (word:..., length:...)")


def prompt_text(prompt, tokenizer) -> str:
    """A prompt as the text the model continues (chat template, or blank-line-joined messages without one)."""
    return render_prompt(prompt, tokenizer)[0]
