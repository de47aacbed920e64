"""`internal-policy train` and `internal-policy evaluate` end to end on the embedded model, and their errors."""

from __future__ import annotations

import json
from importlib.util import find_spec

import pandas as pd
import pytest

from internal_policy.cli import main

SMALL = ["--max-steps", "2", "--per-device-train-batch-size", "4", "--num-generations", "4",
         "--max-completion-length", "8", "--logging-steps", "1", "--disable-tqdm", "true"]


@pytest.fixture
def files(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Once upon a time", "answer": ""}\n{"prompt": "The dog", "answer": ""}\n')
    probe = tmp_path / "probe.jsonl"
    probe.write_text('{"text": "The little girl was happy because she found her red ball."}\n')
    return prompts, probe


def test_train_with_defaults_on_cpu_writes_logs_tables_figures_and_resumes(files, tmp_path, capsys):
    prompts, probe = files
    out = tmp_path / "run"
    argv = ["train", "--data", str(prompts), "--out", str(out), "--reward", "length:3-30", "--probe", str(probe),
            "--internal-layer", "2", "--internal-steps", "1", "--save-steps", "2", *SMALL]  # no --dtype/--device
    assert main(argv) == 0
    log = [json.loads(line) for line in (out / "phase_log.jsonl").read_text().splitlines()]
    assert [(e["step"], e["policy"]) for e in log if e["role"] == "old"] == [(1, "pi^2"), (2, "pi_theta")]
    table = pd.read_parquet(out / "tracking.parquet")
    assert sorted(table.loc[table.metric == "actor_entropy", "step"]) == [0, 1, 2]
    for name in ("fig5_layer2.png", "fig5_layer2.pdf", "fig7_actor_entropy.png", "model/config.json", "train.json"):
        assert (out / name).stat().st_size > 0, name
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert [h["bupo/layer"] for h in state["log_history"] if "loss" in h] == [2.0, 5.0]
    assert "tracker/delta_k2" in state["log_history"][0]
    assert "method=bupo internal_layer=2" in capsys.readouterr().out
    assert main(argv + ["--resume"]) == 2  # the same settings are accepted; there is just nothing left to train
    assert "is complete (step 2 of max_steps 2)" in capsys.readouterr().err


def test_train_options_come_from_the_config_dataclasses_a_yaml_file_and_the_preset(tmp_path, capsys):
    from internal_policy.cli.train import parse

    yaml = tmp_path / "run.yaml"
    yaml.write_text("data: math500\nout: runs/x\nlearning_rate: 3.0e-6\ninternal_schedule: '2:10,4:10'\n"
                    "force_schedule: true\nlogging_steps: 7\n")
    options, cfg, ns = parse(["--config", str(yaml), "--logging-steps", "5"])
    assert (options.data, cfg.output_dir, cfg.learning_rate, cfg.internal_schedule, cfg.logging_steps) == (
        "math500", "runs/x", 3e-6, "2:10,4:10", 5)  # the command line wins over the file
    assert ns.dtype == "float32" and cfg.bf16 is False and cfg.use_cpu  # auto on a CPU-only machine
    _, official, _ = parse(["--data", "d", "--out", "o", "--preset", "official", "--internal-layer", "6",
                            "--max-completion-length", "64"])  # one process: the whole mini-batch on it
    assert (official.per_device_train_batch_size, official.steps_per_generation, official.internal_steps,
            official.max_steps, official.learning_rate, official.max_completion_length) == (256, 4, 30, 1200, 1e-6, 64)
    yaml.write_text("data: d\nout: o\nlearning_rat: 1\n")
    with pytest.raises(Exception, match="unknown option"):
        parse(["--config", str(yaml)])
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = capsys.readouterr().out
    for flag in ("--internal-schedule", "--resume", "--report-to", "--config", "--preset", "--eval-data", "--eval-n",
                 "--eval-steps", "--save-steps", "--model", "--dtype", "--device", "accelerate launch"):
        assert flag in shown, flag


@pytest.mark.parametrize("args, message", [
    (["--method", "grpo", "--internal-layer", "abc"], "internal_layer 'abc' must be a layer number"),
    (["--method", "grpo", "--probe", "PROBE"], "entropy tracking needs a layer"),
    (["--internal-layer", "2", "--reward", "math"], "no gold answer"),
    (["--internal-layer", "2", "--reward", "bogus"], "unknown reward 'bogus'"),
    (["--internal-layer", "2", "--internal-schedule", "2:1"], "leave internal_layer unset"),
    (["--internal-layer", "2", "--eval-data", "math500"], "--eval-data needs --eval-steps"),
    pytest.param(["--internal-layer", "2", "--report-to", "tensorboard"], "pip install tensorboard",
                 marks=pytest.mark.skipif(bool(find_spec("tensorboard") or find_spec("tensorboardX")),
                                          reason="tensorboard is installed")),
])
def test_train_errors_are_one_line(files, tmp_path, capsys, args, message):
    prompts, probe = files
    argv = ["train", "--data", str(prompts), "--out", str(tmp_path / "o"), "--reward", "length:1-9", *SMALL]
    code = main(argv + [str(probe) if a == "PROBE" else a for a in args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert line.startswith("internal-policy train: error:") and message in line


def test_evaluate_writes_table_with_maj_at_k(tmp_path, capsys):
    data = tmp_path / "q.jsonl"
    data.write_text('{"prompt": "Once upon a time", "answer": "1"}\n')
    code = main(["evaluate", "--data", str(data), "-n", "4", "--max-new-tokens", "4", "--scorer", "official",
                 "--out", str(tmp_path / "ev")])
    assert code == 0
    table = pd.read_csv(tmp_path / "ev" / "table.csv")
    assert list(table.columns) == ["benchmark", "problems", "n", "avg@4", "pass@1", "pass@2", "pass@4", "maj@1",
                                   "maj@2", "maj@4"]
    assert table.loc[0, "n"] == 4 and (tmp_path / "ev" / "pass_at_k.png").is_file()
    assert (tmp_path / "ev" / "pass_at_k.pdf").is_file()
    before = (tmp_path / "ev" / "table.csv").read_bytes()
    (tmp_path / "ev" / "scores.parquet").unlink()  # a folder holding any of evaluate's files is refused
    assert main(["evaluate", "--data", str(data), "--out", str(tmp_path / "ev")]) == 2
    assert "already holds table.csv, pass_at_k.png, pass_at_k.pdf; give a new folder" in capsys.readouterr().err
    assert (tmp_path / "ev" / "table.csv").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--limit", "0"], "--limit: must be at least 1"),
    (["-n", "0"], "--samples: must be at least 1"),
    (["--scorer", "sympy"], "invalid choice: 'sympy'"),
])
def test_evaluate_bad_arguments(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        main(["evaluate", "--data", "math500", "--out", str(tmp_path), *args])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_evaluate_refuses_a_set_without_answers(tmp_path, capsys):
    data = tmp_path / "q.jsonl"
    data.write_text('{"prompt": "Once upon a time"}\n{"prompt": "The dog", "answer": "2"}\n')
    assert main(["evaluate", "--data", str(data), "--out", str(tmp_path / "ev")]) == 2
    assert "q: 1 of 2 records have no gold answer (first: record 0)" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()
