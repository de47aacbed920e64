"""AttnRL's trainer-independent pieces: branch-point selectors, adaptive sampling arithmetic, the
zero-variance filter, branch prefixes and TreeRL advantages (against a hand-computed tree and an
explicit-node re-implementation of the published tree code)."""

import math

import numpy as np
import pytest

from internal_policy.attnrl.sampling import RunningMean, branch_budget, next_prompt_batch, plan_branching, zero_std_keep
from internal_policy.attnrl.select import select_attn, select_entropy, select_random, step_points
from internal_policy.attnrl.steps import Steps
from internal_policy.attnrl.tree import Continuation, branch_prefixes, tree_advantages
from internal_policy.errors import InputError


def _steps(lengths, prompt=10):
    """Steps of a prompt of `prompt` tokens followed by response steps of the given lengths."""
    bounds = np.cumsum([0, prompt, *lengths])
    return Steps(tuple(zip(bounds[:-1].tolist(), bounds[1:].tolist())))


# -- selectors -----------------------------------------------------------------------------------

def test_attn_candidates_in_position_order_at_or_above_the_quantile():
    steps = _steps([5] * 9)  # steps 1..9 start at 10, 15, ..., 50
    fci = [0, 0, 0.1, 0.9, 0.2, 0.8, 0.3, 0.85, 0.05, 0.0]
    # response scores (steps 1..9) -> 80th percentile 0.82: candidates 3 (0.9) and 7 (0.85), not 5 (0.8)
    assert select_attn(fci, steps, points=2, min_start=0, min_distance=0) == [3, 7]
    # position order, not score order: with one point the earlier candidate wins, not the higher one
    assert select_attn([0, 0, 0.1, 0.85, 0.2, 0.8, 0.3, 0.9, 0, 0], steps, points=1, min_start=0, min_distance=0) == [3]
    assert select_attn(fci, steps, points=3, quantile=0.5, min_start=0, min_distance=0) == [3, 4, 5]  # median 0.2
    assert step_points(steps, [3, 7]) == [10, 30]  # response-relative starts: the step itself is resampled


def test_attn_start_and_distance_rules_then_earliest_fill():
    steps = _steps([5] * 9)
    fci = [0, 0, 0.9, 0.95, 0.1, 0.1, 0.1, 0.97, 0.1, 0.1]  # candidates 2, 3, 7 (quantile 0.8 = 0.91)
    assert select_attn(fci, steps, points=2, quantile=0.7, min_start=0, min_distance=0) == [2, 3]
    # step 2 starts at 15 < 16: skipped; step 3 [25, 30) and 7 [45, 50) have a 15-token gap
    assert select_attn(fci, steps, points=2, quantile=0.7, min_start=16, min_distance=15) == [3, 7]
    # gap 15 < 16: only step 3 qualifies, the earliest unchosen step (2) fills the second point
    assert select_attn(fci, steps, points=2, quantile=0.7, min_start=16, min_distance=16) == [2, 3]
    # adjacent steps have gap 0: [2, 3] is refused with any distance > 0
    assert select_attn(fci, steps, points=2, quantile=0.7, min_start=0, min_distance=1) == [2, 7]


def test_distance_is_the_gap_between_step_ranges_either_way_round():
    from internal_policy.attnrl.select import _too_close

    assert not _too_close((0, 5), (10, 15), 5) and not _too_close((10, 15), (0, 5), 5)  # gap 5 = distance: far enough
    assert _too_close((0, 5), (9, 15), 5) and _too_close((9, 15), (0, 5), 5)
    assert not _too_close((0, 5), (5, 9), 0)


def test_attn_threshold_zero_uses_smallest_positive_and_few_steps_repeat():
    steps = _steps([4] * 6)
    fci = [0, 0, 0.3, 0, 0, 0, 0]  # 80th percentile of response scores is 0 -> threshold 0.3
    assert select_attn(fci, steps, points=1, min_start=0, min_distance=0) == [2]
    two = _steps([4, 4])  # one possible branch step (step 2): repeated to make 3 points
    assert select_attn([0, 0, 0.0], two, points=3, min_start=0, min_distance=0) == [2, 2, 2]


