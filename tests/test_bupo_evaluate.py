"""Pass@K estimator, Avg@K table and the shipped benchmark files."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from internal_policy.bupo.data import BENCHMARKS, load_prompts
from internal_policy.bupo.evaluate import pass_at_k, pass_at_k_curve, score_completions, summarize


def _brute_force(n: int, c: int, k: int) -> float:
    """Fraction of all K-subsets of n samples (c correct) that contain a correct sample."""
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_equals_enumeration(case):
    n, c, k = case
    assert pass_at_k(n, c, k) == pytest.approx(_brute_force(n, c, k), abs=1e-12)


def test_summary_table_and_curve():
    # problem 0: 2 of 4 correct; problem 1: 0 of 4
    scores = pd.DataFrame({"benchmark": "toy", "problem": [0] * 4 + [1] * 4, "sample": list(range(4)) * 2,
                           "correct": [True, False, True, False] + [False] * 4})
    table = summarize(scores).iloc[0]
    assert table["n"] == 4 and table["avg@4"] == pytest.approx(25.0)
    assert table["pass@1"] == pytest.approx(25.0)  # pass@1 equals avg
    assert table["pass@2"] == pytest.approx(100 * (1 - 1 / 6) / 2)  # C(2,2)/C(4,2) = 1/6 misses
    assert table["pass@4"] == pytest.approx(50.0)
    curve = pass_at_k_curve(scores)
    assert list(curve["k"]) == [1, 2, 3, 4]


def test_scoring_uses_the_answer_checker():
    scores = score_completions("b", ["0.5"], [[r"\boxed{\frac{1}{2}}", r"\boxed{2}", "0.5"]])
    assert list(scores["correct"]) == [True, False, False]


def test_shipped_benchmarks_load():
    sizes = {name: len(load_prompts(name)) for name in BENCHMARKS}
    assert sizes == {"math500": 500, "amc2023": 40, "aime_2024": 30, "aime_2025": 30}
    first = load_prompts("math500").iloc[0]
    assert first["answer"] == r"\left( 3, \frac{\pi}{2} \right)" and first["prompt"][0]["role"] == "system"
