"""Where to branch a response (AttnRL's FCI rule, and the `entropy` / `random` baselines).

`attn` (the published rule): candidates are the response steps whose FCI is at or above the
`quantile` of that response's step scores (steps 1..S-1; if that quantile is 0 while some score is
positive, the smallest positive score), taken in position order, never the first response step. A
candidate is kept when it starts at absolute position ≥ `min_start` and lies ≥ `min_distance`
tokens from every step already chosen (the gap between the two steps' token ranges, as the code
measures it). The first `points` kept are the branch points; if fewer qualify, the earliest steps
from the second response step on fill the rest (once each, then repeated if the response has too
few steps). The branch point is the **start** of the chosen step: the step itself is resampled.

`random` takes the same candidates-and-distance route over all response steps from the second
on, in a seeded random order; `entropy` takes the `points` highest-entropy response tokens (the last
token excluded, ties to the earlier token), as the code's TreeRL-like splitter does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from .steps import Steps

SELECTORS = ("attn", "entropy", "random")


def check_selection(points: int, quantile: float = 0.8, min_start: int = 0, min_distance: int = 0) -> None:
    """One-line errors for selection settings outside their domain."""
    if not isinstance(points, (int, np.integer)) or points < 1:
        raise InputError(f"points (branch points per response) must be an integer >= 1, got {points!r}")
    if not 0 < quantile <= 1:
        raise InputError(f"quantile must be in (0, 1], got {quantile}; the published value is 0.8")
    if min_start < 0 or min_distance < 0:
        raise InputError(f"min-start and min-distance must be >= 0 tokens, got {min_start} and {min_distance}")


def _response_steps(steps: Steps) -> int:
    """Number of response steps; branching needs at least two (the first is never a branch point)."""
    n = steps.n_steps - 1
    if n < 2:
        raise InputError(f"the response has {n} step(s): a branch point needs at least two response steps "
                         "(the first is never one); give a longer response or a finer --step-sep")
    return n


def _too_close(candidate: tuple[int, int], chosen: tuple[int, int], distance: int) -> bool:
    """The code's check: the token gap between two step ranges is below `distance`."""
    (start, end), (other_start, other_end) = candidate, chosen
    if other_start >= end:
        return other_start - end < distance
    if start >= other_end:
        return start - other_end < distance
    return False


def _place(order: Sequence[int], steps: Steps, points: int, min_start: int, min_distance: int) -> list[int]:
    """Greedy in `order` under the start/distance rules, then the earliest-steps fill; sorted step indices."""
    chosen: list[int] = []
    for k in order:
        start = steps.ranges[k][0]
        if start >= min_start and not any(_too_close(steps.ranges[k], steps.ranges[c], min_distance) for c in chosen):
            chosen.append(k)
        if len(chosen) == points:
            return sorted(chosen)
    later = range(2, steps.n_steps)
    for k in later:  # fill with the earliest steps not chosen yet
        if len(chosen) == points:
            break
        if k not in chosen:
            chosen.append(k)
    while len(chosen) < points:  # too few steps: repeat them (several continuation groups per point)
        chosen.extend(later[: points - len(chosen)])
    return sorted(chosen)


def threshold(fci: Sequence[float], quantile: float = 0.8) -> float:
    """The candidates' FCI bar: the `quantile` of the response steps' scores (`fci[1:]`, step 0 is the prompt),
    or the smallest positive score when that quantile is 0 while some score is positive."""
    scores = np.asarray(fci, dtype=np.float64)[1:]
    bar = float(np.quantile(scores, quantile))
    return float(scores[scores > 0].min()) if bar == 0 and (scores > 0).any() else bar


def select_attn(
    fci: Sequence[float],
    steps: Steps,
    points: int = 2,
    quantile: float = 0.8,
    min_start: int = 512,
    min_distance: int = 512,
) -> list[int]:
    """Step indices of the branch points chosen by FCI (module docstring); `fci[k]` is step k's y_k."""
    check_selection(points, quantile, min_start, min_distance)
    _response_steps(steps)
    if len(fci) != steps.n_steps:
        raise InputError(f"{len(fci)} FCI values for {steps.n_steps} steps")
    scores = np.asarray(fci, dtype=np.float64)
    bar = threshold(scores, quantile)
    candidates = [k for k in range(2, steps.n_steps) if scores[k] >= bar]
    return _place(candidates, steps, points, min_start, min_distance)


def select_random(
    steps: Steps,
    rng: np.random.Generator,
    points: int = 2,
    min_start: int = 512,
    min_distance: int = 512,
) -> list[int]:
    """Step indices of `points` branch points drawn in random order under the same start/distance rules."""
    check_selection(points, 1.0, min_start, min_distance)
    _response_steps(steps)
    return _place(list(rng.permutation(np.arange(2, steps.n_steps))), steps, points, min_start, min_distance)


def select_entropy(entropies: Sequence[float], points: int = 2) -> list[int]:
    """Response-relative token indices of the `points` highest-entropy tokens (not the last), in position order.

    `entropies[i]` is the entropy of the policy that produced response token i.
    """
    check_selection(points)
    values = np.asarray(entropies, dtype=np.float64)[:-1]
    if len(values) < points:
        raise InputError(f"a {len(entropies)}-token response has fewer than {points} tokens to branch at "
                         "(the last token is never one)")
    return sorted(np.argsort(-values, kind="stable")[:points].tolist())


def step_points(steps: Steps, chosen: Sequence[int]) -> list[int]:
    """Response-relative token index where each chosen step starts: the continuation regenerates from there."""
    prompt_length = steps.ranges[0][1]
    return [steps.ranges[k][0] - prompt_length for k in chosen]
