"""One training run: prompt set + reward + `BuPOConfig` → trained model, phase log, tracking and validation tables.

An `AttnRLConfig` (a `BuPOConfig` with AttnRL's branching options) runs the `AttnRLTrainer`, which
adds `branching.csv` (one row per rollout, rewritten up to the checkpoint on resume).

Shared by `internal-policy train` and the analyses scripts so both run the same code path. The output
folder (`config.output_dir`) holds what the run writes as it goes:

- `train.json`: the settings the numbers depend on (config, model, data content digests); `resume=True`
  refuses to continue when any of them differs (logging, checkpoint and validation settings may change);
- `checkpoint-N/`: TRL/transformers checkpoints every `save_steps` optimizer steps (model, optimizer,
  scheduler, RNG and trainer state, so the phase / schedule position resumes with `global_step`);
- `phase_log.jsonl`, `tracking.parquet`: written at every checkpoint and at the end, and cut back to the
  checkpoint on resume; `validation.csv`: one row per (validation step, benchmark);
- `model/`: the final model and tokenizer.

A fresh run refuses a non-empty folder: nothing the tool did not write is ever overwritten.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import pandas as pd
from transformers import TrainerCallback

from ..errors import InputError
from ..runs import atomic_write, read_json, write_json, write_jsonl
from .config import BuPOConfig
from .data import prompt_text, require_answers
from .rewards import Reward
from .tracking import EntropyTracker
from .trainer import VALIDATION_FILE, BuPOTrainer

TRACK_FILE = "tracking.parquet"
PHASE_FILE = "phase_log.jsonl"
SETTINGS_FILE = "train.json"

MAY_CHANGE_ON_RESUME = frozenset({
    "output_dir", "logging_dir", "report_to", "run_name", "logging_steps", "logging_first_step", "logging_strategy",
    "save_steps", "save_strategy", "save_total_limit", "disable_tqdm", "eval_steps", "eval_strategy", "eval_on_start",
    "do_eval", "num_generations_eval", "per_device_eval_batch_size", "eval_scorer", "eval",
})
"""Settings that change neither the parameters nor the logged numbers of training steps."""


@dataclass
class TrainResult:
    """The trainer, the layer k that was used (or tracked) and the tracking table (None without a probe)."""

    trainer: BuPOTrainer
    internal_layer: int | None
    tracking: pd.DataFrame | None


def digest(value) -> str:
    """A short content hash of JSON-able data (prompt sets, probes), so a resumed run can check its inputs."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _checkpoint_step(out: Path, settings: dict, resume: bool, defaults: dict | None = None) -> Path | None:
    """Check the output folder for a fresh run (empty) or a resume (same settings); the checkpoint to resume.

    A setting the saved train.json lacks (one added by a later version, e.g. AttnRL's branching options)
    is accepted at its default value in `defaults`, which keeps the older behaviour."""
    from transformers.trainer_utils import get_last_checkpoint

    saved = out / SETTINGS_FILE
    if not resume:
        if out.exists() and any(out.iterdir()):
            what = "a training run (pass resume to continue it)" if saved.is_file() else "files this tool did not write"
            raise InputError(f"output folder {out} is not empty: it holds {what}; choose a new folder")
        return None
    if not saved.is_file():
        raise InputError(f"nothing to resume in {out}: it has no {SETTINGS_FILE} (start a fresh run without resume)")
    before = read_json(saved, "restore it, or start a new folder")
    keys = (set(before) | set(settings)) - MAY_CHANGE_ON_RESUME
    added_later = {k for k in set(settings) - set(before) if k in (defaults or {}) and settings[k] == defaults[k]}
    changed = sorted(key for key in keys - added_later if before.get(key) != settings.get(key))
    if changed:
        detail = "; ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in changed[:4])
        raise InputError(f"resume would change the run's numbers ({detail}); resume with the run's own settings "
                         f"(see {saved}) or start a new folder")
    checkpoint = get_last_checkpoint(str(out))
    if checkpoint is None:
        raise InputError(f"{out} has no checkpoint-N folder to resume from (the run stopped before its first "
                         "save_steps); start it again in a new folder")
    done = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
    if 0 < settings.get("max_steps", -1) <= done:
        raise InputError(f"the run in {out} is complete (step {done} of max_steps {settings['max_steps']}); "
                         "nothing to resume")
    return Path(checkpoint)


class _PhaseLogWriter(TrainerCallback):
    """Writes the trainer's phase log at every checkpoint and at the end (main process)."""

    def __init__(self, trainer: BuPOTrainer, path: Path):
        self.trainer, self.path = trainer, path

    def write(self, state) -> None:
        if state.is_world_process_zero:
            write_jsonl(self.path, self.trainer.phase_log)

    def on_save(self, args, state, control, **kwargs):
        self.write(state)

    def on_train_end(self, args, state, control, **kwargs):
        self.write(state)


