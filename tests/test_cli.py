"""The `internal-policy profile` command: outputs on the embedded model and clear errors on bad input."""

import json
import re
import shutil

import pandas as pd
import pytest
import torch

from internal_policy.cli import main
from internal_policy.models import default_model_path


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
    assert meta["n_records"] == 10
    assert meta["n_tokens"] == summary["n_tokens"].iloc[0] == tokens.query("layer == 0").shape[0]
    assert meta["status"] == "complete" and meta["final_norm"] is False
    assert str(out / "summary.csv") in capsys.readouterr().out


@pytest.mark.parametrize(
    "lines, args, message",
    [
        (None, [], "does not exist"),
        ([{"text": "A cat."}, "{not json", {"text": "B"}], [], r":2: not valid JSON"),
        ([{"text": "A cat."}, {"text": "  "}], [], r"record 1 \(line 2\): 'text' is empty"),
        ([{"prompt": "A cat", "response": ""}], [], r"record 0 \(line 1\): the response is empty"),
        ([{"question": "x"}], [],
         r"line 1: no 'text', 'prompt', 'messages' or 'prompt_ids' field \(fields: \['question'\]\)"),
        ([{"prompt": "A cat"}], [], "has a prompt but no response; pass --generate"),
        ([{"text": "A cat."}], ["--generate", "--max-new-tokens", "0"], "max_new_tokens >= 1"),
        ([{"text": "A cat."}], ["--generate"], r"record 0 \(line 1\): needs a prompt \('prompt' or 'messages'\)"),
        ([{"text": "The cat sat. " * 200}], [], "longer than the model's context of 512.*--truncate"),
        ([{"text": "A cat."}], ["--components", "attn,mlp"], r"unknown component\(s\) \['mlp'\]"),
        ([{"text": "A cat."}], ["--dtype", "float8"], "unknown dtype 'float8'"),
        ([{"id": "x", "text": "A cat."}, {"id": "x", "text": "B"}], [], "appears twice"),
        ([{"prompt_ids": [1, 403], "response_ids": []}], [], "all 1 records are generated responses that are empty"),
        ([{"text": 123}], [], r"record 0 \(line 1\): 'text' must be a string, got int 123"),
        ([{"prompt_ids": [1, 403], "response_ids": [261, 512]}], [],
         "record 0: token id 512 is outside the model's vocabulary of 512"),
        ([{"text": "A cat."}], ["--components", ""], r"--components: expected a non-empty comma-separated list"),
        ([{"text": "A cat."}], ["--components", "layer, mlp"], r"unknown component\(s\) \['mlp'\]"),
        ([{"text": "A cat."}], ["--device", "bogus"], "unknown device 'bogus'; use cpu, cuda, cuda:N or mps"),
        pytest.param([{"text": "A cat."}], ["--device", "cuda"], "device 'cuda' is not available",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
        pytest.param([{"text": "A cat."}], ["--device", "cuda:1"], "device 'cuda:1' is not available",
                     marks=pytest.mark.skipif(torch.cuda.device_count() > 1, reason="two GPUs are present")),
        pytest.param([{"text": "A cat."}], ["--device", "mps"], "device 'mps' is not available",
                     marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="an Apple GPU is present")),
        ([{"text": "A cat."}], ["--model", "no/such/model"], "model folder no/such/model does not exist"),
        ([{"text": "A cat."}], ["--model", "models/tiny"], "there is no folder models/tiny here, and the hub is off "
                                                          r"\(HF_HUB_OFFLINE is set\)"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, capsys, lines, args, message):
    source = tmp_path / "in.jsonl" if lines is None else _jsonl(tmp_path / "in.jsonl", lines)
    code = main(["profile", "--input", str(source), "--out", str(tmp_path / "run"), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and err.startswith("internal-policy profile: error: ")
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "run" / "run.json").exists()  # refused before the run started


def _one_line_error(capsys, argv, message):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"internal-policy {argv[0]}: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err and re.search(message, err), err


def test_non_utf8_jsonl_names_line_and_byte(tmp_path, capsys):
    source = tmp_path / "latin1.jsonl"
    source.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    _one_line_error(capsys, ["profile", "--input", str(source), "--out", str(tmp_path / "run")],
                    r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at byte 14 of the line\); save the file as UTF-8")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_weights_give_one_line(tmp_path, capsys, damage):
    folder = tmp_path / "model"
    shutil.copytree(default_model_path(), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096] if damage == "truncate" else b"not safetensors")
    _one_line_error(capsys, ["profile", "--model", str(folder), "--out", str(tmp_path / "run")],
                    r"a weights file \(\*.safetensors\) is damaged or truncated .*copy or download it again")


@pytest.mark.parametrize("command", [
    ["evaluate", "--data", "math500", "--limit", "1", "-n", "1"],
    ["train", "--data", "math500", "--max-steps", "1", "--internal-layer", "2"],
])
def test_dtype_and_device_errors_in_other_commands(tmp_path, capsys, command):
    argv = [*command, "--out", str(tmp_path / "out")]
    _one_line_error(capsys, [*argv, "--dtype", "nonsense"], "unknown dtype 'nonsense'; use one of: auto, float32")
    if command[0] == "evaluate":  # fails before sampling, not when writing the scores
        (tmp_path / "afile").write_text("")
        _one_line_error(capsys, [*command, "--out", str(tmp_path / "afile")], "is an existing file; give a folder")
    if not torch.cuda.is_available():
        _one_line_error(capsys, [*argv, "--device", "cuda"], "device 'cuda' is not available")
        _one_line_error(capsys, [*argv, "--device", "bogus"], "unknown device 'bogus'")


def test_components_list_accepts_spaces(tmp_path):
    source = _jsonl(tmp_path / "in.jsonl", [{"text": "A cat sat on the mat."}])
    assert main(["profile", "--input", str(source), "--out", str(tmp_path / "run"), "--quiet",
                 "--components", " layer , ffn "]) == 0
    assert set(pd.read_csv(tmp_path / "run" / "summary.csv")["component"]) == {"layer", "ffn"}


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


def test_torchrun_two_ranks_equal_one_process(tmp_path):
    """The README's data-parallel command: generation is identical, the merged profile equal to float rounding."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    prompts = _jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in
                                            enumerate(["Once upon a time", "Tom had a red ball.", "The sun was"])])
    args = ["profile", "--input", str(prompts), "--generate", "-n", "3", "--max-new-tokens", "20", "--quiet",
            "--device", "cpu", "--batch-size", "2"]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(torchrun), "--nproc-per-node", "2", "-m", "internal_policy.cli", *args,
                           "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("records,") == 1  # only rank 0 reports
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one, two = tmp_path / "one", tmp_path / "two"
    assert (two / "responses.jsonl").read_text() == (one / "responses.jsonl").read_text()
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    a, b = pd.read_csv(one / "summary.csv"), pd.read_csv(two / "summary.csv")
    means = [c for c in a.columns if not c.endswith(("_sum", "_sumsq"))]
    pd.testing.assert_frame_equal(a[means], b[means], check_exact=False, atol=1e-6, rtol=0)


def _perturbed_copy(source, target):
    """A copy of a model folder whose weights differ slightly (same names, shapes and dtype)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = load_file(target / "model.safetensors")
    name = next(k for k in weights if k.endswith("embed_tokens.weight"))
    weights[name] = weights[name] + 1e-3 * torch.ones_like(weights[name])
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})


