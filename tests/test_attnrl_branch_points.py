"""`branch_points` / `internal-policy branch-points`: exact step rows, FCI equal to HF's own attention
probabilities, resuming, figures, and one-line errors on bad input."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from filelock import FileLock, Timeout

from internal_policy import branch_points
from internal_policy.attnrl import analysis
from internal_policy.attnrl.analysis import load_branch_points
from internal_policy.attnrl.fci import fci_from_attentions
from internal_policy.attnrl.select import select_attn
from internal_policy.attnrl.steps import Steps
from internal_policy.cli import main
from internal_policy.errors import InputError, RunBusyError

RECORDS = [
    {"id": "park", "prompt": "Once upon a time, there was a little girl.",
     "response": " She went to the park. She saw a dog. The dog was big. It ran to her. She was happy. They played."},
    {"id": "cake", "prompt": "Tom and his mom made a cake.",
     "response": " It was sweet. Tom ate it. Mom laughed. The sun was warm. They sang a song."},
    {"id": "bird", "prompt": "A bird sat on a tree.",
     "response": " It sang. A cat came. The bird flew away. The cat was sad. The end."},
]
SETTINGS = dict(delta=2, points=2, min_start=12, min_distance=3, separators=(".",), batch_size=2, progress=False)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_rows_are_exact_and_fci_equals_output_attentions(stories, tmp_path):
    model, tokenizer = stories
    result = branch_points(model, tokenizer, RECORDS, out_dir=tmp_path / "run", **SETTINGS)
    steps = result.steps
    assert list(steps.columns) == ["record_id", "step", "start", "end", "fci", "selected", "text"]
    assert steps["record_id"].unique().tolist() == ["park", "cake", "bird"]
    assert steps.equals(pd.read_parquet(tmp_path / "run" / "steps.parquet"))
    model.set_attn_implementation("eager")
    try:
        for record in RECORDS:
            rows = steps[steps["record_id"] == record["id"]]
            prompt = tokenizer(record["prompt"])["input_ids"]
            response = tokenizer(record["response"], add_special_tokens=False)["input_ids"]
            cuts = [i + 1 for i, t in enumerate(response) if "." in tokenizer.decode([t])]
            bounds = [0, len(prompt)] + [len(prompt) + c for c in cuts]
            bounds += [] if cuts[-1] == len(response) else [len(prompt) + len(response)]
            assert rows["start"].tolist() == bounds[:-1] and rows["end"].tolist() == bounds[1:]
            assert rows["step"].tolist() == list(range(len(bounds) - 1))
            assert rows["text"].iloc[0] == record["prompt"]
            with torch.no_grad():
                out = model(input_ids=torch.tensor([prompt + response]), output_attentions=True)
            sequence = Steps(tuple(zip(bounds[:-1], bounds[1:])))
            want = fci_from_attentions([a.double() for a in out.attentions], [sequence], 2).fci()[0]
            assert np.abs(rows["fci"].to_numpy() - want).max() <= 1e-5
            chosen = select_attn(want, sequence, 2, 0.8, 12, 3)
            assert rows.index[rows["selected"]].tolist() == rows.index[chosen].tolist()
    finally:
        model.set_attn_implementation("sdpa")
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["status"] == "complete" and meta["n_selected"] == 6 and meta["separators"] == ["."]


def test_interrupted_run_resumes_to_the_same_rows(stories, tmp_path, monkeypatch):
    model, tokenizer = stories
    settings = {**SETTINGS, "batch_size": 1}
    whole = branch_points(model, tokenizer, RECORDS, **settings).steps
    real, calls = analysis._batch_rows, []

    def dies_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(analysis, "_batch_rows", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        branch_points(model, tokenizer, RECORDS, out_dir=tmp_path / "run", **settings)
    monkeypatch.setattr(analysis, "_batch_rows", real)
    assert len(list((tmp_path / "run" / "shards").glob("*.parquet"))) == 1
    with pytest.raises(Exception, match="--resume"):
        branch_points(model, tokenizer, RECORDS, out_dir=tmp_path / "run", **settings)
    with pytest.raises(Exception, match=r"settings differ .*delta"):
        branch_points(model, tokenizer, RECORDS, out_dir=tmp_path / "run", resume=True, **{**settings, "delta": 3})
    scored = []
    monkeypatch.setattr(analysis, "_batch_rows", lambda *a, **k: scored.append(a[2][0][0].record_id) or real(*a, **k))
    resumed = branch_points(model, tokenizer, RECORDS, out_dir=tmp_path / "run", resume=True, **settings)
    pd.testing.assert_frame_equal(resumed.steps, whole)
    assert len(scored) == 2  # only the records the killed run had not finished


def test_the_run_folder_is_guarded_like_a_profile_run(stories, tmp_path, monkeypatch):
    """A foreign folder is refused untouched, the lock keeps a second process out and is held while scoring,
    and a run left 'running' cannot be read back."""
    model, tokenizer = stories
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "run.json").write_text('{"status": "complete"}')  # a run.json this tool did not write
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"mine is a folder that is not a run and is not empty"):
        branch_points(model, tokenizer, RECORDS, out_dir=mine, resume=True, **SETTINGS)
    assert {p.name: p.read_text() for p in mine.iterdir()} == {"run.json": '{"status": "complete"}',
                                                                "notes.txt": "mine"}
    out = tmp_path / "run"
    out.mkdir()
    with FileLock(out / "run.lock").acquire(timeout=0):  # another holder stands for another process
        with pytest.raises(RunBusyError, match="in use by another internal-policy process"):
            branch_points(model, tokenizer, RECORDS, out_dir=out, **SETTINGS)
    assert [p.name for p in out.iterdir()] == ["run.lock"]
    held, real = [], analysis._batch_rows

    def probe(*args, **kwargs):
        try:
            FileLock(out / "run.lock").acquire(timeout=0).lock.release()
            held.append(False)
        except Timeout:
            held.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(analysis, "_batch_rows", probe)
    done = branch_points(model, tokenizer, RECORDS, out_dir=out, **SETTINGS)
    assert held == [True, True]  # two batches, both scored under the lock
    FileLock(out / "run.lock").acquire(timeout=0).lock.release()  # free afterwards
    pd.testing.assert_frame_equal(load_branch_points(out).steps, done.steps)
    meta = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**meta, "status": "running"}))
    with pytest.raises(InputError, match="still running or was interrupted.*branch-points .*--resume"):
        load_branch_points(out)


def test_cli_writes_steps_run_json_and_figures(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["branch-points", "--input", str(_jsonl(tmp_path / "in.jsonl", RECORDS)), "--out", str(out), "--quiet",
            "--delta", "2", "--min-start", "12", "--min-distance", "3", "--step-sep", "."]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "3 records" in printed and "6 branch points" in printed
    figures = sorted(p.relative_to(out / "figures").as_posix() for p in (out / "figures").rglob("*.*"))
    assert figures == ["overview.pdf", "overview.png"] + [f"records/{r}.{e}" for r in ("bird", "cake", "park")
                                                          for e in ("pdf", "png")]


def test_record_figure_draws_the_bar_select_attn_uses():
    """The dashed line is the candidates' bar, zero-quantile fallback included (0.5-quantile of the response
    scores below is 0, so the bar is the smallest positive score, 0.3): every chosen step lies on or past it."""
    from internal_policy.attnrl.plots import record_figure

    fci = [0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.5]
    steps = Steps(tuple((k * 4, k * 4 + 4) for k in range(len(fci))))
    chosen = select_attn(fci, steps, points=2, quantile=0.5, min_start=0, min_distance=0)
    assert chosen == [5, 6]
    rows = pd.DataFrame({"record_id": "r", "step": range(len(fci)), "fci": fci,
                         "selected": [k in chosen for k in range(len(fci))], "text": ["s"] * len(fci)})
    ax = record_figure(rows, quantile=0.5).axes[0]
    line = next(a for a in ax.lines if a.get_gid() == "threshold")
    assert line.get_xdata()[0] == pytest.approx(0.3)


def test_cli_generate_scores_sampled_responses(tmp_path, capsys):
    prompts = _jsonl(tmp_path / "p.jsonl", [{"id": "q", "prompt": "Once upon a time, there was a little"}])
    out = tmp_path / "run"
    assert main(["branch-points", "--input", str(prompts), "--out", str(out), "--quiet", "--generate", "-n", "2",
                 "--max-new-tokens", "60", "--step-sep", ".", "--min-start", "0", "--min-distance", "0",
                 "--max-figures", "0"]) == 0
    responses = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    steps = pd.read_parquet(out / "steps.parquet")
    assert set(steps["record_id"]) <= {"q/0", "q/1"} and len(responses) == 2
    for record_id, rows in steps.groupby("record_id"):
        sample = next(r for r in responses if r["id"] == record_id)
        assert rows["end"].iloc[-1] == len(sample["prompt_ids"]) + len(sample["response_ids"])


@pytest.mark.parametrize(
    "records, args, message",
    [
        ([{"prompt": "A cat.", "response": " It sat on the mat."}], ["--step-sep", "."],
         r"record 0: the response has 1 step\(s\).*--step-sep"),
        (RECORDS, ["--delta", "0"], r"delta \(Δ\) must be an integer >= 1, got 0"),
        (RECORDS, ["--quantile", "0"], r"quantile must be in \(0, 1\], got 0.0"),
        (RECORDS, ["--quantile", "1.5"], r"quantile must be in \(0, 1\], got 1.5"),
        ([{"text": "A cat sat. It purred."}], [], "record 0 is plain text: branch points need prompt/response"),
        (RECORDS, ["--model", "gptj"], "GPTJForCausalLM: its attention cannot run eagerly"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, capsys, tiny_model_dir, records, args, message):
    args = [tiny_model_dir("gptj") if a == "gptj" else a for a in args]
    code = main(["branch-points", "--input", str(_jsonl(tmp_path / "in.jsonl", records)), "--out",
                 str(tmp_path / "run"), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("internal-policy branch-points: error: ")
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "run").exists()
