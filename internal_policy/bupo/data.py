"""Prompt sets for BuPO training and evaluation: the shipped benchmarks, parquet files or JSONL.

A prompt set is a DataFrame with `prompt` (a string, or chat messages) and `answer` (gold final
answer, may be empty for toy rewards). The official BuPO parquet layout (`prompt` messages +
`reward_model.ground_truth`) and plain JSONL records `{"prompt": ..., "answer": ...}` are accepted.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pandas as pd

from ..errors import InputError

BENCHMARKS = ("math500", "amc2023", "aime_2024", "aime_2025")
"""Evaluation sets shipped in internal_policy/assets/bupo (MIT, Copyright (c) 2025 Interplay-LM)."""


def _asset(name: str) -> Path:
    return Path(str(resources.files("internal_policy") / "assets" / "bupo" / f"{name}.parquet"))


def load_prompts(source: str | Path) -> pd.DataFrame:
    """A prompt set from a shipped benchmark name, a .parquet or a .jsonl file → DataFrame[prompt, answer]."""
    path = _asset(str(source)) if str(source) in BENCHMARKS else Path(source)
    if not path.is_file():
        raise InputError(f"prompt set {source!r} not found; give one of {', '.join(BENCHMARKS)} or a "
                         ".parquet/.jsonl file with 'prompt' and 'answer' columns")
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_json(path, lines=True)
    if "prompt" not in frame.columns:
        raise InputError(f"{path} has no 'prompt' column (columns: {list(frame.columns)})")
    if "answer" not in frame.columns:
        if "reward_model" in frame.columns:
            frame["answer"] = [str(r["ground_truth"]) for r in frame["reward_model"]]
        elif "final_answer" in frame.columns:
            frame["answer"] = frame["final_answer"].astype(str)
        else:
            frame["answer"] = ""
    frame["prompt"] = [p.tolist() if hasattr(p, "tolist") else p for p in frame["prompt"]]
    return frame[["prompt", "answer"]].reset_index(drop=True)


def prompt_text(prompt, tokenizer) -> str:
    """A prompt as the text the model continues: chat messages go through the tokenizer's chat template,
    or, for a tokenizer without one (base models such as stories260K), are joined by blank lines."""
    if isinstance(prompt, str):
        return prompt
    messages = [dict(m) for m in prompt]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(str(m["content"]) for m in messages) + "\n\n"
