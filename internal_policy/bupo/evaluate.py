"""Avg@K and unbiased Pass@K (paper §4, Fig. 6) with the boxed-answer checker.

Pass@K for a problem with n samples of which c are correct is 1 − C(n−c, K)/C(n, K) (Chen et al.
2021), the probability that K samples drawn without replacement contain a correct one; Avg@n is the
mean accuracy over the n samples. Sampling goes through `internal_policy.generate` (temperature 1,
top_p 1 as in the paper; HF `generate`); for large n on big models sample with vLLM
(`generate(..., engine="vllm")`) and score with `score_completions`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from ..data import Prompt
from ..errors import InputError
from ..generate import Sampling, generate
from .rewards import check_answer


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


def summarize(scores: pd.DataFrame, ks: Sequence[int] | None = None) -> pd.DataFrame:
    """Per benchmark: n, Avg@n and Pass@K (percent) from per-sample scores [benchmark, problem, sample, correct]."""
    counts = scores.groupby(["benchmark", "problem"])["correct"].agg(["size", "sum"]).reset_index()
    rows = []
    for bench, group in counts.groupby("benchmark", sort=False):
        n = int(group["size"].min())
        if (group["size"] != n).any():
            raise InputError(f"{bench}: problems have different sample counts; Pass@K needs the same n for all")
        row = {"benchmark": bench, "problems": len(group), "n": n, f"avg@{n}": 100 * group["sum"].mean() / n}
        for k in ks or default_ks(n):
            if k <= n:
                row[f"pass@{k}"] = 100 * np.mean([pass_at_k(n, int(c), k) for c in group["sum"]])
        rows.append(row)
    return pd.DataFrame(rows)


def pass_at_k_curve(scores: pd.DataFrame) -> pd.DataFrame:
    """Long table [benchmark, k, pass_at_k (percent)] for K = 1..n, for the Fig. 6 plot."""
    table = summarize(scores, ks=range(1, int(scores.groupby(["benchmark", "problem"]).size().max()) + 1))
    long = table.melt(id_vars=["benchmark"], value_vars=[c for c in table if c.startswith("pass@")],
                      var_name="k", value_name="pass_at_k").dropna()
    long["k"] = long["k"].str.removeprefix("pass@").astype(int)
    return long


def sample_completions(model, tokenizer, prompts: Sequence[Prompt], n: int, max_new_tokens: int = 512,
                       temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 8, seed: int = 0) -> list[list[str]]:
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
    """Per-sample correctness [benchmark, problem, sample, correct] of completions against gold answers."""
    return pd.DataFrame([
        {"benchmark": benchmark, "problem": i, "sample": j, "correct": bool(checker(text, gold))}
        for i, (gold, texts) in enumerate(zip(answers, completions, strict=True)) for j, text in enumerate(texts)
    ])


def evaluate(model, tokenizer, prompt_sets: dict[str, pd.DataFrame], n: int, limit: int | None = None,
             **sampling) -> pd.DataFrame:
    """Sample n completions per problem of each prompt set and score them; returns per-sample scores."""
    parts = []
    for name, frame in prompt_sets.items():
        frame = frame.head(limit) if limit else frame
        completions = sample_completions(model, tokenizer, list(frame["prompt"]), n, **sampling)
        parts.append(score_completions(name, list(frame["answer"]), completions))
    return pd.concat(parts, ignore_index=True)

