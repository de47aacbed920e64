"""Sample responses from the model itself, saved so a profile can be recomputed without sampling again.

`generate` takes prompt records (`prompt` text or chat messages, or `messages`; a final assistant
message is dropped) and samples `n` responses per prompt with HF `generate` (default) or vLLM
(`engine="vllm"`, or `"auto"` when vLLM is installed and a GPU is present). Every response
record holds the prompt, the response text and the exact token ids (`prompt_ids`,
`response_ids`), so profiling it reads the same tokens that were sampled; text is never re-tokenised.

The response ids stop before the end-of-sequence / end-of-turn token (`finished` says whether the
model emitted one), as the token-position convention counts no special token as a response token.

Work is split into batches of rows (prompt, sample), longest prompts first; each batch has its own seed
(`seed + batch index`) and is written atomically to `generation/batch-NNNNNN.jsonl` as soon as it
is done, so an interrupted run resumes with identical samples and loses nothing finished. Under
torch.distributed each rank takes every world_size-th batch. `responses.jsonl` holds all responses
in input order (prompt by prompt, sample by sample).

Responses carry their prompt record's scalar fields (`data.record_fields`, e.g. a MATH `level`), and
where the prompt has a gold answer (`answer`, `reward_model.ground_truth`, `final_answer` or a
`solution`'s last box: `bupo.data.gold_answer`) also `answer` and `correct` (1 when the response's
last `\\boxed{}` matches it by the chosen checker, `bupo.rewards.SCORERS`; else 0). A response to a
prompt without a gold answer has no `correct` at all, never a silent 0. Scoring happens when the
responses are assembled, so a resumed generation scores its earlier batches the same way.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .bupo.data import gold_answer
from .bupo.rewards import SCORERS
from .data import prompt_ids, prompt_of, record_fields, record_id
from .dist import barrier, rank_world
from .errors import InputError
from .models import context_length, pad_token_id
from .runs import GENERATION_SETTINGS, RESPONSES, RunDir, write_jsonl

ENGINES = ("auto", "hf", "vllm")


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; the paper samples with temperature 1.0, top_p 1.0 and no top-k."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0

    def check(self) -> None:
        """Refuse settings that cannot sample (no samples or tokens, temperature <= 0, top_p outside (0, 1])."""
        if self.n < 1 or self.max_new_tokens < 1:
            raise InputError(f"need n >= 1 samples and max_new_tokens >= 1, got n={self.n}, "
                             f"max_new_tokens={self.max_new_tokens}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise InputError(f"need temperature > 0 and 0 < top_p <= 1, got temperature={self.temperature}, "
                             f"top_p={self.top_p}")


def pick_engine(engine: str) -> str:
    """Resolve `auto`: vLLM when it is importable, a GPU is present and this is a single process;
    HF generate otherwise."""
    if engine not in ENGINES:
        raise InputError(f"unknown generation engine {engine!r}; choose from {', '.join(ENGINES)}")
    if engine == "auto":
        single = int(os.environ.get("WORLD_SIZE", "1")) <= 1
        return "vllm" if single and importlib.util.find_spec("vllm") and torch.cuda.is_available() else "hf"
    if engine == "vllm" and not importlib.util.find_spec("vllm"):
        raise InputError("engine 'vllm' needs vLLM: pip install 'internal-policy[vllm]' (GPU only), or use --engine hf")
    return engine


def _eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def _cut(ids: Sequence[int], eos: set[int]) -> tuple[list[int], bool]:
    """Response ids up to (not including) the first end-of-sequence token; whether one was emitted."""
    for i, token in enumerate(ids):
        if token in eos:
            return list(ids[:i]), True
    return list(ids), False


class _HFSampler:
    """Left-padded batches through `model.generate` (full distribution: top_k=0)."""

    def __init__(self, model, tokenizer, sampling: Sampling):
        self.model, self.sampling, self.pad = model, sampling, pad_token_id(tokenizer)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        torch.manual_seed(seed)
        s = self.sampling
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=True,
                                  temperature=s.temperature, top_p=s.top_p, top_k=0,
                                  max_new_tokens=s.max_new_tokens, pad_token_id=self.pad)
        return out[:, width:].tolist()


class _VLLMSampler:
    """vLLM (GPU): loads the model from its path; leaves GPU memory for the HF model that profiles next.

    Each row gets its own seed (derived from the batch seed and its row), so the n samples of a
    prompt differ and a resumed batch repeats exactly.
    """

    def __init__(self, model_path: str, sampling: Sampling, dtype: str = "auto"):
        from vllm import LLM

        self.sampling = sampling
        self.llm = LLM(model=model_path, dtype=dtype, seed=sampling.seed, gpu_memory_utilization=0.6)

    def __call__(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s = self.sampling
        params = [SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                                 seed=seed * 100_003 + row) for row in range(len(prompts))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def close(self) -> None:
        del self.llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def generate(
    model,
    tokenizer,
    records: Sequence[Mapping],
    sampling: Sampling = Sampling(),
    *,
    batch_size: int = 8,
    chat: Mapping | None = None,
    engine: str = "hf",
    model_path: str | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    scorer: str = "math-verify",
) -> list[dict]:
    """Sample `sampling.n` responses per prompt record; with `out_dir`, save them (resumable, see module doc).

    Returns response records `{id, prompt_id, sample, prompt, response, prompt_ids, response_ids,
    finished}` plus the prompt's scalar fields and, for prompts with a gold answer, `answer` and
    `correct` (`scorer`: a `bupo.rewards.SCORERS` name), in input order, ready for `profile`.
    `model_path` is needed by vLLM only.
    """
    sampling.check()
    if scorer not in SCORERS:
        raise InputError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    engine = pick_engine(engine)
    prompts = _prompts(records, tokenizer, chat, context_length(model), sampling.max_new_tokens)
    # longest prompts first so batches pad little; the order is fixed by the inputs, so batches repeat on resume
    order = sorted(range(len(prompts)), key=lambda p: -len(prompts[p][2]))
    rows = [(p, k) for p in order for k in range(sampling.n)]
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    run = RunDir(out_dir) if out_dir is not None else None
    digest = hashlib.sha1(json.dumps([p[2] for p in prompts]).encode()).hexdigest()[:16]
    settings = {**asdict(sampling), "batch_size": batch_size, "chat": dict(chat or {}), "engine": engine,
                "n_prompts": len(prompts), "prompt_ids_sha1": digest}
    rank, world = rank_world()
    if engine == "vllm" and model_path is None:
        raise InputError("engine 'vllm' loads the model itself: pass model_path (the --model folder or name)")
    if engine == "vllm" and world > 1:
        raise InputError("vLLM is not run under torchrun (it manages its own GPUs): sample once in a single "
                         "process with --engine vllm, then profile OUT/responses.jsonl with torchrun; "
                         "or use --engine hf")
    try:
        if run is not None:
            run.start(settings, settings, resume, rank=rank, settings_file=GENERATION_SETTINGS)
        done = run.finished_batches() if run is not None else {}
        mine = [b for b in range(len(batches)) if b not in done and b % world == rank]
        _sample(model, tokenizer, sampling, engine, model_path, prompts, batches, mine, done, run, progress)
        if run is not None and world > 1:
            barrier()
            done = run.finished_batches()
        index_of = {p[0]: i for i, p in enumerate(prompts)}
        responses = score_responses(sorted((r for b in range(len(batches)) for r in done[b]),
                                           key=lambda r: (index_of[r["prompt_id"]], r["sample"])), records, scorer)
        if run is not None and rank == 0:
            write_jsonl(run.path / RESPONSES, responses)
        barrier()
    finally:
        if run is not None:
            run.release()
    return responses


def score_responses(responses: Sequence[Mapping], records: Sequence[Mapping],
                    scorer: str = "math-verify") -> list[dict]:
    """Responses with their prompt record's scalar fields and, where that record has a gold answer, `answer` and
    `correct` (int 0/1 by the `scorer` checker on the response text); see the module docstring."""
    check = SCORERS[scorer]
    extra = {}
    for index, record in enumerate(records):
        fields = {k: v for k, v in record_fields(record).items() if k not in ("answer", "correct")}
        gold = gold_answer(record)  # a blank `answer` field is no answer: it is not copied either
        extra[record_id(record, index)] = fields if gold is None else {**fields, "answer": gold}
    scored = []
    for response in responses:
        fields = extra[response["prompt_id"]]
        out = {**response, **{k: v for k, v in fields.items() if k not in response}}
        if "answer" in fields:
            out["correct"] = int(check(response["response"], fields["answer"]))
        scored.append(out)
    return scored


def _sample(model, tokenizer, sampling: Sampling, engine: str, model_path: str | None, prompts: list, batches: list,
            mine: list[int], done: dict[int, list[dict]], run: RunDir | None, progress: bool) -> None:
    """Sample this rank's pending batches into `done`, writing each one atomically into the run folder."""
    eos = _eos_ids(model, tokenizer)
    sampler = _VLLMSampler(model_path, sampling) if engine == "vllm" else _HFSampler(model, tokenizer, sampling)
    bar = tqdm(total=sum(len(batches[b]) for b in mine), unit="resp", desc="generate", disable=not progress)
    try:
        for b in mine:
            outputs = sampler([prompts[p][2] for p, _ in batches[b]], sampling.seed + b)
            done[b] = [_response(prompts[p], k, ids, eos, tokenizer)
                       for (p, k), ids in zip(batches[b], outputs, strict=True)]
            if run is not None:
                run.write_batch(b, done[b])
            bar.update(len(batches[b]))
    finally:
        bar.close()
        if engine == "vllm":
            sampler.close()