@pytest.mark.parametrize("quantile", [0, -0.1, 1.5])
def test_quantile_outside_unit_interval_is_refused(quantile):
    with pytest.raises(InputError, match=r"quantile must be in \(0, 1\]"):
        select_attn([0, 0, 1, 1], _steps([2, 2, 2]), quantile=quantile)


def test_response_with_one_step_is_refused():
    with pytest.raises(InputError, match="the response has 1 step"):
        select_attn([0, 0], _steps([7]))
    with pytest.raises(InputError, match="the response has 1 step"):
        select_random(_steps([7]), np.random.default_rng(0))


def test_random_selector_obeys_the_same_rules_and_is_seeded():
    steps = _steps([5] * 20)
    picks = [select_random(steps, np.random.default_rng(s), points=3, min_start=20, min_distance=6) for s in range(20)]
    assert picks[0] == select_random(steps, np.random.default_rng(0), points=3, min_start=20, min_distance=6)
    assert len({tuple(p) for p in picks}) > 5
    for chosen in picks:
        starts = [steps.ranges[k][0] for k in chosen]
        assert min(chosen) >= 2 and min(starts) >= 20 and len(set(chosen)) == 3
        assert all(b - (a + 5) >= 6 for a, b in zip(starts, starts[1:]))


def test_entropy_selector_top_tokens_without_the_last():
    entropies = [0.1, 2.0, 0.5, 2.0, 0.3, 9.0]  # the last token never counts; ties go to the earlier token
    assert select_entropy(entropies, points=2) == [1, 3]
    assert select_entropy(entropies, points=3) == [1, 2, 3]
    with pytest.raises(InputError, match="fewer than 3 tokens"):
        select_entropy([1.0, 2.0, 3.0], points=3)


# -- adaptive sampling ---------------------------------------------------------------------------

def test_branch_budget_table_for_six_responses():
    assert {k: branch_budget(k, 6) for k in range(7)} == {0: 6, 1: 6, 2: 5, 3: 4, 4: 4, 5: 3, 6: 3}
    assert all(branch_budget(k, n) == math.ceil(n * math.exp(-k / n)) for n in (4, 8, 16) for k in range(n + 1))


def test_plan_mixed_wrong_and_correct_questions():
    rng = np.random.default_rng(0)
    running = RunningMean()
    rewards = [[1, 0, 0, 0, 0, 0],   # k=1: the correct one + 5 of the wrong ones
               [1, 1, 1, 0, 0, 0],   # k=3 (acc 0.5): the 3 wrong ones + 1 correct
               [1, 1, 1, 1, 1, 0],   # k=5: the wrong one + 2 correct
               [0] * 6,              # all wrong: all six
               [1] * 6,              # all correct, mean FCI 0.2 < running mean 0.3: dropped
               [1] * 6]              # all correct, 0.4 > 0.3: the first three
    plans = plan_branching(rewards, [0.5, 0.5, 0.5, 0.5, 0.2, 0.4], running, rng)
    assert 0 in plans[0] and len(plans[0]) == 6
    assert {3, 4, 5} <= set(plans[1]) and len(plans[1]) == 4 and len(set(plans[1]) & {0, 1, 2}) == 1
    assert 5 in plans[2] and len(plans[2]) == 3
    assert plans[3] == list(range(6)) and plans[4] is None and plans[5] == [0, 1, 2]
    assert running.mean == pytest.approx(0.3)
    # the running mean covers every all-correct question so far and is updated before comparing
    later = plan_branching([[1] * 6], [0.31], running, rng)
    assert running.mean == pytest.approx((0.2 + 0.4 + 0.31) / 3) and later == [[0, 1, 2]]


