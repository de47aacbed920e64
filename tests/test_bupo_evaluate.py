"""Pass@K estimator, Avg@K table and the shipped benchmark files."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from internal_policy.bupo.data import BENCHMARKS, load_prompts
from internal_policy.bupo.evaluate import pass_at_k, pass_at_k_curve, score_completions, summarize
from internal_policy.bupo.official_math import official_check, vote_key
from internal_policy.bupo.rewards import reward_by_name


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
    assert list(scores["vote"][:2]) == [r"\frac{1}{2}", "2"] and pd.isna(scores["vote"][2])


def test_majority_vote_by_hand():
    # problem 0 (gold 7): 7, 5, 5, '7.' -> maj@1 7 right, maj@2 tie 7/5 -> 7 (seen first) right, maj@4 5 wrong
    # problem 1 (gold 3): 3, no box, 4, 3 -> right at 1, 2 (the box-less sample does not vote) and 4
    texts = [[r"\boxed{7}", r"\boxed{5}", r"\boxed{ 5 }", r"\boxed{7.}", r"so \boxed{7}"],
             [r"\boxed{3}", "no box", r"\boxed{4}", r"\boxed{3}"]]
    scores = score_completions("t", ["7", "3"], [texts[0][:4], texts[1]], official_check)
    table = summarize(scores).iloc[0]
    assert (table["maj@1"], table["maj@2"], table["maj@4"]) == (100.0, 100.0, 50.0)
    one = summarize(score_completions("t", ["5"], [texts[0]], official_check), ks=[1, 3, 5]).iloc[0]
    assert (one["maj@1"], one["maj@3"], one["maj@5"]) == (0.0, 100.0, 0.0)  # 7 x2, 5 x2, '7.': tie -> 7


@pytest.mark.parametrize("response, gold, official, verify", [
    (r"\boxed{0.5}", r"\frac{1}{2}", True, True),  # the one decimal the MATH normalisation rewrites
    (r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", False, True),  # equal values, different strings
    (r"\boxed{\dfrac12}", r"\frac{1}{2}", True, True),
    (r"\boxed{x = 3}", "3", True, True),
    (r"\boxed{10\%}", "10", True, True),
    (r"The answer is \boxed 5$ done", "5", True, False),  # the official '\boxed ' form (math-verify: no box)
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", True, True),
    ("540", "540", False, False),
])
def test_official_scorer_is_the_official_string_rule(response, gold, official, verify):
    from internal_policy.bupo.rewards import check_answer

    assert official_check(response, gold) is official and check_answer(response, gold) is verify
    assert reward_by_name("math-official")([response], answer=[gold]) == [float(official)]


def test_vote_keys_normalise_like_the_official_rule():
    assert vote_key(r"\boxed{\dfrac{1}{2}}") == vote_key(r"\boxed{0.5}") == r"\frac{1}{2}"
    assert vote_key("nothing") is None


def test_shipped_benchmarks_load():
    sizes = {name: len(load_prompts(name)) for name in BENCHMARKS}
    assert sizes == {"math500": 500, "amc2023": 40, "aime_2024": 30, "aime_2025": 30}
    first = load_prompts("math500").iloc[0]
    assert first["answer"] == r"\left( 3, \frac{\pi}{2} \right)" and first["prompt"][0]["role"] == "system"
