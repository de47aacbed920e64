"""Response generation: the sampled tokens, their saved form, resumption, ranks, and profiling them."""

import json

import pandas as pd
import pytest
import torch

from internal_policy.cli import main
from internal_policy.cli.profile import chat_options, register
from internal_policy.errors import InputError
from internal_policy.generate import Sampling, _HFSampler, generate, pick_engine
from internal_policy.inputs import read_jsonl
from internal_policy.profile import load_run, profile

PROMPTS = [
    {"id": "p0", "prompt": "Once upon a time"},
    {"id": "p1", "prompt": "Tom had a red ball. One day, Tom went to the park with his mom and"},
    {"id": "p2", "messages": [{"role": "user", "content": "The sun"}]},  # no template: joined as text
]
SAMPLING = Sampling(n=2, max_new_tokens=24, seed=7)


def test_batch_of_one_is_plain_hf_sampling(stories):
    """One prompt, one sample, batch size 1: the same tokens as seeding and calling generate by hand."""
    model, tok = stories
    (response,) = generate(model, tok, PROMPTS[:1], Sampling(n=1, max_new_tokens=30, seed=11), batch_size=1,
                           progress=False)
    prompt = tok("Once upon a time", return_tensors="pt")["input_ids"]
    torch.manual_seed(11)  # batch 0 is seeded with seed + 0
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0, top_p=1.0,
                         temperature=1.0, max_new_tokens=30, pad_token_id=0)[0, prompt.shape[1]:].tolist()
    eos = tok.eos_token_id
    expected = out[: out.index(eos)] if eos in out else out
    assert response["prompt_ids"] == prompt[0].tolist() and response["response_ids"] == expected
    assert response["finished"] == (eos in out)
    assert response["response"] == tok.decode(expected, skip_special_tokens=True)


