"""Answer checker and toy rewards."""

from __future__ import annotations

import logging

import pytest

from internal_policy.bupo.rewards import (
    check_answer,
    last_boxed,
    length_window_reward,
    math_reward,
    reward_by_name,
    target_word_reward,
)
from internal_policy.errors import InputError


def test_last_boxed_matches_nested_braces():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed("no box") is None
    assert last_boxed(r"\boxed{\frac{1}{2}") is None  # unclosed


@pytest.mark.parametrize("gold, response", [
    (r"\frac{1}{2}", r"so \boxed{0.5}"),
    ("0.5", r"\boxed{\frac{1}{2}}"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"The point is \boxed{(3, \frac{\pi}{2})}."),
    (r"\dfrac{14}{3}", r"\boxed{\frac{14}{3}}"),
    ("540", r"\boxed{540}"),
])
def test_equivalent_forms_are_accepted(gold, response):
    assert check_answer(response, gold)


@pytest.mark.parametrize("gold, response", [
    (r"\frac{1}{2}", r"\boxed{0.6}"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{(3, \frac{\pi}{3})}"),
    ("540", "the answer is 540"),  # no box
    ("540", r"\boxed{540} wait, \boxed{541}"),  # last box counts
])
def test_wrong_answers_are_rejected(gold, response):
    assert not check_answer(response, gold)


def test_unparseable_answers_fall_back_to_strings(caplog):
    with caplog.at_level(logging.WARNING):
        assert check_answer(r"\boxed{ ? ? }", "??")
        assert not check_answer(r"\boxed{?!}", "??")
    assert "falling back to normalised string comparison" in caplog.text


def test_math_reward_reads_chat_completions_and_needs_answers():
    chats = [[{"role": "assistant", "content": r"\boxed{4}"}], [{"role": "assistant", "content": r"\boxed{5}"}]]
    assert math_reward(chats, answer=["4", "4"]) == [1.0, 0.0]
    with pytest.raises(InputError, match="answer"):
        math_reward(chats)


def test_toy_rewards():
    word = target_word_reward(["cat"])
    assert word(["The Cat sat.", "a category", "no"]) == [1.0, 0.0, 0.0]
    window = length_window_reward(2, 3)
    assert window(["one", "one two", "one two three", "a b c d"]) == [0.0, 1.0, 1.0, 0.0]
    assert reward_by_name("length:2-3")(["x y"]) == [1.0]
    with pytest.raises(InputError, match="unknown reward"):
        reward_by_name("nope")
