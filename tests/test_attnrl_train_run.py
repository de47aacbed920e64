"""`internal-policy train --branching ...` end to end, and a killed off-policy branching run that resumes to the
same numbers as an uninterrupted one (pending trees and the adaptive running mean live in the checkpoints)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from helpers_bupo import PROMPTS, KillAt, Killed, easy_or_parity_reward

from internal_policy.cli import main
from internal_policy.errors import InputError
from internal_policy.models import load_model

SMALL = ["--max-steps", "2", "--per-device-train-batch-size", "4", "--num-generations", "4",
         "--max-completion-length", "16", "--logging-steps", "1", "--disable-tqdm", "true"]
BRANCHING = ["--branching", "attn", "--branch-step-sep", ".", "--branch-min-distance", "2", "--fci-delta", "2",
             "--adaptive-sampling", "--method", "grpo"]


def test_train_with_branching_writes_its_table_and_scalars_and_guards_resume(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Once upon a time", "answer": ""}\n{"prompt": "The dog", "answer": ""}\n')
    out = tmp_path / "run"
    argv = ["train", "--data", str(prompts), "--out", str(out), "--reward", "word:the", "--save-steps", "2",
            *SMALL, *BRANCHING]
    assert main(argv) == 0, capsys.readouterr().err
    from internal_policy.attnrl.trainer import BRANCH_COLUMNS

    table = pd.read_csv(out / "branching.csv")
    assert list(table.columns) == list(BRANCH_COLUMNS) and list(table["step"]) == [1, 2]
    assert (table["generated_tokens_total"] == table["generated_tokens"].cumsum()).all()
    settings = json.loads((out / "train.json").read_text())
    assert (settings["branching"], settings["adaptive_sampling"], settings["branch_step_sep"]) == ("attn", True, ["."])
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert [h["attnrl/questions"] for h in logged] == list(table["questions"].astype(float))
    for key in ("attnrl/branch_points", "attnrl/rows_added", "attnrl/zero_std_before", "attnrl/generated_tokens"):
        assert key in logged[0], key
    assert (out / "checkpoint-2" / "attnrl_state-0.pt").is_file()
    capsys.readouterr()
    assert main([*argv[:-len(BRANCHING)], *BRANCHING[:-2], "--method", "grpo", "--branching", "random",
                 "--resume"]) == 2
    assert "resume would change the run's numbers (branching: 'attn' -> 'random')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = capsys.readouterr().out
    for flag in ("--branching", "--branch-points", "--branch-samples", "--fci-delta", "--fci-quantile",
                 "--branch-min-distance", "--adaptive-sampling", "--zero-std-filter", "--off-policy-branching"):
        assert flag in shown, flag


@pytest.mark.parametrize("args, message", [
    (["--method", "grpo", "--branching", "attn", "--fci-quantile", "0"], r"fci_quantile must be in (0, 1]"),
    (["--method", "grpo", "--off-policy-branching"], "need branching attn, random or entropy"),
    (["--branching", "random", "--off-policy-branching", "--internal-layer", "2"], "on-policy branching"),
])
def test_bad_branching_options_are_one_line_errors(tmp_path, capsys, args, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Once upon a time", "answer": ""}\n')
    code = main(["train", "--data", str(prompts), "--out", str(tmp_path / "o"), "--reward", "word:the", *SMALL,
                 *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert line.startswith("internal-policy train: error:") and message in line


def _run(model_dir, out, *, kill_at=None, resume=False):
    from internal_policy.attnrl.config import AttnRLConfig
    from internal_policy.bupo.run import train

    model, tok = load_model(model_dir)
    config = AttnRLConfig(output_dir=str(out), method="grpo", per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=10, max_steps=4, use_cpu=True, bf16=False, report_to="none",
                          save_strategy="steps", save_steps=2, logging_steps=1, learning_rate=2e-2, seed=0,
                          disable_tqdm=True, branching="random", adaptive_sampling=True, off_policy_branching=True,
                          branch_step_sep=["e"], branch_min_distance=0, fci_delta=2)
    frame = pd.DataFrame({"prompt": PROMPTS, "answer": ["1", "2", "3", "4"]})
    try:
        train(model, tok, frame, easy_or_parity_reward, config, resume=resume, save_model=False,
              callbacks=[KillAt(kill_at, "on_step_end")] if kill_at else [])
    except Killed:
        return None
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_killed_off_policy_branching_run_resumes_to_the_same_numbers(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    whole = _run(model_dir, tmp_path / "whole")
    out = tmp_path / "killed"
    assert _run(model_dir, out, kill_at=3) is None  # after checkpoint-2, whose pending trees train at step 3
    assert len(pd.read_csv(out / "branching.csv")) == 3
    saved = json.loads((out / "train.json").read_text())
    for key in ("branching", "zero_std_filter", "branch_samples"):  # as if written before these options existed
        del saved[key]
    (out / "train.json").write_text(json.dumps(saved))
    with pytest.raises(InputError, match="branching: None -> 'random'"):  # not the default: it would change the run
        _run(model_dir, out, resume=True)
    (out / "train.json").write_text(json.dumps({**saved, "branching": "random"}))  # the others are at their defaults
    resumed = _run(model_dir, out, resume=True)
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
    expected = pd.read_csv(tmp_path / "whole" / "branching.csv")
    pd.testing.assert_frame_equal(pd.read_csv(out / "branching.csv"), expected)
    assert expected["train_rows"].iloc[0] == 0 and expected["train_rows"].iloc[-1] > 0  # off-policy: none at first
    assert expected["running_fci"].notna().any()  # the adaptive running mean was in use
