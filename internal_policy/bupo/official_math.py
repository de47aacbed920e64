"""The official BuPO code's answer check, so accuracies compare with the paper's.

The official code (verl `utils/reward_score/math.py`, used for training and validation) takes the last
`\\boxed{}` (or `\\boxed ...` / `\\fbox{}`) of a response and calls it correct when it equals the gold
answer after the MATH string normalisation of Hendrycks et al. (via lm-evaluation-harness); no
symbolic equivalence, so `0.5` matches `\\frac{1}{2}` but `\\frac{2}{4}` does not. Ported here
function by function (same order of replacements, same fall-backs); the original is Apache-2.0
(Bytedance, EleutherAI). `math-verify` (`rewards.check_answer`) is the symbolic alternative.
"""

from __future__ import annotations


def last_boxed_only_string(string: str) -> str | None:
    """The last `\\boxed{...}` / `\\fbox{...}` with braces (or `\\boxed x` up to a `$`), as the official cut."""
    idx = string.rfind("\\boxed")
    if "\\boxed " in string:
        return "\\boxed " + string.split("\\boxed ")[-1].split("$")[0]
    if idx < 0:
        idx = string.rfind("\\fbox")
        if idx < 0:
            return None
    depth = 0
    for i in range(idx, len(string)):
        depth += {"{": 1, "}": -1}.get(string[i], 0)
        if string[i] == "}" and depth == 0:
            return string[idx:i + 1]
    return None


def remove_boxed(boxed: str) -> str | None:
    """The content of a `\\boxed{...}` / `\\boxed ...` string; None where the official code's asserts would fail."""
    if "\\boxed " in boxed:
        return boxed[len("\\boxed "):] if boxed.startswith("\\boxed ") else None
    if boxed.startswith("\\boxed{") and boxed.endswith("}"):
        return boxed[len("\\boxed{"):-1]
    return None


def _fix_fracs(string: str) -> str:
    parts = string.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part[0] == "{":  # an empty remainder raises IndexError, as in the original
            out += part
            continue
        if len(part) < 2:
            return string
        a, b, rest = part[0], part[1], part[2:]
        out += "{" + a + "}{" + b + "}" + rest if b != "{" else "{" + a + "}" + b + rest
    return out


def _fix_a_slash_b(string: str) -> str:
    if len(string.split("/")) != 2:
        return string
    a, b = string.split("/")
    try:
        a, b = int(a), int(b)
    except ValueError:
        return string
    return f"\\frac{{{a}}}{{{b}}}" if string == f"{a}/{b}" else string


def _remove_right_units(string: str) -> str:
    if "\\text{ " in string:
        splits = string.split("\\text{ ")
        if len(splits) != 2:
            raise ValueError("several \\text{ } units")
        return splits[0]
    return string


def _fix_sqrt(string: str) -> str:
    if "\\sqrt" not in string:
        return string
    splits = string.split("\\sqrt")
    out = splits[0]
    for split in splits[1:]:
        out += "\\sqrt" + split if split[0] == "{" else "\\sqrt{" + split[0] + "}" + split[1:]
    return out


def strip_string(string: str) -> str:
    """The MATH normalisation: drop spaces, \\left/\\right, units, degrees, \\%, \\$; canonical \\frac and \\sqrt."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        string = string.replace(old, new)
    string = _remove_right_units(string)
    for old, new in (("\\%", ""), (" .", " 0."), ("{.", "{0.")):
        string = string.replace(old, new)
    if not string:
        return string
    if string[0] == ".":
        string = "0" + string
    if len(string.split("=")) == 2 and len(string.split("=")[0]) <= 2:
        string = string.split("=")[1]
    string = _fix_fracs(_fix_sqrt(string).replace(" ", ""))
    if string == "0.5":
        string = "\\frac{1}{2}"
    return _fix_a_slash_b(string)


def is_equiv(predicted: str, gold: str) -> bool:
    """Normalised string equality (the raw strings when normalising fails)."""
    try:
        return strip_string(predicted) == strip_string(gold)
    except (ValueError, IndexError):
        return predicted == gold


def official_answer(response: str) -> str | None:
    """The boxed answer the official code grades (None when there is none)."""
    boxed = last_boxed_only_string(response)
    return remove_boxed(boxed) if boxed is not None else None


def official_check(response: str, gold: str) -> bool:
    """The official reward: the last boxed answer equals `gold` after MATH normalisation (no box: wrong)."""
    answer = official_answer(response)
    return answer is not None and is_equiv(answer, str(gold))


def vote_key(response: str) -> str | None:
    """The normalised boxed answer, the key majority voting (Maj@K) groups responses by."""
    answer = official_answer(response)
    if answer is None:
        return None
    try:
        return strip_string(answer)
    except (ValueError, IndexError):
        return answer
