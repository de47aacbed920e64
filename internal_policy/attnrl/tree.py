"""Branch rollouts and TreeRL-style process advantages (AttnRL).

One tree per question: a virtual root over its n initial responses. A branched response is cut into
segments at its distinct branch points p_1 < ... < p_m: [0, p_1), [p_1, p_2), ..., [p_m, end); the
segment [p_{i-1}, p_i) is the parent of both the next original segment and of every continuation
sampled at p_i. So a continuation's training sequence is its parent's prefix response[:p_i] plus its
own tokens, and an original response's is the whole response. Every node's value is the mean reward
of the leaves below it, and its advantage is

    A(node) = ((V(node) − V(root)) + (V(node) − V(parent))) / √(leaves below node),

given to every token of its segment (no std normalisation). V(root) is the mean over *all* leaves of
the question, unbranched responses included; unbranched responses are not trained on (their path
from the root has a single node, as in the code). Without branches, a response directly under the
root gets A = 2·(r − mean r): the global and local terms coincide and √1 = 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import InputError


@dataclass(frozen=True)
class BranchPrefix:
    """A continuation to sample: `ids` = prompt + the parent response's tokens before `point`."""

    parent: int
    point: int
    ids: list[int]


@dataclass(frozen=True)
class Continuation:
    """A sampled continuation of response `parent` from token `point` on: its new tokens and reward."""

    parent: int
    point: int
    ids: Sequence[int]
    reward: float


@dataclass(frozen=True)
class Leaf:
    """One training sequence: `ids` (completion tokens), one advantage per token, its reward.

    `segments` lists (start, end, advantage) over `ids`, root side first; `branch` is the index of the
    continuation in the input list, or None for the initial response itself. `trained` is False for
    initial responses that were not branched (they only count in V(root)).
    """

    parent: int
    branch: int | None
    ids: list[int]
    reward: float
    segments: list[tuple[int, int, float]]
    trained: bool
    advantages: list[float] = field(repr=False, default_factory=list)


def branch_prefixes(
    prompt_ids: Sequence[int],
    responses: Sequence[Sequence[int]],
    points: Mapping[int, Sequence[int]],
    samples: int = 2,
) -> list[BranchPrefix]:
    """`samples` prefixes per (response, point) of `points` {response index: response-relative token indices}.

    Each prefix starts with the prompt and the parent's tokens before the point (the step at the point
    is resampled). Cut each continuation to `max_length - point` tokens so the training row fits.
    """
    if samples < 1:
        raise InputError(f"branch samples per point must be >= 1, got {samples}")
    out = []
    for parent, chosen in sorted(points.items()):
        response = list(responses[parent])
        for point in chosen:
            if not 0 <= point < len(response):
                raise InputError(f"branch point {point} is outside response {parent} ({len(response)} tokens)")
            out += [BranchPrefix(parent, point, [*prompt_ids, *response[:point]]) for _ in range(samples)]
    return out


def _advantage(value: float, parent_value: float, root_value: float, leaves: int) -> float:
    return ((value - root_value) + (value - parent_value)) / math.sqrt(leaves)


def tree_advantages(
    responses: Sequence[Sequence[int]],
    rewards: Sequence[float],
    continuations: Sequence[Continuation],
    max_length: int | None = None,
) -> list[Leaf]:
    """Leaves of one question's tree with their per-token TreeRL advantages (module docstring).

    Returns the initial responses first (in order), then the continuations (in input order). With
    `max_length`, a leaf's tokens (prefix + own) are cut to that many, as the trainer's rows are.
    """
    if len(responses) != len(rewards):
        raise InputError(f"{len(responses)} responses but {len(rewards)} rewards")
    if not responses:
        raise InputError("a question needs at least one response")
    children: dict[int, list[int]] = {}
    for index, branch in enumerate(continuations):
        if not 0 <= branch.parent < len(responses) or not 0 <= branch.point < len(responses[branch.parent]):
            raise InputError(f"continuation {index} branches response {branch.parent} at token {branch.point}, "
                             "outside the responses")
        children.setdefault(branch.parent, []).append(index)
    all_rewards = [*map(float, rewards), *(float(c.reward) for c in continuations)]
    root = sum(all_rewards) / len(all_rewards)
    originals: list[Leaf] = []
    branched: dict[int, Leaf] = {}
    for parent, response in enumerate(responses):
        own, mine = list(response), children.get(parent, [])
        points = sorted({continuations[i].point for i in mine})
        bounds = [0, *points, len(own)]
        # below segment s = [bounds[s], bounds[s+1]): the original leaf and the continuations hanging off
        # segments s, s+1, ... (a continuation at p_i hangs off the segment ending at p_i)
        below = [[float(rewards[parent])] + [float(continuations[i].reward) for i in mine
                                               if continuations[i].point >= bounds[s + 1]]
                 for s in range(len(bounds) - 1)]
        values = [sum(r) / len(r) for r in below]
        segments = [(bounds[s], bounds[s + 1], _advantage(values[s], values[s - 1] if s else root, root, len(below[s])))
                    for s in range(len(values))]
        originals.append(_leaf(parent, None, own, float(rewards[parent]), segments, bool(points), max_length))
        for i in mine:
            branch = continuations[i]
            s = points.index(branch.point)  # it hangs off segment s = [bounds[s], point)
            value = float(branch.reward)
            tail = (branch.point, branch.point + len(branch.ids), _advantage(value, values[s], root, 1))
            branched[i] = _leaf(parent, i, own[: branch.point] + list(branch.ids), value,
                                segments[: s + 1] + [tail], True, max_length)
    return originals + [branched[i] for i in range(len(continuations))]


def _leaf(parent: int, branch: int | None, ids: list[int], reward: float, segments: list[tuple[int, int, float]],
          trained: bool, max_length: int | None) -> Leaf:
    """A leaf with its segments cut to `max_length` tokens and its per-token advantages."""
    if max_length is not None:
        ids = ids[:max_length]
        segments = [(a, min(b, max_length), v) for a, b, v in segments if a < max_length]
    per_token = [v for a, b, v in segments for _ in range(a, b)]
    return Leaf(parent, branch, ids, reward, segments, trained, per_token)
