"""Profiles against correctness: scored responses, records.parquet, --group-by, and `predict`."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pandas as pd
import pytest
from helpers import assert_records_match_tokens

from internal_policy import load_run, predict, profile
from internal_policy.bupo.data import gold_answer
from internal_policy.bupo.official_math import official_check
from internal_policy.bupo.rewards import check_answer
from internal_policy.cli import main
from internal_policy.errors import InputError
from internal_policy.generate import Sampling, generate, score_responses
from internal_policy.plot import Run, delta_figure, flow_figure

generate_module = importlib.import_module("internal_policy.generate")
predict_module = importlib.import_module("internal_policy.predict")

PROMPTS = [
    {"id": "p1", "prompt": "Once upon a time", "answer": "4", "level": "easy"},
    {"id": "p2", "prompt": "Lily had a", "reward_model": {"ground_truth": "\\frac{1}{2}"}, "level": "hard"},
    {"id": "p3", "prompt": "Tom saw a big", "solution": "so it is \\boxed{7}.", "level": "easy"},
    {"id": "p4", "prompt": "The sun was", "level": "hard"},  # no gold answer: no `correct`
]
FORCED = {"p1": ["The answer is \\boxed{4}.", "I think \\boxed{5}"],
          "p2": ["\\boxed{0.5} yes", "it is \\boxed{\\frac{2}{4}}"],
          "p3": ["no box here 7", "\\boxed{7}"], "p4": ["a cat", "\\boxed{1}"]}
"""Forced responses per prompt id, sample by sample."""


def _forced_sampler(monkeypatch, tokenizer):
    """Replace the HF sampler by one that returns FORCED responses (the scoring logic without luck)."""
    from internal_policy.data import prompt_ids

    which = {tuple(prompt_ids(p["prompt"], tokenizer)): p["id"] for p in PROMPTS}
    served = {p["id"]: 0 for p in PROMPTS}

    def call(self, prompts, seed):
        out = []
        for ids in prompts:
            pid = which[tuple(ids)]
            out.append(tokenizer(FORCED[pid][served[pid]], add_special_tokens=False)["input_ids"])
            served[pid] += 1
        return out

    monkeypatch.setattr(generate_module._HFSampler, "__call__", call)


@pytest.fixture(scope="module")
def scored(stories, tmp_path_factory):
    """Forced responses to PROMPTS, profiled with --group-by correct into a run folder (batches of 3)."""
    model, tok = stories
    with pytest.MonkeyPatch.context() as mp:
        _forced_sampler(mp, tok)
        responses = generate(model, tok, PROMPTS, Sampling(n=2, max_new_tokens=16), batch_size=8, progress=False)
    answered = [r for r in responses if "correct" in r]
    out = tmp_path_factory.mktemp("scored") / "run"
    run = profile(model, tok, answered, stats=["entropy", "nll"], batch_size=3, out_dir=out, group_by="correct",
                  progress=False)
    return responses, out, run


def test_correct_is_the_checker_applied_by_hand(scored):
    responses, _, _ = scored
    gold = {"p1": "4", "p2": "\\frac{1}{2}", "p3": "7"}
    by_hand = [int(check_answer(r["response"], gold[r["prompt_id"]])) for r in responses if r["prompt_id"] in gold]
    assert [r["correct"] for r in responses if "correct" in r] == by_hand == [1, 0, 1, 1, 0, 1]
    assert [r["answer"] for r in responses if "answer" in r] == ["4", "4", "\\frac{1}{2}", "\\frac{1}{2}", "7", "7"]
    assert all("correct" not in r and "answer" not in r for r in responses if r["prompt_id"] == "p4")
    assert [r["level"] for r in responses] == ["easy", "easy", "hard", "hard", "easy", "easy", "hard", "hard"]
    # the official rule has no symbolic equivalence: 0.5 -> \frac{1}{2} by its string table, \frac{2}{4} stays wrong
    official = score_responses(responses, PROMPTS, "official")
    assert [r["correct"] for r in official if "correct" in r] == [
        int(official_check(r["response"], gold[r["prompt_id"]])) for r in responses if r["prompt_id"] in gold
    ] == [1, 0, 1, 0, 0, 1]
    with pytest.raises(InputError, match="unknown scorer"):
        generate(None, None, PROMPTS, scorer="exact")


def test_gold_answer_takes_the_first_given_field_and_zero_counts():
    """0 is an answer; a blank field is none (the next one is read, else the response gets no `correct`)."""
    records = [{"id": "zero", "final_answer": 0}, {"id": "blank", "answer": "  ", "solution": "thus \\boxed{3}"},
               {"id": "empty", "answer": ""}, {"id": "empty-box", "solution": "\\boxed{}"},
               {"id": "truth", "answer": None, "reward_model": {"ground_truth": 2}, "final_answer": 9}]
    assert [gold_answer(r) for r in records] == ["0", "3", None, None, "2"]
    responses = [{"id": f"{r['id']}/0", "prompt_id": r["id"], "response": "\\boxed{0}"} for r in records]
    scored = score_responses(responses, records, "official")
    assert [(r.get("answer"), r.get("correct")) for r in scored] == [("0", 1), ("3", 0), (None, None), (None, None),
                                                                      ("2", 0)]


def test_real_generation_on_stories_scores_every_response(stories, tmp_path):
    """HF sampling for real (stories260K cannot box an answer): every scored response is 0, as the checker says."""
    model, tok = stories
    out = generate(model, tok, PROMPTS[:2] + PROMPTS[3:], Sampling(n=2, max_new_tokens=6), out_dir=tmp_path,
                   progress=False)
    saved = [json.loads(line) for line in (tmp_path / "responses.jsonl").read_text().splitlines()]
    assert saved == out and len(out) == 6
    gold = {"p1": "4", "p2": "\\frac{1}{2}"}
    assert [r.get("correct") for r in out] == [int(check_answer(r["response"], gold[r["prompt_id"]]))
                                               if r["prompt_id"] in gold else None for r in out]
    assert [r.get("correct") for r in out] == [0, 0, 0, 0, None, None]


def test_records_table_is_the_per_record_token_mean(scored):
    _, out, run = scored
    records = load_run(out).records
    assert_records_match_tokens(records, run.tokens)
    assert len(list((out / "shards").glob("*.records.parquet"))) == 2  # 6 records in batches of 3
    fields = records.drop_duplicates("record_id").set_index("record_id")
    assert fields["correct"].to_dict() == {"p1/0": 1, "p1/1": 0, "p2/0": 1, "p2/1": 1, "p3/0": 0, "p3/1": 1}
    assert (fields["answer"].loc[["p1/0", "p3/1"]] == ["4", "7"]).all() and set(fields["level"]) == {"easy", "hard"}
    pd.testing.assert_frame_equal(run.records, records)


def test_group_summary_is_the_per_group_token_statistics(scored):
    _, out, run = scored
    loaded = load_run(out)
    assert list(loaded.summary.columns) == list(run.summary.columns) and "group" not in loaded.summary
    assert list(pd.read_csv(out / "summary.csv").columns[:3]) == ["group", "layer", "component"]
    groups = loaded.groups
    assert set(groups["group"]) == {"0", "1"}
    fields = run.records.drop_duplicates("record_id").set_index("record_id")["correct"]
    tokens = run.tokens.assign(group=run.tokens["record_id"].map(fields).astype(str))
    by = tokens.groupby(["group", "layer", "component"])
    expected = by[["entropy", "delta", "nll"]].mean().join(by[["entropy", "nll"]].std(ddof=0), rsuffix="_std")
    expected = expected.join(by.size().rename("n_tokens"))
    got = groups.set_index(["group", "layer", "component"]).loc[expected.index]
    for column in expected.columns:
        np.testing.assert_allclose(got[column].to_numpy(float), expected[column].to_numpy(float), atol=1e-5,
                                   err_msg=column)
    # the overall rows are those of an ungrouped summary
    overall = tokens.groupby(["layer", "component"])["entropy"].mean()
    np.testing.assert_allclose(loaded.summary.set_index(["layer", "component"])["entropy"].loc[overall.index],
                               overall.to_numpy(), atol=1e-5)


def test_group_by_any_field_and_missing_field_errors(stories, scored, capsys):
    model, tok = stories
    responses, _, _ = scored
    run = profile(model, tok, responses, group_by="level", components=["layer", "attn", "ffn"], progress=False)
    assert set(run.groups["group"]) == {"easy", "hard"}
    assert run.groups.groupby("group")["n_tokens"].first().sum() == run.summary["n_tokens"].iloc[0]
    with pytest.raises(InputError, match=r"--group-by correct: 2 of 8 records have no 'correct' field \(first: "
                                         r"record p4/0\); records get `correct` from --generate"):
        profile(model, tok, responses, group_by="correct", progress=False)
    with pytest.raises(InputError, match="no 'colour' field .* fields the records have: .*level"):
        profile(model, tok, responses, group_by="colour", progress=False)


def test_resume_regroups_without_recomputing_and_a_missing_records_shard_is_named(stories, scored, tmp_path,
                                                                                   monkeypatch):
    import shutil

    model, tok = stories
    responses, out, run = scored
    answered = [r for r in responses if "correct" in r]
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    monkeypatch.setattr(importlib.import_module("internal_policy.profile"), "decode", None)  # nothing is decoded
    again = profile(model, tok, answered, stats=["entropy", "nll"], batch_size=3, out_dir=copy, group_by="level",
                    resume=True, progress=False)
    assert set(load_run(copy).groups["group"]) == {"easy", "hard"}
    pd.testing.assert_frame_equal(again.summary, run.summary)
    pd.testing.assert_frame_equal(load_run(copy).records, run.records)
    summary = (copy / "summary.csv").read_bytes()
    shard = next((copy / "shards").glob("*.records.parquet"))
    shard.unlink()  # the summary is merged from the per-record sums: a lost shard is named, nothing is rewritten
    with pytest.raises(InputError, match=rf"shard .*{shard.name} is damaged .* delete it and its .*\.done marker"):
        profile(model, tok, answered, stats=["entropy", "nll"], batch_size=3, out_dir=copy, resume=True,
                progress=False)
    assert (copy / "summary.csv").read_bytes() == summary


def test_grouped_figures_draw_one_curve_and_band_per_group(scored):
    _, out, _ = scored
    run = Run.from_dir(out)
    curves = run.by_group()
    assert [c.label for c in curves] == ["stories260K: correct=0", "stories260K: correct=1"]
    fig = flow_figure(curves, band_kind="ci")
    ax = fig.axes[0]
    for curve in curves:
        line = next(a for a in ax.get_lines() if a.get_gid() == f"flow:{curve.label}")
        rows = run.groups[run.groups["group"] == curve.label.rsplit("=", 1)[1]].set_index(["layer", "component"])
        assert line.get_ydata()[0] == pytest.approx(rows.loc[(0, "layer"), "entropy"])
        assert line.get_ydata()[-1] == pytest.approx(rows.loc[(run.n_layers, "layer"), "entropy"])
        assert any(c.get_gid() == f"band:flow:{curve.label}" for c in ax.collections)
    bands = [c.get_gid() for a in delta_figure(curves).axes for c in a.collections]
    assert sum(g.startswith("band:ffn:") for g in bands) == 2
    assert Run.from_dir(out).by_group()[0].summary.shape[0] == run.summary.shape[0]


def _planted(n: int = 60, positives: int = 18, layer: int = 3, effect: float = 1.2, seed: int = 0) -> pd.DataFrame:
    """A records table (records.parquet schema, component `layer`, layers 0..5) with `correct` lowering the
    entropy of one layer: per record a shared level plus per-layer noise, plus −effect at `layer` if correct."""
    rng = np.random.default_rng(seed)
    correct = rng.permutation(np.r_[np.ones(positives, int), np.zeros(n - positives, int)])
    rows = []
    for r in range(n):
        level = rng.normal(3.0, 0.5)
        for l in range(6):
            value = level + rng.normal(0, 0.3) - (effect * correct[r] if l == layer else 0.0)
            rows.append({"record_id": f"r{r}", "layer": l, "component": "layer", "entropy": value,
                         "entropy_n": 4, "entropy_sum": 4 * value, "n_tokens": 4, "correct": correct[r],
                         "prompt_id": f"q{r // 3}"})
    return pd.DataFrame(rows)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by its definition: P(score of a positive > score of a negative), ties counting half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


@pytest.fixture(scope="module")
def planted():
    table = _planted()
    return table, predict(table, folds=5, seed=0, permutations=5)


def test_predict_finds_the_planted_layer(planted):
    table, result = planted
    assert result.auc >= 0.9 and result.top_layer == 3
    first = result.table.iloc[0]
    assert abs(first.perm_auc - 0.5) < 0.12 and first.perm_auc_std > 0
    single = result.table.iloc[1:].set_index("layer")
    assert single.loc[3, "auc"] > 0.85 and single.loc[3, "mean_diff"] < -0.9
    assert (single.drop(index=3)["auc"] < 0.75).all()
    counts = result.meta["fold_positives"]
    assert sum(counts) == 18 and max(counts) - min(counts) <= 1  # stratified: each fold holds 18/5 positives
    shuffled = table.copy()
    labels = table.drop_duplicates("record_id").set_index("record_id")["correct"]
    perm = dict(zip(labels.index, np.random.default_rng(7).permutation(labels.to_numpy())))
    shuffled["correct"] = shuffled["record_id"].map(perm)
    assert abs(predict(shuffled, permutations=2).auc - 0.5) < 0.15


def test_single_feature_auc_matches_an_independent_computation(planted):
    """One standardised feature: logistic regression ranks by ±feature, the sign of its train-fold covariance
    with the label (concave likelihood, gradient at 0 ∝ cov), so each fold's AUC is the Mann-Whitney AUC."""
    from sklearn.model_selection import StratifiedKFold

    table, result = planted
    x = table[table["layer"] == 3].set_index("record_id")["entropy"]
    y = table.drop_duplicates("record_id").set_index("record_id")["correct"].loc[x.index].to_numpy()
    folds = []
    for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(x, y):
        sign = np.sign(np.cov(x.to_numpy()[train], y[train])[0, 1])
        folds.append(_auc(sign * x.to_numpy()[test], y[test]))
    row = result.table[result.table["layer"] == 3].iloc[0]
    assert row.auc == pytest.approx(np.mean(folds), abs=1e-12)
    assert row.auc_std == pytest.approx(np.std(folds), abs=1e-12)