RESUME_CHANGES = {
    # name: (extra args of the first run, of the resumed run, what the error must name)
    "input": ([], ["--input", "{other}"], "records"),
    "edited_text": ([], ["--input", "{edited}"], "records"),
    "dtype": (["--dtype", "float32"], ["--dtype", "bfloat16"], "dtype"),
    "weights": (["--model", "{model}"], ["--model", "{model}", "--perturb"], "weights"),
    "no_tokens": (["--no-tokens"], [], "--no-tokens"),
    "stats": ([], ["--stats", "entropy,nll"], "--stats"),
    "chat_template": (["--input", "{chat}", "--chat-template", "{template}"],
                      ["--input", "{chat}", "--chat-template", "{template2}"], "chat template"),
}


@pytest.mark.parametrize("change", list(RESUME_CHANGES))
def test_resume_refuses_anything_that_changes_the_numbers(tmp_path, capsys, change):
    """Issue 14: the resume key covers the records' content, dtype, weights, --no-tokens, the statistics
    settings and the chat template; each change is refused with one clear line and nothing is merged."""
    from internal_policy.models import default_model_path

    first, second, what = RESUME_CHANGES[change]
    paths = {
        "other": _jsonl(tmp_path / "other.jsonl", [{"id": "a", "text": "A dog ran."}, {"id": "c", "text": "Hi."}]),
        "edited": _jsonl(tmp_path / "edited.jsonl",
                         [{"id": "a", "text": "A cat sat down."}, {"id": "b", "text": "Sun."}]),
        "chat": _jsonl(tmp_path / "chat.jsonl", [{"id": "q", "messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A cat."}]}]),
        "template": tmp_path / "t1.jinja", "template2": tmp_path / "t2.jinja", "model": tmp_path / "model",
    }
    paths["template"].write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    paths["template2"].write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    if change == "weights":
        import shutil

        shutil.copytree(default_model_path(), paths["model"])
    source = _jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "A cat sat."}, {"id": "b", "text": "Sun."}])
    run = tmp_path / "run"
    base = ["profile", "--input", str(source), "--out", str(run), "--quiet", "--components", "layer"]

    def args(extra):
        out = [a.format(**paths) for a in extra if a != "--perturb"]
        return base + out

    assert main(args(first)) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    if "--perturb" in second:
        import shutil

        shutil.rmtree(paths["model"])
        _perturbed_copy(default_model_path(), paths["model"])
    code = main(args(second) + ["--resume"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("internal-policy profile: error: cannot resume") and err.count("\n") == 1, err
    assert what in err, err
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing merged or rewritten


def test_components_without_layer_plot_skips_the_heatmap(tmp_path, capsys):
    """Issue 14: `profile --components ffn --plot` draws what it can (no heatmap without layer rows) and exits 0."""
    source = _jsonl(tmp_path / "in.jsonl", [{"text": "A cat sat on the mat."}])
    out = tmp_path / "run"
    code = main(["profile", "--input", str(source), "--out", str(out), "--quiet", "--components", "ffn", "--plot"])
    assert code == 0, capsys.readouterr().err
    assert not (out / "figures" / "heatmap.png").exists()


def test_choice_lists_and_shared_options_come_from_the_package_constants():
    import argparse
    import importlib

    from internal_policy.bupo.config import METHODS
    from internal_policy.bupo.rewards import SCORERS
    from internal_policy.cli import COMMANDS
    from internal_policy.cli.train import build_parser
    from internal_policy.generate import ENGINES
    from internal_policy.models import DTYPES
    from internal_policy.plot import KINDS

    sub = argparse.ArgumentParser().add_subparsers()
    for name in COMMANDS:
        importlib.import_module(f"internal_policy.cli.{name}").register(sub)
    option = {name: parser._option_string_actions for name, parser in sub.choices.items()}
    option["train"] = build_parser()._option_string_actions
    assert option["plot"]["--kind"].choices == (*KINDS, "all")
    assert tuple(option["train"]["--method"].choices) == METHODS
    assert option["evaluate"]["--scorer"].choices == tuple(SCORERS)
    for command in ("profile", "branch-points"):
        assert option[command]["--engine"].choices == ENGINES
    for command in ("profile", "branch-points", "evaluate", "train"):
        assert option[command]["--dtype"].default == "auto"
        assert option[command]["--dtype"].help.startswith(", ".join(DTYPES) + "; auto: ")
        assert option[command]["--model"].help == option["profile"]["--model"].help
    for command in ("profile", "branch-points"):
        assert "checkpoint's own dtype" in option[command]["--dtype"].help


def test_profile_dtype_auto_keeps_the_checkpoints_dtype(tmp_path, capsys):
    from internal_policy.models import load_model

    model, tokenizer = load_model()
    folder = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    records = _jsonl(tmp_path / "in.jsonl", [{"text": "A cat sat on the mat."}])
    for dtype, expected in (("auto", "bfloat16"), ("float32", "float32")):
        out = tmp_path / dtype
        assert main(["profile", "--model", str(folder), "--input", str(records), "--out", str(out), "--quiet",
                     "--dtype", dtype, "--no-tokens", "--components", "layer"]) == 0
        assert json.loads((out / "run.json").read_text())["dtype"] == expected