def test_zero_std_filter_and_dynamic_prompt_batch():
    keep = zero_std_keep(["a", "a", "b", "b", "b", "c"], [1, 0, 1, 1, 1, 0])
    assert keep.tolist() == [True, True, False, False, False, False]
    assert next_prompt_batch(64, 1920) == 64
    assert next_prompt_batch(64, 960) == math.ceil(0.1 * 128 + 0.9 * 64) == 71
    assert next_prompt_batch(64, 1000) == math.ceil(0.1 * (64 * 1920 // 1000) + 0.9 * 64)


# -- rollouts and TreeRL advantages --------------------------------------------------------------

def test_branch_prefixes_start_with_the_parents_prefix():
    prompt, responses = [1, 2], [[10, 11, 12, 13], [20, 21, 22]]
    prefixes = branch_prefixes(prompt, responses, {0: [1, 3], 1: [2]}, samples=2)
    assert [(p.parent, p.point) for p in prefixes] == [(0, 1), (0, 1), (0, 3), (0, 3), (1, 2), (1, 2)]
    assert prefixes[2].ids == [1, 2, 10, 11, 12] and prefixes[4].ids == [1, 2, 20, 21]
    with pytest.raises(InputError, match="outside response 1"):
        branch_prefixes(prompt, responses, {1: [3]})


def _tree():
    """r0 (10 tokens, reward 1) branched at 3 (rewards 0, 0) and 6 (1, 0); r1 unbranched (0); r2 (5 tokens, 0)
    branched at 2 (1, 1)."""
    responses = [list(range(100, 110)), list(range(200, 208)), list(range(300, 305))]
    continuations = [Continuation(0, 3, [1, 1, 1, 1], 0.0), Continuation(0, 3, [2] * 5, 0.0),
                     Continuation(0, 6, [3, 3], 1.0), Continuation(0, 6, [4] * 3, 0.0),
                     Continuation(2, 2, [5] * 3, 1.0), Continuation(2, 2, [6] * 3, 1.0)]
    return responses, [1.0, 0.0, 0.0], continuations


def test_tree_advantages_equal_a_hand_computed_tree():
    responses, rewards, continuations = _tree()
    leaves = tree_advantages(responses, rewards, continuations)
    root = 4 / 9  # 9 leaves, 4 of them rewarded
    a = {  # (global + local) / sqrt(leaves below), by hand
        "r0[0,3)": 2 * (2 / 5 - root) / math.sqrt(5),
        "r0[3,6)": ((2 / 3 - root) + (2 / 3 - 2 / 5)) / math.sqrt(3),
        "r0[6,10)": (1 - root) + (1 - 2 / 3),
        "c@3": (0 - root) + (0 - 2 / 5),
        "c@6 right": (1 - root) + (1 - 2 / 3),
        "c@6 wrong": (0 - root) + (0 - 2 / 3),
        "r1": 2 * (0 - root),
        "r2[0,2)": 2 * (2 / 3 - root) / math.sqrt(3),
        "r2[2,5)": (0 - root) + (0 - 2 / 3),
        "c@2": (1 - root) + (1 - 2 / 3),
    }
    r0, r1, r2, c3a, c3b, c6a, c6b, c2a, c2b = leaves
    expect = {
        id(r0): [a["r0[0,3)"]] * 3 + [a["r0[3,6)"]] * 3 + [a["r0[6,10)"]] * 4,
        id(r1): [a["r1"]] * 8,
        id(r2): [a["r2[0,2)"]] * 2 + [a["r2[2,5)"]] * 3,
        id(c3a): [a["r0[0,3)"]] * 3 + [a["c@3"]] * 4,
        id(c3b): [a["r0[0,3)"]] * 3 + [a["c@3"]] * 5,
        id(c6a): [a["r0[0,3)"]] * 3 + [a["r0[3,6)"]] * 3 + [a["c@6 right"]] * 2,
        id(c6b): [a["r0[0,3)"]] * 3 + [a["r0[3,6)"]] * 3 + [a["c@6 wrong"]] * 3,
        id(c2a): [a["r2[0,2)"]] * 2 + [a["c@2"]] * 3,
        id(c2b): [a["r2[0,2)"]] * 2 + [a["c@2"]] * 3,
    }
    for leaf in leaves:
        assert leaf.advantages == pytest.approx(expect[id(leaf)], abs=1e-12)
    assert [leaf.trained for leaf in leaves] == [True, False, True] + [True] * 6
    assert c6a.ids == responses[0][:6] + [3, 3] and c2b.ids == responses[2][:2] + [6, 6, 6]
    for leaf in leaves:  # constant within each segment, segments tile the row
        assert [s for seg in leaf.segments for s in range(seg[0], seg[1])] == list(range(len(leaf.ids)))
        for start, end, value in leaf.segments:
            assert set(leaf.advantages[start:end]) <= {value}


def test_without_branches_advantages_reduce_to_twice_r_minus_mean():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0]
    leaves = tree_advantages([[7] * (i + 2) for i in range(5)], rewards, [])
    for leaf, r in zip(leaves, rewards):
        assert leaf.advantages == pytest.approx([2 * (r - 0.6)] * len(leaf.ids)) and not leaf.trained


def test_cut_to_max_length():
    responses, rewards, continuations = _tree()
    leaves = tree_advantages(responses, rewards, continuations, max_length=7)
    full = tree_advantages(responses, rewards, continuations)
    for cut, whole in zip(leaves, full):
        assert cut.ids == whole.ids[:7] and cut.advantages == whole.advantages[:7]


class _Node:
    """The published tree (attnrl_core_algos.build_into_tree_format / path_from_root_to_node), node by node."""

    def __init__(self, n_tokens, parent=None, reward=None):
        self.n_tokens, self.parent, self.children, self.reward = n_tokens, parent, [], reward
        if parent is not None:
            parent.children.append(self)

    def leaves(self):
        return [self] if not self.children else [leaf for child in self.children for leaf in child.leaves()]


def _reference_tree(responses, rewards, continuations):
    root = _Node(0)
    trained = []
    for p, (response, reward) in enumerate(zip(responses, rewards)):
        mine = sorted((c.point, i) for i, c in enumerate(continuations) if c.parent == p)
        points = sorted({point for point, _ in mine})
        node, start, paths = root, 0, {}
        for point in points:  # segment [start, point), then the continuations at `point` hang off it
            node = _Node(point - start, node)
            for q, i in mine:
                if q == point:
                    paths[i] = _Node(len(continuations[i].ids), node, continuations[i].reward)
            start = point
        paths[None] = _Node(len(response) - start, node, reward)
        trained.append((p, paths, bool(points)))
    value = lambda n: np.mean([leaf.reward for leaf in n.leaves()])  # noqa: E731
    out = {}
    for p, paths, branched in trained:
        for key, leaf in paths.items():
            chain, node = [], leaf
            while node.parent is not None:
                v, up = value(node), value(node.parent)
                chain.append([(v - value(root) + v - up) / math.sqrt(len(node.leaves()))] * node.n_tokens)
                node = node.parent
            out[(p, key)] = [x for seg in reversed(chain) for x in seg], branched
    return out


@pytest.mark.parametrize("seed", range(6))
def test_tree_advantages_equal_the_published_tree_on_random_trees(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 6))
    responses = [list(rng.integers(0, 50, int(rng.integers(2, 12)))) for _ in range(n)]
    rewards = rng.integers(0, 2, n).astype(float).tolist()
    continuations = []
    for p in rng.choice(n, int(rng.integers(0, n + 1)), replace=False):
        for point in rng.integers(0, len(responses[p]), int(rng.integers(1, 4))):  # repeats and point 0 allowed
            continuations += [Continuation(int(p), int(point), [1] * int(rng.integers(1, 6)), float(rng.integers(0, 2)))
                              for _ in range(2)]
    reference = _reference_tree(responses, rewards, continuations)
    for leaf in tree_advantages(responses, rewards, continuations):
        advantages, trained = reference[(leaf.parent, leaf.branch)]
        assert leaf.advantages == pytest.approx(advantages, abs=1e-12) and leaf.trained == trained
