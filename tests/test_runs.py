"""The run folder keeps what it must: foreign files, locks, damaged files, running runs, read-only readers."""

from __future__ import annotations

import importlib
import json
import os
import re

import pandas as pd
import pytest
from filelock import FileLock, Timeout

from internal_policy.cli import main
from internal_policy.errors import InputError, RunBusyError
from internal_policy.generate import _HFSampler
from internal_policy.runs import RunDir, claim_run_dir
from internal_policy.stages import run_boundary_layer

# the module (the package exports a function of that name)
profile_module = importlib.import_module("internal_policy.profile")

RECORDS = [{"id": "a", "text": "A cat sat on the mat."}, {"id": "b", "text": "Lily had a red ball."},
           {"id": "c", "text": "Tom ran to the big tree."}]


def _error(capsys, argv, pattern) -> str:
    """Run the CLI, expect exit 2 and exactly one error line matching `pattern`."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and re.search(pattern, err), err
    return err


def _snapshot(folder) -> dict:
    """Every file under `folder` with its bytes (to prove nothing was touched)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def inputs(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


@pytest.fixture
def interrupted(tmp_path, inputs, monkeypatch, capsys):
    """A profile stopped by Ctrl-C during its second batch (of three): (argv, out folder)."""
    out = tmp_path / "run"
    argv = ["profile", "--input", str(inputs), "--out", str(out), "--batch-size", "1", "--quiet"]
    real = profile_module.decode

    def stop_in_second_batch(*args, **kwargs):
        if any((out / "shards").glob("*.done")):  # the first batch is finished
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(profile_module, "decode", stop_in_second_batch)
    assert main(argv) == 130
    monkeypatch.setattr(profile_module, "decode", real)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"interrupted; what finished is kept in {out}: run the same command with --resume" in err
    assert len(list((out / "shards").glob("*.done"))) == 1
    return argv, out


def test_ctrl_c_keeps_what_finished_and_resume_completes_it(interrupted, tmp_path):
    argv, out = interrupted
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    assert main(argv + ["--resume"]) == 0
    whole = tmp_path / "whole"
    assert main([*argv[:3], "--out", str(whole), "--batch-size", "3", "--quiet"]) == 0
    a, b = pd.read_csv(out / "summary.csv"), pd.read_csv(whole / "summary.csv")
    means = [c for c in a.columns if not c.endswith(("_sum", "_sumsq"))]
    pd.testing.assert_frame_equal(a[means], b[means], check_exact=False, atol=1e-6, rtol=0)


def test_a_folder_that_is_not_a_run_is_refused_and_left_untouched(tmp_path, inputs, capsys):
    mine = tmp_path / "u"
    (mine / "shards").mkdir(parents=True)
    (mine / "shards" / "data-00000.arrow").write_text("x")
    (mine / "summary.csv").write_text("mine")
    before = _snapshot(mine)
    for extra in ([], ["--resume"]):
        _error(capsys, ["profile", "--input", str(inputs), "--out", str(mine), "--quiet", *extra],
               r"--out .*u is a folder that is not a run and is not empty \(it holds")
        assert _snapshot(mine) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["profile", "--input", str(inputs), "--out", str(empty), "--quiet"]) == 0


def test_resume_removes_only_the_unfinished_files_it_wrote(interrupted, capsys):
    argv, out = interrupted
    shards = out / "shards"
    (shards / "notes.txt").write_text("a file this tool did not write")
    (shards / "0123456789abcdef.sums.parquet").write_bytes(b"half a batch")  # no .done marker: unfinished
    (shards / "0123456789abcdef.done.tmp").write_text("[")
    assert main(argv + ["--resume"]) == 0
    assert (shards / "notes.txt").read_text() == "a file this tool did not write"
    assert not any(shards.glob("0123456789abcdef.*"))
    assert len(list(shards.glob("*.done"))) == 3