def test_group_folds_keep_a_prompt_in_one_fold():
    table = _planted(n=60, positives=30)
    table["correct"] = table["prompt_id"].map(lambda q: int(q[1:]) % 2)  # one label per prompt
    grouped = predict(table, permutations=2, group_folds="prompt_id")
    assert grouped.meta["group_folds"] == "prompt_id" and grouped.meta["n_records"] == 60
    prompts = table.drop_duplicates("record_id")["prompt_id"].to_numpy()
    y = table.drop_duplicates("record_id")["correct"].to_numpy()
    for train, test in predict_module._splits(y, prompts, 5, 0):
        assert not set(prompts[train]) & set(prompts[test])
    leaky = predict_module._splits(y, None, 5, 0)
    assert any(set(prompts[train]) & set(prompts[test]) for train, test in leaky)  # what grouping prevents
    few = predict(_planted(n=60, positives=10), permutations=10, group_folds="prompt_id")  # 10 positives, 20 prompts
    assert few.auc > 0.8 and np.isfinite(few.table["perm_auc"]).all() and abs(few.meta["perm_auc"] - 0.5) < 0.15
    with pytest.raises(InputError, match="--group-folds colour: the records have no field"):
        predict(table, group_folds="colour")


def test_predict_cli_writes_the_table_and_refuses_bad_input(planted, tmp_path, capsys):
    table, result = planted
    run = tmp_path / "run"
    run.mkdir()
    table.to_parquet(run / "records.parquet")
    assert main(["predict", str(run), "--permutations", "5"]) == 0
    out = capsys.readouterr().out
    assert "strongest single feature: layer 3" in out and f"ROC AUC {result.auc:.3f}" in out
    saved = pd.read_csv(run / "predict.csv")
    np.testing.assert_allclose(saved["auc"], result.table["auc"])
    assert json.loads((run / "predict.json").read_text())["top"]["layer"] == 3
    one_class = table.assign(correct=1)
    few = table[table["record_id"].isin([f"r{i}" for i in range(8)])]
    cases = [
        (["--target", "colour"], run, "--target colour: the records have no field 'colour' (they have: correct, "
                                      "prompt_id)"),
        (["--stat", "nll"], run, "--stat nll: the run has no statistic 'nll' (it has: entropy)"),
        (["--components", "ffn"], run, "--components: the run has no rows for ['ffn']"),
        ([], one_class, "ROC AUC needs two classes, the records have a single class (1 for all 60 records)"),
        (["--folds", "10"], few, "are too few for 10 stratified folds"),
        ([], few, "are too few for 5 stratified folds"),  # 8 records, fewer than 5 of one class
        ([], None, "has no records.parquet"),
    ]
    for i, (argv, records, message) in enumerate(cases):
        folder = tmp_path / f"bad{i}"
        folder.mkdir()
        if records is run:
            folder = run
        elif records is not None:
            records.to_parquet(folder / "records.parquet")
        assert main(["predict", str(folder), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("internal-policy predict: error: ") and message in err, err


def test_generate_profile_cli_group_by_and_predict_refusal(stories, tmp_path, capsys):
    """The real CLI path: --generate on prompts with answers, --group-by correct; stories260K gets none right."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:2]))
    argv = ["profile", "--input", str(path), "--generate", "-n", "2", "--max-new-tokens", "5", "--engine", "hf",
            "--components", "layer,attn,ffn", "--quiet", "--out", str(tmp_path / "run"), "--group-by", "correct"]
    assert main(argv) == 0
    assert "--group-by correct: 0: 4 records" in capsys.readouterr().out
    assert set(load_run(tmp_path / "run").groups["group"]) == {"0"}
    assert main(["predict", str(tmp_path / "run")]) == 2
    assert "a single class (0 for all 4 records)" in capsys.readouterr().err