def test_pad_id_inside_a_prompt_is_attended(stories):
    """eos doubles as pad and sits inside a prompt (like <|eot_id|> between chat turns): left-padded batches
    must mask only the padding, so each greedy continuation equals an unpadded, unmasked generate call."""
    model, tok = stories
    prompts = [{"id": "turns", "prompt": "Lily had a red ball.</s>Tom said"},
               {"id": "long", "prompt": "Once upon a time, there was a little dog who liked to run in the park."}]
    greedy = Sampling(n=1, max_new_tokens=12, top_p=1e-9)  # top_p keeps only the most likely token
    responses = generate(model, tok, prompts, greedy, batch_size=2, progress=False)
    assert tok.eos_token_id in responses[0]["prompt_ids"][1:] and tok.pad_token is None
    for r in responses:
        ids = torch.tensor([r["prompt_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        assert r["response_ids"] == (out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out)
        assert len(r["response_ids"]) > 3


def test_responses_are_complete_and_in_input_order(stories):
    model, tok = stories
    responses = generate(model, tok, PROMPTS, SAMPLING, batch_size=3, progress=False)
    assert [r["id"] for r in responses] == ["p0/0", "p0/1", "p1/0", "p1/1", "p2/0", "p2/1"]
    eos = tok.eos_token_id
    for r in responses:
        assert eos not in r["response_ids"] and (r["finished"] or len(r["response_ids"]) == SAMPLING.max_new_tokens)
    assert responses[0]["response_ids"] != responses[1]["response_ids"]  # the two samples of a prompt differ
    assert responses[4]["prompt_ids"] == tok("The sun\n\n")["input_ids"]


def test_generated_then_profiled_equals_profiling_the_saved_responses(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    gen_args = ["--generate", "-n", "2", "--max-new-tokens", "24", "--seed", "3"]
    assert main(["profile", "--input", str(prompts), "--out", str(tmp_path / "gen"), "--quiet", *gen_args]) == 0
    saved = tmp_path / "gen" / "responses.jsonl"
    assert main(["profile", "--input", str(saved), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    gen, again = load_run(tmp_path / "gen"), load_run(tmp_path / "again")
    pd.testing.assert_frame_equal(gen.summary, again.summary)
    pd.testing.assert_frame_equal(gen.tokens, again.tokens)
    responses = read_jsonl(saved)
    kept = gen.tokens.query("layer == 0 and component == 'layer'")
    assert gen.meta["n_tokens"] == len(kept) == sum(len(r["response_ids"]) for r in responses)
    # the token at position t+1 of each kept position t is the sampled response, in order
    for r in responses:
        rows = kept[kept["record_id"] == r["id"]].sort_values("position")
        ids = r["prompt_ids"] + r["response_ids"]
        assert [ids[p + 1] for p in rows["position"]] == r["response_ids"]
    # a finished generation is reused on --resume, and refused without it
    assert main(["profile", "--input", str(prompts), "--out", str(tmp_path / "gen"), "--quiet", *gen_args]) == 2
    assert "--resume" in capsys.readouterr().err


def test_interrupted_generation_resumes_to_identical_samples(stories, tmp_path, monkeypatch):
    model, tok = stories
    whole = generate(model, tok, PROMPTS, SAMPLING, batch_size=2, out_dir=tmp_path / "whole", progress=False)
    calls = {"n": 0}
    real = _HFSampler.__call__

    def flaky(self, prompts, seed):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(self, prompts, seed)

    monkeypatch.setattr(_HFSampler, "__call__", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate(model, tok, PROMPTS, SAMPLING, batch_size=2, out_dir=tmp_path / "cut", progress=False)
    assert len(list((tmp_path / "cut" / "generation").glob("batch-*.jsonl"))) == 1
    assert not (tmp_path / "cut" / "responses.jsonl").exists()
    with pytest.raises(InputError, match="--resume"):
        generate(model, tok, PROMPTS, SAMPLING, batch_size=2, out_dir=tmp_path / "cut", progress=False)
    calls["n"] = 10
    resumed = generate(model, tok, PROMPTS, SAMPLING, batch_size=2, out_dir=tmp_path / "cut", resume=True,
                       progress=False)
    assert calls["n"] == 10 + 2  # only the two unfinished batches of three were sampled
    assert resumed == whole
    assert (tmp_path / "cut" / "responses.jsonl").read_text() == (tmp_path / "whole" / "responses.jsonl").read_text()
    with pytest.raises(InputError, match="settings differ"):
        generate(model, tok, PROMPTS, Sampling(n=2, max_new_tokens=24, seed=8), batch_size=2,
                 out_dir=tmp_path / "cut", resume=True, progress=False)


def _rank_main(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from internal_policy.models import load_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model, tok = load_model()
    generate(model, tok, PROMPTS, SAMPLING, batch_size=2, out_dir=out_dir, progress=False)
    dist.destroy_process_group()


def test_two_ranks_generate_the_same_responses_as_one(stories, tmp_path):
    import torch.multiprocessing as mp

    model, tok = stories
    generate(model, tok, PROMPTS, SAMPLING, batch_size=2, out_dir=tmp_path / "one", progress=False)
    mp.spawn(_rank_main, args=(2, str(tmp_path / "pg"), str(tmp_path / "two")), nprocs=2, join=True)
    assert (tmp_path / "two" / "responses.jsonl").read_text() == (tmp_path / "one" / "responses.jsonl").read_text()


def test_empty_generations_are_skipped_and_counted(stories):
    model, tok = stories
    records = [{"id": "a", "prompt_ids": [1, 403, 407], "response_ids": [261, 378]},
               {"id": "b", "prompt_ids": [1, 403], "response_ids": []}]
    result = profile(model, tok, records, progress=False)
    assert result.meta["n_records"] == 1 and result.meta["skipped_empty_responses"] == 1
    assert result.meta["n_tokens"] == 2


def test_bad_generation_requests_fail_early(stories):
    model, tok = stories
    with pytest.raises(InputError, match="exceeds the model's context of 512"):
        generate(model, tok, PROMPTS, Sampling(max_new_tokens=510), progress=False)
    with pytest.raises(InputError, match=r"record 0: needs a prompt \('prompt' or 'messages'\) to sample from"):
        generate(model, tok, [{"text": "a story"}], progress=False)
    with pytest.raises(InputError, match="temperature > 0"):
        generate(model, tok, PROMPTS, Sampling(temperature=0), progress=False)
    assert pick_engine("auto") == ("vllm" if _has_vllm_and_gpu() else "hf")
    if not _has_vllm_and_gpu():
        with pytest.raises(InputError, match="pip install"):
            pick_engine("vllm")


def _has_vllm_and_gpu() -> bool:
    import importlib.util

    return bool(importlib.util.find_spec("vllm")) and torch.cuda.is_available()


def test_chat_options_from_the_command_line():
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["profile", "--out", "x", "--thinking", "off", "--chat-option", "tools=null",
                              "--chat-option", "style=terse"])
    assert chat_options(args) == {"enable_thinking": False, "tools": None, "style": "terse"}
