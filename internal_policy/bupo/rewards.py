"""Verifiable rewards in TRL's reward-function form `f(completions, **dataset_columns) -> list[float]`.

`math_reward` scores the last `\\boxed{}` of a completion against the gold answer with math-verify
(symbolic equivalence: `\\frac{1}{2}` = `0.5`, `\\left( 3, \\frac{\\pi}{2} \\right)` = `(3,\\frac{\\pi}{2})`);
when math-verify cannot parse one side it falls back to a normalised string comparison and says so
once. `official_math_reward` is the official code's rule instead (last box + normalised string
equality, `official_math`); `SCORERS` names both checkers. The toy rewards (a target word, a length
window) give a tiny model like stories260K a reward
with a useful base rate.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Literal, get_args

from ..errors import InputError
from .official_math import official_check

logger = logging.getLogger(__name__)
_warned: set[str] = set()

Reward = Callable[..., list[float]]


def completion_text(completion) -> str:
    """The text of a TRL completion: a string, or a list of chat messages (the last one's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise InputError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces matched; None if there is none."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def _normalise(answer: str) -> str:
    answer = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\ |\$|\s", "", answer)
    answer = re.sub(r"\\text\{([^}]*)\}", r"\1", answer)
    return answer.rstrip(".").replace("dfrac", "frac").replace("tfrac", "frac")


def _say_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def answers_match(predicted: str, gold: str) -> bool:
    """Whether a predicted answer (the inside of a box) equals the gold answer, via math-verify."""
    from math_verify import parse, verify

    gold_parsed, pred_parsed = parse(f"${gold}$"), parse(f"${predicted}$")
    gold_ok, pred_ok = (any(not isinstance(x, str) for x in p) for p in (gold_parsed, pred_parsed))
    if gold_ok and pred_ok:
        return bool(verify(gold_parsed, pred_parsed))
    side, text = ("gold answer", gold) if not gold_ok else ("predicted answer", predicted)
    _say_once(f"math-verify could not parse the {side} {text!r} into a math expression; "
              "falling back to normalised string comparison")
    return _normalise(predicted) == _normalise(gold)


def check_answer(response: str, gold: str) -> bool:
    """A response is correct when its last `\\boxed{}` matches `gold` (no box: wrong, as in verl)."""
    boxed = last_boxed(response)
    return boxed is not None and answers_match(boxed, str(gold))


Scorer = Literal["math-verify", "official"]
SCORERS: dict[str, Callable[[str, str], bool]] = dict(zip(get_args(Scorer), (check_answer, official_check)))
"""Answer checkers by name: math-verify (symbolic) or the official code's normalised string match."""


def _scored_reward(check: Callable[[str, str], bool], name: str) -> Reward:
    def reward(completions: list, answer: list[str] | None = None, **_) -> list[float]:
        if answer is None:
            raise InputError(f"{name} needs an 'answer' column in the training data (the gold final answer)")
        return [float(check(completion_text(c), a)) for c, a in zip(completions, answer, strict=True)]

    reward.__name__ = name
    reward.needs_answer = True  # train refuses prompt sets without gold answers
    return reward


math_reward = _scored_reward(check_answer, "math_reward")
math_reward.__doc__ = "1.0 for a correct last `\\boxed{}` answer (math-verify), else 0.0; gold: the `answer` column."
official_math_reward = _scored_reward(official_check, "official_math_reward")
official_math_reward.__doc__ = "1.0 when the last box equals the gold answer by the official code's rule, else 0.0."


def target_word_reward(words: Sequence[str]) -> Reward:
    """Toy reward: 1.0 when the completion contains any of `words` (whole word, case-insensitive)."""
    if not words:
        raise InputError("target_word_reward needs at least one target word")
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)

    def reward(completions: list, **_) -> list[float]:
        return [float(bool(pattern.search(completion_text(c)))) for c in completions]

    reward.__name__ = "target_word"
    return reward


def length_window_reward(low: int, high: int) -> Reward:
    """Toy reward: 1.0 when the completion has between `low` and `high` words (inclusive)."""
    if not 0 <= low <= high:
        raise InputError(f"length window needs 0 <= low <= high, got [{low}, {high}]")

    def reward(completions: list, **_) -> list[float]:
        return [float(low <= len(completion_text(c).split()) <= high) for c in completions]

    reward.__name__ = "length_window"
    return reward


def reward_by_name(spec: str) -> Reward:
    """A reward from a CLI spec: 'math' (math-verify), 'math-official', 'word:cat,dog' or 'length:5-20'."""
    name, _, arg = spec.partition(":")
    if name == "math" and not arg:
        return math_reward
    if name == "math-official" and not arg:
        return official_math_reward
    if name == "word" and arg:
        return target_word_reward([w for w in arg.split(",") if w])
    if name == "length" and re.fullmatch(r"\d+-\d+", arg):
        low, high = (int(x) for x in arg.split("-"))
        return length_window_reward(low, high)
    raise InputError(f"unknown reward {spec!r}; use 'math', 'math-official', 'word:WORD[,WORD...]' or "
                     "'length:LOW-HIGH'")
