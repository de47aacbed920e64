"""Reasoning steps of a prompt + response sequence (AttnRL's separator rule).

Step 0 is the prompt. The response is cut **after** every token whose decoded text contains the
first separator (in the given order) that any response token contains: by default `"\\n\\n"`, else
`"\\n"`; when no token contains any separator, every token is a step. No trailing empty step is
made. Token texts are decoded one token at a time, so a separator split across two tokens (e.g.
stories260K writes `"\\n\\n"` as two `"\\n"` byte tokens) is found by the next separator in line.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InputError

SEPARATORS: tuple[str, ...] = ("\n\n", "\n")
"""The published rule: split after tokens containing a blank line, else after tokens containing a newline."""
THINK_END = "</think>"
"""End of a thinking model's reasoning: steps that start after this token get FCI 0."""

Range = tuple[int, int]
"""Token positions [start, end) of one step."""


def split_steps(token_texts: Sequence[str], separators: Sequence[str] = SEPARATORS) -> list[Range]:
    """Response-relative [start, end) ranges of the steps of a response given its per-token texts."""
    n = len(token_texts)
    cuts: list[int] = []
    for separator in separators:
        cuts = [i + 1 for i, text in enumerate(token_texts) if separator in text]
        if cuts:
            break
    else:
        cuts = list(range(1, n + 1))
    bounds = [0, *cuts] if not cuts or cuts[-1] == n else [0, *cuts, n]
    return list(zip(bounds[:-1], bounds[1:]))


@dataclass(frozen=True)
class Steps:
    """The steps of one sequence in absolute token positions; `ranges[0]` is the prompt.

    `think_end` is the position of the first response token containing `</think>` (None if there is
    none): steps starting after it are not branch points (their FCI is set to 0).
    """

    ranges: tuple[Range, ...]
    think_end: int | None = None

    @property
    def n_steps(self) -> int:
        """Number of steps, prompt included."""
        return len(self.ranges)

    @property
    def length(self) -> int:
        """Tokens covered (prompt + response)."""
        return self.ranges[-1][1]

    def silenced(self) -> list[bool]:
        """Steps whose FCI is 0 by rule: the prompt, the first response step, and steps after `</think>`."""
        return [k < 2 or (self.think_end is not None and start > self.think_end)
                for k, (start, _) in enumerate(self.ranges)]


def escape(separator: str) -> str:
    """A separator as typed on a command line (backslash-n for a newline): the inverse of `unescape`."""
    return separator.encode("unicode_escape").decode()


def unescape(separator: str) -> str:
    """A separator as typed (`'\\n\\n'`) with its backslash escapes resolved; other characters kept as they are."""
    return codecs.decode(separator.encode("latin-1", "backslashreplace"), "unicode_escape")


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token decoded on its own (special tokens kept, so `</think>` stays visible)."""
    cache: dict[int, str] = {}
    for i in set(ids):
        cache[i] = tokenizer.decode([i])
    return [cache[i] for i in ids]


def sequence_steps(
    prompt_length: int,
    response_texts: Sequence[str],
    separators: Sequence[str] = SEPARATORS,
    think_end: str | None = THINK_END,
) -> Steps:
    """Steps of prompt + response: the prompt [0, P) then the response steps shifted by P."""
    if prompt_length < 1:
        raise InputError("the prompt is empty: step 0 (the prompt) needs at least one token")
    if not response_texts:
        raise InputError("the response is empty: it has no steps")
    response = split_steps(response_texts, separators)
    ranges = [(0, prompt_length)] + [(prompt_length + a, prompt_length + b) for a, b in response]
    think = None
    if think_end:
        think = next((prompt_length + i for i, text in enumerate(response_texts) if think_end in text), None)
    return Steps(tuple(ranges), think)