def _restore(out: Path, step: int, trainer: BuPOTrainer, tracker: EntropyTracker | None) -> None:
    """Take back what an interrupted run wrote up to its checkpoint at `step`; later rows are recomputed."""
    phase = out / PHASE_FILE
    if phase.is_file():
        entries = [json.loads(line) for line in phase.read_text(encoding="utf-8").splitlines() if line]
        trainer.phase_log = [e for e in entries if e["step"] <= step]
    if tracker is not None and (out / TRACK_FILE).is_file():
        tracker.restore(pd.read_parquet(out / TRACK_FILE), step)
    validation = out / VALIDATION_FILE
    if validation.is_file():
        table = pd.read_csv(validation)
        table = table[table["step"] <= step]
        trainer.validated_steps = {step} & set(table["step"])  # eval_on_start at the checkpoint: already done
        if trainer.accelerator.is_main_process:
            atomic_write(validation, lambda tmp: table.to_csv(tmp, index=False))


def _defaults(config) -> dict:
    """The config dataclass's default values, JSON-normalised as train.json stores them."""
    values = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(config)
              if f.default is not MISSING or f.default_factory is not MISSING}
    return json.loads(json.dumps(values, default=str))


def train(model, tokenizer, prompts: pd.DataFrame, reward: Reward, config: BuPOConfig, *,
          probe: list[dict] | None = None, profile_run=None, eval_sets: dict[str, pd.DataFrame] | None = None,
          resume: bool = False, settings: dict | None = None, save_model: bool = True,
          track_layers: list[int] | None = None, callbacks=()) -> TrainResult:
    """Train with `config.method`; with a probe, track entropies at k (each stage's k for a schedule).

    The prompts' `answer` column reaches the reward as `answer=`; rewards that need answers refuse sets
    without them. `internal_layer='auto'` profiles the model on the probe (or reads `profile_run`); with
    method grpo, `internal_layer` is the layer tracked; `track_layers` tracks these layers instead.
    `eval_sets` (name → prompts with answers) are validated every `eval_steps` when
    `eval_strategy='steps'` (and before training with `eval_on_start`).
    `settings` (model, dtype, reward, ...) join the config in train.json; `resume` continues the run
    in `config.output_dir` from its last checkpoint.
    """
    from accelerate import PartialState
    from datasets import Dataset

    from ..attnrl.config import AttnRLConfig
    from ..attnrl.trainer import AttnRLTrainer

    if getattr(reward, "needs_answer", False):
        require_answers(prompts, "training data")
    for name, frame in (eval_sets or {}).items():
        require_answers(frame, name)
    out = Path(config.output_dir)
    texts = [prompt_text(p, tokenizer) for p in prompts["prompt"]]
    answers = [str(a) for a in prompts["answer"]]
    record = {**json.loads(json.dumps(config.to_dict(), default=str)), **(settings or {}),
              "reward": getattr(reward, "__name__", str(reward)), "data": digest([texts, answers]),
              "probe": digest(probe), "eval": digest({k: v.to_dict("list") for k, v in (eval_sets or {}).items()})}
    state = PartialState()
    checkpoint = _checkpoint_step(out, record, resume, _defaults(config))
    state.wait_for_everyone()  # every process checked the folder before the main one writes to it
    if state.is_main_process and checkpoint is None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / SETTINGS_FILE, record)
    eval_dataset = {name: Dataset.from_dict({"prompt": list(f["prompt"]), "answer": [str(a) for a in f["answer"]]})
                    for name, f in eval_sets.items()} if eval_sets else None
    trainer_class = AttnRLTrainer if isinstance(config, AttnRLConfig) else BuPOTrainer
    trainer = trainer_class(model, reward, config,
                            train_dataset=Dataset.from_dict({"prompt": texts, "answer": answers}),
                            eval_dataset=eval_dataset, processing_class=tokenizer, profile_records=probe,
                            profile_run=profile_run, callbacks=list(callbacks))
    tracker = None
    if probe:
        track_layers = track_layers or trainer.tracked_layers
        if not track_layers:
            raise InputError("entropy tracking needs a layer: set internal_layer (a number or 'auto') for method "
                             f"{config.method}")
        tracker = EntropyTracker(tokenizer, probe, track_layers, out / TRACK_FILE,
                                 final_norm=config.internal_final_norm, policy_at=trainer.policy_at)
        trainer.add_callback(tracker)
    trainer.add_callback(_PhaseLogWriter(trainer, out / PHASE_FILE))
    if checkpoint is not None:
        _restore(out, int(checkpoint.name.rsplit("-", 1)[1]), trainer, tracker)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if save_model:
        trainer.save_model(str(out / "model"))
        if trainer.accelerator.is_main_process:
            tokenizer.save_pretrained(str(out / "model"))
    return TrainResult(trainer, trainer.internal_layer, tracker.frame() if tracker else None)
