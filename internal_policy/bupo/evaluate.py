"""Avg@K and unbiased Pass@K (paper §4, Fig. 6) with the boxed-answer checker.

Pass@K for a problem with n samples of which c are correct is 1 − C(n−c, K)/C(n, K) (Chen et al.
2021), the probability that K samples drawn without replacement contain a correct one; Avg@n is the
mean accuracy over the n samples. Sampling uses HF `generate` (temperature 1, top_p 1 as in the
paper); for large n on big models generate with vLLM and score with `score_completions`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import InputError
from ..models import pad_token_id
from .data import prompt_text
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


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: Sequence[str], n: int, max_new_tokens: int = 512,
                       temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 8, seed: int = 0) -> list[list[str]]:
    """n sampled completions per prompt (left-padded batches, HF generate)."""
    torch.manual_seed(seed)
    pad = pad_token_id(tokenizer)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = pad
    device = next(model.parameters()).device
    out: list[list[str]] = []
    for prompt in prompts:
        texts: list[str] = []
        while len(texts) < n:
            m = min(batch_size, n - len(texts))
            enc = tokenizer([prompt] * m, return_tensors="pt", padding=True).to(device)
            gen = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad)
            texts += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out.append(texts)
    return out


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
        prompts = [prompt_text(p, tokenizer) for p in frame["prompt"]]
        completions = sample_completions(model, tokenizer, prompts, n, **sampling)
        parts.append(score_completions(name, list(frame["answer"]), completions))
    return pd.concat(parts, ignore_index=True)

