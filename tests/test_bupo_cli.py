"""`internal-policy train` and `internal-policy evaluate` end to end on the embedded model."""

from __future__ import annotations

import json

import pandas as pd

from internal_policy.cli import main


def test_train_writes_phase_log_tracking_and_figures(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Once upon a time", "answer": ""}\n{"prompt": "The dog", "answer": ""}\n')
    probe = tmp_path / "probe.jsonl"
    probe.write_text('{"text": "The little girl was happy because she found her red ball."}\n')
    out = tmp_path / "run"
    code = main(["train", "--data", str(prompts), "--out", str(out), "--reward", "length:3-30", "--probe", str(probe),
                 "--internal-layer", "2", "--internal-steps", "1", "--max-steps", "2", "--batch-size", "4",
                 "--num-generations", "4", "--max-completion-length", "8", "--logging-steps", "1",
                 "--dtype", "float32", "--cpu"])
    assert code == 0
    log = [json.loads(line) for line in (out / "phase_log.jsonl").read_text().splitlines()]
    assert [(e["step"], e["policy"]) for e in log if e["role"] == "old"] == [(1, "pi^2"), (2, "pi_theta")]
    table = pd.read_parquet(out / "tracking.parquet")
    assert sorted(table.loc[table.metric == "actor_entropy", "step"]) == [0, 1, 2]
    assert (out / "fig5_internal_layer.png").stat().st_size > 0 and (out / "model" / "config.json").is_file()


def test_bad_reward_is_a_one_line_error(tmp_path, capsys):
    code = main(["train", "--data", "math500", "--out", str(tmp_path), "--reward", "bogus", "--cpu"])
    assert code == 2
    assert "unknown reward 'bogus'" in capsys.readouterr().err


def test_evaluate_writes_table(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text('{"prompt": "Once upon a time", "answer": "1"}\n')
    code = main(["evaluate", "--data", str(data), "-n", "4", "--max-new-tokens", "4", "--out", str(tmp_path / "ev")])
    assert code == 0
    table = pd.read_csv(tmp_path / "ev" / "table.csv")
    assert list(table.columns) == ["benchmark", "problems", "n", "avg@4", "pass@1", "pass@2", "pass@4"]
    assert table.loc[0, "n"] == 4 and (tmp_path / "ev" / "pass_at_k.png").is_file()
