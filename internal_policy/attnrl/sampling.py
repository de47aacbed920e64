"""Adaptive sampling arithmetic (AttnRL): which responses to branch, which questions to drop.

Per question with k of n initial responses correct (a reward > 0 counts as correct, as the code's
`acc > 0`), ceil(n·e^(−k/n)) responses are branched (n = 6: {0:6, 1:6, 2:5, 3:4, 4:4, 5:3, 6:3}):
- mixed questions: every response of the minority outcome (the wrong ones at k/n ≥ 0.5), then
  random ones of the majority up to the budget;
- all-wrong questions: every response;
- all-correct questions: the first ceil(n/e) responses, only if the question's mean FCI exceeds the
  running mean of that value over all all-correct questions so far (this batch's included, updated
  before the comparison, as the code does); otherwise the question is dropped from training.
After branching, questions whose training sequences all share one reward are dropped (`zero_std_keep`),
and the next prompt batch follows the filtered size (`next_prompt_batch`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import InputError


def branch_budget(n_correct: int, n: int) -> int:
    """ceil(n · e^(−acc)), acc = n_correct / n: how many responses of a question are branched."""
    if n < 1 or not 0 <= n_correct <= n:
        raise InputError(f"need 0 <= correct <= n and n >= 1, got correct={n_correct}, n={n}")
    return int(math.ceil(math.exp((1 - n_correct / n) - 1) * n))  # the code's exp(diff - 1), diff = 1 - acc


class RunningMean:
    """Mean of every value added so far (the code's RunningAverage with alpha = 0)."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, values: Sequence[float]) -> None:
        """Add a batch of values to the running sum and count."""
        self.total += float(np.sum(values))
        self.count += len(values)

    @property
    def mean(self) -> float | None:
        """None before any value was added."""
        return self.total / self.count if self.count else None


def plan_branching(
    rewards: Sequence[Sequence[float]],
    mean_fci: Sequence[float],
    running: RunningMean,
    rng: np.random.Generator,
) -> list[list[int] | None]:
    """For each question (its n initial rewards and its mean FCI), the indices of the responses to
    branch, or None when the question is dropped (an all-correct question at or below the running mean).

    `mean_fci` is, per question, the mean over its responses of the mean FCI over their response
    steps (y_1 = 0 included). `running` is updated with this batch's all-correct questions first.
    """
    if len(rewards) != len(mean_fci):
        raise InputError(f"{len(rewards)} questions but {len(mean_fci)} mean FCI values")
    correct = [np.asarray(r, dtype=np.float64) > 0 for r in rewards]
    running.add([m for m, c in zip(mean_fci, correct) if c.all()])
    plans: list[list[int] | None] = []
    for ok, score in zip(correct, mean_fci):
        n, k = len(ok), int(ok.sum())
        budget = branch_budget(k, n)
        if k == n:
            plans.append(list(range(budget)) if score > running.mean else None)
        elif k == 0:
            plans.append(list(range(n)))
        else:
            minority, majority = (np.flatnonzero(~ok), np.flatnonzero(ok)) if k / n >= 0.5 else \
                (np.flatnonzero(ok), np.flatnonzero(~ok))
            extra = rng.choice(majority, budget - len(minority), replace=False)
            plans.append(sorted([*minority.tolist(), *extra.tolist()]))
    return plans


def zero_std_keep(question: Sequence, rewards: Sequence[float]) -> np.ndarray:
    """Row mask of the zero-variance filter: False for every row of a question whose rows share one reward."""
    question, rewards = np.asarray(question), np.asarray(rewards, dtype=np.float64)
    keep = np.ones(len(rewards), dtype=bool)
    for q in np.unique(question):
        rows = question == q
        keep[rows] = rewards[rows].min() != rewards[rows].max()
    return keep


def next_prompt_batch(current: int, filtered_rows: int, reference: int = 1920, alpha: float = 0.1) -> int:
    """Dynamic prompt batch: target = ⌊B_t · reference / |S_t|⌋, B_{t+1} = ceil(α·target + (1−α)·B_t).

    `reference` is the published 64 prompts × 6 responses × 5 = 1920 rows; |S_t| = `filtered_rows`.
    """
    if current < 1 or filtered_rows < 1:
        raise InputError(f"need a prompt batch >= 1 and a filtered size >= 1, got {current} and {filtered_rows}")
    target = current * reference // filtered_rows
    return int(math.ceil(alpha * target + (1 - alpha) * current))
