"""Training runs that survive hours: checkpoints and resume, the output folder's rules, validation during training."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from helpers_bupo import PROMPTS, KillAt, Killed, config, length_reward

from internal_policy.bupo.run import train
from internal_policy.errors import InputError
from internal_policy.models import load_model

PROBE = [{"text": "The little girl was happy because she found her red ball in the park."}]
FRAME = pd.DataFrame({"prompt": PROMPTS, "answer": ["1", "2", "3", "4"]})


def _run(model_dir, out, *, kill_at=None, resume=False, **overrides):
    model, tok = load_model(model_dir)
    settings = dict(internal_steps=3, max_steps=5, save_strategy="steps", save_steps=2, weight_decay=0.01,
                    learning_rate=1e-2, eval_strategy="steps", eval_steps=1, eval_on_start=True, num_generations_eval=2)
    cfg = config(out, **{**settings, **overrides})
    try:
        train(model, tok, FRAME, length_reward, cfg, probe=PROBE, resume=resume, save_model=False,
              eval_sets={"toy": FRAME.head(2)}, callbacks=[KillAt(kill_at)] if kill_at else [])
    except Killed:
        return None
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same_run(out, reference, params, whole) -> None:
    """Parameters, phase log and tracking table of `out` equal those of the uninterrupted run."""
    for name, value in whole.items():
        torch.testing.assert_close(params[name], value, rtol=0, atol=0, msg=name)
    read_log = lambda d: [json.loads(x) for x in (d / "phase_log.jsonl").read_text().splitlines()]  # noqa: E731
    assert read_log(out) == read_log(reference)
    read_table = lambda d: pd.read_parquet(d / "tracking.parquet").sort_values(  # noqa: E731
        ["step", "metric", "layer", "k"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(read_table(out), read_table(reference))
    pd.testing.assert_frame_equal(pd.read_csv(out / "validation.csv"), pd.read_csv(reference / "validation.csv"))


def test_killed_and_resumed_run_ends_equal_to_an_uninterrupted_one(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    whole = _run(model_dir, tmp_path / "whole")
    assert any(not torch.equal(whole[n], v) for n, v in load_model(model_dir)[0].named_parameters())
    out = tmp_path / "killed"
    assert _run(model_dir, out, kill_at=3) is None  # inside the internal phase (steps 1-3), after checkpoint-2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert list(pd.read_csv(out / "validation.csv")["step"]) == [0, 1, 2, 3]  # step 3: validated, not saved
    assert _run(model_dir, out, resume=True, kill_at=5) is None  # resumed at step 2, killed again in the π_θ phase
    _same_run(out, tmp_path / "whole", _run(model_dir, out, resume=True), whole)
    assert list(pd.read_csv(out / "validation.csv")["step"]) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(InputError, match="is complete"):
        _run(model_dir, out, resume=True)
    read_log = [json.loads(x) for x in (out / "phase_log.jsonl").read_text().splitlines()]
    assert [e["policy"] for e in read_log if e["role"] == "current"] == ["pi^1"] * 3 + ["pi_theta"] * 2


def test_output_folder_rules(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="files this tool did not write"):
        _run(model_dir, mine)
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    with pytest.raises(InputError, match="nothing to resume"):
        _run(model_dir, tmp_path / "none", resume=True)
    out = tmp_path / "run"
    assert _run(model_dir, out, kill_at=1) is None
    with pytest.raises(InputError, match="holds a training run"):
        _run(model_dir, out)
    with pytest.raises(InputError, match=r"learning_rate: 0.01 -> 0.02"):
        _run(model_dir, out, resume=True, learning_rate=2e-2)
    with pytest.raises(InputError, match="no checkpoint-N folder"):
        _run(model_dir, out, resume=True, logging_steps=2)  # logging may change; still no checkpoint


def test_validation_during_training_leaves_training_unchanged(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    plain = _run(model_dir, tmp_path / "plain", max_steps=2, save_strategy="no", eval_strategy="no",
                 eval_on_start=False)
    model, tok = load_model(model_dir)
    cfg = config(tmp_path / "val", internal_steps=3, max_steps=2, weight_decay=0.01, learning_rate=1e-2,
                 eval_strategy="steps", eval_steps=1, eval_on_start=True, num_generations_eval=2)
    result = train(model, tok, FRAME, length_reward, cfg, probe=PROBE, save_model=False,
                   eval_sets={"toy": FRAME.head(3)})
    for name, value in model.named_parameters():
        torch.testing.assert_close(value.detach(), plain[name], rtol=0, atol=0, msg=name)
    table = pd.read_csv(tmp_path / "val" / "validation.csv")
    assert list(table.columns) == ["step", "benchmark", "problems", "n", "avg@2", "pass@1", "pass@2", "maj@1", "maj@2"]
    assert list(table["step"]) == [0, 1, 2] and set(table["problems"]) == {3}
    evals = [h for h in result.trainer.state.log_history if "eval_toy/avg@2" in h]
    assert [h["step"] for h in evals] == [0, 1, 2]
    with pytest.raises(InputError, match="no gold answer"):
        train(model, tok, FRAME, length_reward, config(tmp_path / "x"), eval_sets={"bad": FRAME.assign(answer="")})
