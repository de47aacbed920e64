"""Shared pieces of the BuPO (and AttnRL trainer) tests: a tiny trainer, a gradient recorder, an independent π^k
log-prob reference, toy rewards."""

from __future__ import annotations

import torch
from transformers import TrainerCallback

PROMPTS = ["Once upon a time", "The cat sat", "Tom had a", "One day Lily"]


def length_reward(completions, **_):
    return [float(len(c)) for c in completions]


def easy_or_parity_reward(prompts, completions, completion_ids, **_):
    """1 for the first two prompts (all-correct questions, which feed AttnRL's adaptive running mean), else the
    parity of the completion's token ids (a coin flip per sequence): recomputable from (prompt, ids)."""
    return [1.0 if p in PROMPTS[:2] else float(sum(ids) % 2) for p, ids in zip(prompts, completion_ids)]


def config(tmp_path, **overrides):
    """A small BuPOConfig for CPU tests (fp32, no checkpoints unless asked)."""
    from internal_policy.bupo import BuPOConfig

    settings = dict(output_dir=str(tmp_path), method="bupo", internal_layer=1, internal_steps=1,
                    per_device_train_batch_size=4, num_generations=4, max_completion_length=6, max_steps=2,
                    use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1,
                    learning_rate=1e-3, weight_decay=0.0, seed=0, disable_tqdm=True)
    return BuPOConfig(**{**settings, **overrides})


def trainer(model, tok, tmp_path, callbacks=(), profile_records=None, **overrides):
    """A BuPOTrainer on four story openings with a length reward (config `overrides`)."""
    from datasets import Dataset

    from internal_policy.bupo import BuPOTrainer

    return BuPOTrainer(model, length_reward, config(tmp_path, **overrides),
                       train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tok,
                       callbacks=list(callbacks), profile_records=profile_records)


class Killed(Exception):
    """A simulated kill of a training run."""


class KillAt(TrainerCallback):
    """Raises `Killed` at optimizer step `step`, at callback event `when`: `on_evaluate` (after that step's
    validation) or `on_step_end`; both come before the step's checkpoint is written."""

    def __init__(self, step: int, when: str = "on_evaluate"):
        self.step = step
        setattr(self, when, self._kill)

    def _kill(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed


class GradNorms(TrainerCallback):
    """Per optimizer step, the gradient norm of every parameter (0 where it has no gradient)."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: 0.0 if p.grad is None else p.grad.norm().item() for n, p in model.named_parameters()})


@torch.no_grad()
def reference_logps(model, ids, mask, k: int | None, temperature: float, keep: int):
    """log π(next token) and entropy at the last `keep` positions, from HF's own forward, in float64.

    k < L: π^k = softmax((H_k W_Uᵀ + b) / T) with H_k = hidden_states[k] (raw below L); k None: π_θ from the
    model's logits / T. Written without any package code, as the independent side of the checks.
    """
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    if k is None:
        logits = out.logits.double()
    else:
        head = model.get_output_embeddings()
        logits = out.hidden_states[k].double() @ head.weight.double().T
        if head.bias is not None:
            logits = logits + head.bias.double()
    logp = torch.log_softmax(logits[:, -keep - 1:-1] / temperature, dim=-1)
    chosen = logp.gather(-1, ids[:, -keep:, None])[..., 0]
    return chosen, -(logp.exp() * logp).sum(-1)
