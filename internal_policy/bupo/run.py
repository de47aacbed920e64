"""One training run: prompt set + reward + `BuPOConfig` → trained model, phase log and tracking table.

Shared by `internal-policy train` and the analyses scripts so both run the same code path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .config import BuPOConfig
from .data import prompt_text
from .rewards import Reward
from .tracking import EntropyTracker
from .trainer import BuPOTrainer

TRACK_FILE = "tracking.parquet"
PHASE_FILE = "phase_log.jsonl"


@dataclass
class TrainResult:
    """The trainer, the layer k that was used (or tracked) and the tracking table (None without a probe)."""

    trainer: BuPOTrainer
    internal_layer: int | None
    tracking: pd.DataFrame | None


def train(model, tokenizer, prompts: pd.DataFrame, reward: Reward, config: BuPOConfig, *,
          probe: list[dict] | None = None, track_layer: int | None = None, profile_run=None,
          save_model: bool = True) -> TrainResult:
    """Train with `config.method`; with a probe, track entropies at k (or `track_layer` for plain GRPO).

    The prompts' `answer` column reaches the reward as `answer=`; `internal_layer='auto'` profiles the
    model on the probe (or reads `profile_run`).
    """
    from datasets import Dataset

    dataset = Dataset.from_dict({"prompt": [prompt_text(p, tokenizer) for p in prompts["prompt"]],
                                 "answer": [str(a) for a in prompts["answer"]]})
    trainer = BuPOTrainer(model, reward, config, train_dataset=dataset, processing_class=tokenizer,
                          profile_records=probe, profile_run=profile_run)
    out = Path(config.output_dir)
    k = trainer.internal_layer or track_layer
    tracker = None
    if probe:
        if k is None:
            raise ValueError("tracking plain GRPO needs track_layer (the layer k to follow)")
        tracker = EntropyTracker(tokenizer, probe, k, out / TRACK_FILE, final_norm=config.internal_final_norm)
        trainer.add_callback(tracker)
    trainer.train()
    out.mkdir(parents=True, exist_ok=True)
    (out / PHASE_FILE).write_text("".join(json.dumps(e) + "\n" for e in trainer.phase_log))
    if save_model:
        trainer.save_model(str(out / "model"))
        tokenizer.save_pretrained(str(out / "model"))
    return TrainResult(trainer, k, tracker.frame() if tracker else None)
