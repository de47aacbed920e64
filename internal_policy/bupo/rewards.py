"""Verifiable rewards in TRL's reward-function form `f(completions, **dataset_columns) -> list[float]`.

`math_reward` scores the last `\\boxed{}` of a completion against the gold answer with math-verify
(symbolic equivalence: `\\frac{1}{2}` = `0.5`, `\\left( 3, \\frac{\\pi}{2} \\right)` = `(3,\\frac{\\pi}{2})`);
when math-verify cannot parse one side it falls back to a normalised string comparison and says so
once. The toy rewards (a target word, a length window) give a tiny model like stories260K a reward
with a useful base rate.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence

from ..errors import InputError

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


def math_reward(completions: list, answer: list[str] | None = None, **_) -> list[float]:
    """1.0 for a correct last `\\boxed{}` answer, else 0.0; gold answers come from the `answer` column."""
    if answer is None:
        raise InputError("math_reward needs an 'answer' column in the training data (the gold final answer)")
    return [float(check_answer(completion_text(c), a)) for c, a in zip(completions, answer, strict=True)]


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
    """A reward from a CLI spec: 'math', 'word:cat,dog' or 'length:5-20'."""
    name, _, arg = spec.partition(":")
    if name == "math":
        return math_reward
    if name == "word" and arg:
        return target_word_reward([w for w in arg.split(",") if w])
    if name == "length" and re.fullmatch(r"\d+-\d+", arg):
        low, high = (int(x) for x in arg.split("-"))
        return length_window_reward(low, high)
    raise InputError(f"unknown reward {spec!r}; use 'math', 'word:WORD[,WORD...]' or 'length:LOW-HIGH'")