def _prompts(records: Sequence[Mapping], tokenizer, chat: Mapping | None, context: int | None,
             max_new_tokens: int) -> list[tuple[str, object, list[int]]]:
    """(record id, prompt, prompt ids) of each record; fails early on a prompt that leaves no room to answer."""
    prompts = []
    for index, record in enumerate(records):
        prompt = prompt_of(record, index)
        ids = prompt_ids(prompt, tokenizer, chat)
        if context is not None and len(ids) + max_new_tokens > context:
            raise InputError(f"record {record_id(record, index)}: a {len(ids)}-token prompt plus max_new_tokens="
                             f"{max_new_tokens} exceeds the model's context of {context}; lower "
                             "--max-new-tokens or drop the long prompts")
        prompts.append((record_id(record, index), prompt, ids))
    return prompts


def _response(prompt: tuple, sample: int, ids: list[int], eos: set[int], tokenizer) -> dict:
    record_id, messages_or_text, p_ids = prompt
    r_ids, finished = _cut(ids, eos)
    return {"id": f"{record_id}/{sample}", "prompt_id": record_id, "sample": sample, "prompt": messages_or_text,
            "response": tokenizer.decode(r_ids, skip_special_tokens=True), "prompt_ids": p_ids,
            "response_ids": r_ids, "finished": finished}
