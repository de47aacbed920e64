"""Avg@K, unbiased Pass@K (paper §4, Fig. 6) and Maj@K with a boxed-answer checker.

Pass@K for a problem with n samples of which c are correct is 1 − C(n−c, K)/C(n, K) (Chen et al.
2021), the probability that K samples drawn without replacement contain a correct one; Avg@n is the
mean accuracy over the n samples. Maj@K votes over the first K samples of a problem: the most
frequent normalised boxed answer (`official_math.vote_key`; ties go to the answer seen first, samples
without a box do not vote) is scored like any sample. Checkers (`rewards.SCORERS`): `math-verify`
(symbolic) or `official` (the official code's last box + normalised string equality). Sampling goes
through `internal_policy.generate` (temperature 1, top_p 1 as in the paper; HF `generate`); for large
n on big models sample with vLLM (`generate(..., engine="vllm")`) and score with `score_completions`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from ..data import Prompt
from ..errors import InputError
from ..generate import Sampling, generate
from .data import require_answers
from .official_math import vote_key
from .rewards import SCORERS, check_answer


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@K = 1 − C(n−c, K)/C(n, K), as the stable product 1 − Π_{i=n−c+1}^{n} (1 − K/i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise InputError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def default_ks(n: int) -> list[int]:
    """K = 1, 2, 4, ... up to n (and n itself)."""
    ks = [2**i for i in range(int(math.log2(n)) + 1)]
    return ks if ks[-1] == n else ks + [n]


def majority_correct(group: pd.DataFrame, k: int) -> bool:
    """Whether the majority vote of a problem's first k samples (columns sample, vote, correct) is correct."""
    first = group.sort_values("sample").head(k)
    votes = first.dropna(subset=["vote"])
    if votes.empty:
        return False
    counts = votes["vote"].value_counts(sort=False)  # in order of first appearance
    winner = counts.index[int(np.argmax(counts.to_numpy()))]
    return bool(votes.loc[votes["vote"] == winner, "correct"].iloc[0])


def summarize(scores: pd.DataFrame, ks: Sequence[int] | None = None) -> pd.DataFrame:
    """Per benchmark: n, Avg@n, Pass@K and (with a `vote` column) Maj@K, in percent, from per-sample scores.

    `scores` has one row per sample: [benchmark, problem, sample, correct] and optionally `vote`.
    """
    counts = scores.groupby(["benchmark", "problem"])["correct"].agg(["size", "sum"]).reset_index()
    rows = []
    for bench, group in counts.groupby("benchmark", sort=False):
        n = int(group["size"].min())
        if (group["size"] != n).any():
            raise InputError(f"{bench}: problems have different sample counts; Pass@K needs the same n for all")
        row = {"benchmark": bench, "problems": len(group), "n": n, f"avg@{n}": 100 * group["sum"].mean() / n}
        ks_here = [k for k in (ks or default_ks(n)) if k <= n]
        for k in ks_here:
            row[f"pass@{k}"] = 100 * np.mean([pass_at_k(n, int(c), k) for c in group["sum"]])
        if "vote" in scores:
            problems = scores[scores["benchmark"] == bench].groupby("problem")
            for k in ks_here:
                row[f"maj@{k}"] = 100 * np.mean([majority_correct(g, k) for _, g in problems])
        rows.append(row)
    return pd.DataFrame(rows)


def pass_at_k_curve(scores: pd.DataFrame) -> pd.DataFrame:
    """Long table [benchmark, k, pass_at_k (percent)] for K = 1..n, for the Fig. 6 plot."""
    table = summarize(scores.drop(columns="vote", errors="ignore"),
                      ks=range(1, int(scores.groupby(["benchmark", "problem"]).size().max()) + 1))
    long = table.melt(id_vars=["benchmark"], value_vars=[c for c in table if c.startswith("pass@")],
                      var_name="k", value_name="pass_at_k").dropna()
    long["k"] = long["k"].str.removeprefix("pass@").astype(int)
    return long


def sample_completions(model, tokenizer, prompts: Sequence[Prompt], n: int, max_new_tokens: int = 512,
                       temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 8,
                       seed: int = 0) -> list[list[str]]:
    """n sampled completions per prompt (text or chat messages), as text; sampling is `internal_policy.generate`."""
    records = [{"id": str(i), "prompt": p} for i, p in enumerate(prompts)]
    responses = generate(model, tokenizer, records, Sampling(n, temperature, top_p, max_new_tokens, seed),
                         batch_size=batch_size, progress=False)
    texts: list[list[str]] = [[] for _ in prompts]
    for response in responses:
        texts[int(response["prompt_id"])].append(response["response"])
    return texts


def score_completions(benchmark: str, answers: Sequence[str], completions: Sequence[Sequence[str]],
                      checker: Callable[[str, str], bool] = check_answer) -> pd.DataFrame:
    """Per-sample scores [benchmark, problem, sample, correct, vote] of completions against gold answers."""
    return pd.DataFrame([
        {"benchmark": benchmark, "problem": i, "sample": j, "correct": bool(checker(text, gold)),
         "vote": vote_key(text)}
        for i, (gold, texts) in enumerate(zip(answers, completions, strict=True)) for j, text in enumerate(texts)
    ], columns=["benchmark", "problem", "sample", "correct", "vote"])


def evaluate(model, tokenizer, prompt_sets: dict[str, pd.DataFrame], n: int, limit: int | None = None,
             scorer: str = "math-verify", **sampling) -> pd.DataFrame:
    """Sample n completions per problem of each prompt set and score them with `scorer`; per-sample scores.

    `limit` keeps the first that many problems of each set (None: all). Sets without gold answers are refused.
    """
    if n < 1 or (limit is not None and limit < 1):
        raise InputError(f"evaluation needs n >= 1 samples and limit >= 1 problems (or no limit), got n={n}, "
                         f"limit={limit}")
    if scorer not in SCORERS:
        raise InputError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
    for name, frame in prompt_sets.items():
        require_answers(frame, name)
    parts = []
    for name, frame in prompt_sets.items():
        frame = frame.head(limit) if limit else frame
        completions = sample_completions(model, tokenizer, list(frame["prompt"]), n, **sampling)
        parts.append(score_completions(name, list(frame["answer"]), completions, SCORERS[scorer]))
    return pd.concat(parts, ignore_index=True)

