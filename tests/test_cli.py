"""The `internal-policy profile` command: outputs on the embedded model and clear errors on bad input."""

import json
import re

import pandas as pd
import pytest

from internal_policy.cli import main


def _jsonl(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


def test_profile_default_run_writes_tables(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["profile", "--out", str(out), "--quiet", "--batch-size", "4"]) == 0
    summary = pd.read_csv(out / "summary.csv")
    for col in ("layer", "component", "entropy", "entropy_std", "delta", "n_tokens", "cos_resid"):
        assert col in summary
    assert summary["layer"].min() == 0 and summary["layer"].max() == 5
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert {"record_id", "position", "token_id", "token", "layer", "component", "entropy"} <= set(tokens)
    meta = json.loads((out / "run.json").read_text())
    assert meta["n_records"] == 10 and meta["n_tokens"] == summary["n_tokens"].iloc[0] == tokens.query("layer == 0").shape[0]
    assert meta["status"] == "complete" and meta["final_norm"] is False
    assert str(out / "summary.csv") in capsys.readouterr().out


@pytest.mark.parametrize(
    "lines, args, message",
    [
        (None, [], "does not exist"),
        ([{"text": "A cat."}, "{not json", {"text": "B"}], [], r":2: not valid JSON"),
        ([{"text": "A cat."}, {"text": "  "}], [], r"record 1 \(line 2\): 'text' is empty"),
        ([{"prompt": "A cat", "response": ""}], [], "response tokenises to nothing"),
        ([{"question": "x"}], [], "expected a 'text' field"),
        ([{"text": "The cat sat. " * 200}], [], "longer than the model's context of 512.*--truncate"),
        ([{"text": "A cat."}], ["--components", "attn,mlp"], r"unknown component\(s\) \['mlp'\]"),
        ([{"text": "A cat."}], ["--dtype", "float8"], "unknown dtype 'float8'"),
        ([{"id": "x", "text": "A cat."}, {"id": "x", "text": "B"}], [], "appears twice"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, capsys, lines, args, message):
    source = tmp_path / "in.jsonl" if lines is None else _jsonl(tmp_path / "in.jsonl", lines)
    code = main(["profile", "--input", str(source), "--out", str(tmp_path / "run"), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and err.startswith("internal-policy profile: error: ")
    assert err.count("\n") == 1 and re.search(message, err), err


def test_truncate_reports_cut_tokens(tmp_path, capsys):
    source = _jsonl(tmp_path / "in.jsonl", [{"text": "The cat sat. " * 200}])
    assert main(["profile", "--input", str(source), "--out", str(tmp_path / "run"), "--quiet", "--truncate"]) == 0
    out = capsys.readouterr().out
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["n_tokens"] == 512 and f"truncated {meta['truncated_tokens']} tokens" in out
    assert meta["truncated_tokens"] > 0


def test_existing_run_needs_resume(tmp_path, capsys):
    source = _jsonl(tmp_path / "in.jsonl", [{"text": "A cat sat on the mat."}])
    args = ["profile", "--input", str(source), "--out", str(tmp_path / "run"), "--quiet"]
    assert main(args) == 0
    assert main(args) == 2 and "--resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