def test_out_that_is_a_file_or_cannot_be_written(tmp_path, inputs, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    base = ["profile", "--input", str(inputs), "--quiet", "--out"]
    _error(capsys, [*base, str(afile)], r"--out .*afile is an existing file; give a folder")
    _error(capsys, [*base, str(afile / "run")], r"cannot create --out .*afile/run \(Not a directory\)")
    _error(capsys, ["plot", str(tmp_path), "--out", str(afile)], r"--out .*afile is an existing file")
    assert afile.read_text() == "keep me"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        _error(capsys, [*base, str(locked / "run")], "cannot create --out")


def test_a_second_process_on_the_same_folder_gets_a_clear_error(tmp_path, inputs, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["profile", "--input", str(inputs), "--out", str(out), "--quiet", "--resume"]
    assert main(argv) == 0
    before = _snapshot(out)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Once upon a time"}) + "\n")
    other = FileLock(out / "run.lock")  # another holder: flock locks are per open file, so this stands for a process
    with other.acquire(timeout=0):
        _error(capsys, argv, r"run is in use by another internal-policy process .*run\.lock.*another --out")
        _error(capsys, [*argv[:2], str(prompts), *argv[3:], "--generate", "--max-new-tokens", "4"],
               "in use by another internal-policy process")
    assert _snapshot(out) == before

    # the lock is held while a run computes (profile and generation), and free afterwards
    held = []

    def probe():
        lock = FileLock(tmp_path / "gen" / "run.lock")
        try:
            lock.acquire(timeout=0)
            lock.release()
            held.append(False)
        except Timeout:
            held.append(True)

    real_decode, real_sample = profile_module.decode, _HFSampler.__call__
    monkeypatch.setattr(profile_module, "decode", lambda *a, **k: (probe(), real_decode(*a, **k))[1])
    monkeypatch.setattr(_HFSampler, "__call__", lambda self, p, s: (probe(), real_sample(self, p, s))[1])
    assert main(["profile", "--input", str(prompts), "--out", str(tmp_path / "gen"), "--quiet", "--generate",
                 "--max-new-tokens", "4"]) == 0
    assert len(held) >= 2 and all(held)  # probed in generation and in decoding
    after = FileLock(tmp_path / "gen" / "run.lock")
    after.acquire(timeout=0)  # released at the end
    with pytest.raises(RunBusyError, match="in use"):
        claim_run_dir(tmp_path / "gen")
    after.release()


@pytest.fixture
def finished(tmp_path, inputs):
    out = tmp_path / "done"
    assert main(["profile", "--input", str(inputs), "--out", str(out), "--quiet", "--components", "attn,ffn"]) == 0
    return out


def test_plot_stages_and_auto_layer_only_read_the_run(finished, tmp_path, capsys):
    before = _snapshot(finished)
    assert main(["plot", str(finished), "--out", str(tmp_path / "figs"), "--kind", "delta"]) == 0
    assert run_boundary_layer(finished) in range(1, 5)
    assert main(["stages", str(finished), "--out", str(tmp_path / "stages.json")]) == 0
    assert _snapshot(finished) == before
    assert json.loads((tmp_path / "stages.json").read_text())["min_run"] == 2
    assert main(["stages", str(finished)]) == 0  # asked for: stored in the run (plot then uses it)
    assert (finished / "stages.json").is_file()


def test_a_run_still_running_is_refused(finished, capsys):
    meta = json.loads((finished / "run.json").read_text())
    (finished / "run.json").write_text(json.dumps({**meta, "status": "running"}))
    for argv in (["stages", str(finished)], ["plot", str(finished), "--out", str(finished.parent / "f")]):
        _error(capsys, argv, r"is a run that is still running or was interrupted .*--resume")
    with pytest.raises(InputError, match="still running"):
        run_boundary_layer(finished)


@pytest.mark.parametrize("content, pattern", [
    ("", r"summary.csv is not a readable table"),
    ("a,b\n1,2\n", r"summary.csv is not a profile summary \(no columns \['layer', 'component', 'n_tokens'\]\)"),
    ("layer,component,n_tokens,entropy\n", r"summary.csv is not a profile summary \(no rows\)"),
])
def test_a_damaged_summary_is_named(finished, capsys, content, pattern):
    (finished / "summary.csv").write_text(content)
    _error(capsys, ["stages", str(finished)], pattern)


@pytest.mark.parametrize("damage", ["run.json", "done", "shard"])
def test_damaged_files_on_resume_are_named_and_lose_nothing(interrupted, capsys, damage):
    argv, out = interrupted
    marker = next((out / "shards").glob("*.done"))
    shard = marker.with_name(marker.name.replace(".done", ".records.parquet"))
    target = {"run.json": out / "run.json", "done": marker, "shard": shard}[damage]
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    name = re.escape(target.name)
    _error(capsys, argv + ["--resume"], rf"{name} is damaged")
    if damage == "shard":  # the advice works: delete the shard and its marker, resume, get every record
        shard.unlink()
        marker.unlink()
        assert main(argv + ["--resume"]) == 0
        assert json.loads((out / "run.json").read_text())["n_records"] == len(RECORDS)


OURS = {"layer_numbering": "paper"}


def test_run_dir_round_trip(tmp_path):
    """RunDir on its own: shards with markers, finished ids, run.json status, the lock released by finish."""
    path = tmp_path / "run"
    run = RunDir(path)
    # without a signature key (runs.SIGNATURES) a run.json is not this tool's: the folder would be refused
    assert run.start({"a": 1, "b": 2, **OURS}, ["a"], resume=False) == set()
    assert json.loads((path / "run.json").read_text()) == {"a": 1, "b": 2, **OURS, "status": "running"}
    with pytest.raises(Timeout):
        FileLock(path / "run.lock").acquire(timeout=0)  # held while the run writes
    run.write_shard(["x", "y"], sums=pd.DataFrame({"v": [1.0, 2.0]}), tokens=None)
    run.write_shard(["z"], sums=pd.DataFrame({"v": [3.0]}))
    assert run.finished_ids() == {"x", "y", "z"} and len(run.shard_names()) == 2
    assert not list(path.glob("shards/*.tokens.parquet"))  # a table given as None is not written
    assert sorted(run.read_shards("sums")["v"]) == [1.0, 2.0, 3.0]
    assert run.finish({"a": 1, "b": 2, **OURS})["status"] == "complete"
    FileLock(path / "run.lock").acquire(timeout=0).lock.release()  # released while `run` still exists
    again = RunDir(path)
    with pytest.raises(InputError, match="already holds a run; pass --resume"):
        again.start({"a": 1, "b": 2, **OURS}, ["a"], resume=False)
    with pytest.raises(InputError, match=r"settings differ from the run there in a: 1 -> 5"):
        again.start({"a": 5, "b": 2, **OURS}, ["a"], resume=True, describe=lambda k, old, new: f"{k}: {old} -> {new}")
    assert again.start({"a": 1, "b": 9, **OURS}, ["a"], resume=True) == {"x", "y", "z"}  # b is not a resume key
    again.release()
