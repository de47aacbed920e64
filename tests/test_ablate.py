"""Module ablation (`internal_policy.ablate`, `internal-policy ablate`) against plain references.

The references run one record at a time, one module at a time, with a forward hook that replaces
the module's output (or, for heads, a copy of the model whose output projection has the head's
weights zeroed), and read the model's own `model(...).logits` through a float64 softmax.
"""

from __future__ import annotations

import copy
import importlib
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from internal_policy import ablate, load_ablation
from internal_policy.ablate import AblationSettings, parse_layers, summarize
from internal_policy.cli import main
from internal_policy.data import tokenize_records
from internal_policy.errors import InputError, UnsupportedModelError
from internal_policy.models import describe

ablate_module = importlib.import_module("internal_policy.ablate")  # the module (the package exports the function)

TEXTS = [{"text": "Once upon a time there was a cat."},
         {"text": "Lily saw a big dog in the park and ran home."},
         {"prompt": "Tom had a red ball.", "response": " He gave it to his sister."}]
CHAT = [{"prompt": "Lily went to the park.", "response": " She saw a bird."},
        {"prompt": "The sun was hot.", "response": " Tom drank some water and sat in the shade."},
        {"prompt": "Once upon a time", "response": " there was a little girl."}]


def _outputs(model, examples, edit=None):
    """Per kept token: (entropy, NLL of the next token or NaN) from float64 softmax of model(...).logits."""
    ent, nll = [], []
    for e in examples:
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        for p in range(e.start, e.stop):
            ent.append(float(-(logp[p].exp() * logp[p]).sum()))
            nll.append(float(-logp[p, e.input_ids[p + 1]]) if p + 1 < len(e.input_ids) else np.nan)
    return np.array([ent, nll])


def _output_hook(module, value):
    """Forward hook replacing a module's output (first element of a tuple) by `value` everywhere."""
    def hook(_m, _a, out):
        first = out[0] if isinstance(out, tuple) else out
        new = torch.zeros_like(first) + (0 if value is None else torch.as_tensor(value, dtype=first.dtype))
        return (new, *out[1:]) if isinstance(out, tuple) else new
    return module.register_forward_hook(hook)


def _without_head(model, spec, layer, head):
    """A copy of the model with head `head` of paper layer `layer` removed from its output projection's weight."""
    clone = copy.deepcopy(model)
    proj = describe(clone).head_projection(layer - 1)
    cols = slice(head * proj.head_dim, (head + 1) * proj.head_dim)
    with torch.no_grad():
        if isinstance(proj.module, torch.nn.Linear):
            proj.module.weight[:, cols] = 0
        else:  # GPT-2 Conv1D stores [in, out]
            proj.module.weight[cols, :] = 0
    return clone


def _row(base, ablated):
    """delta mean and se (numpy, ddof=1) of entropy and NLL, over tokens where both exist."""
    out = {}
    for i, name in enumerate(("entropy", "nll")):
        d = ablated[i] - base[i]
        d = d[~np.isnan(d)]
        out[f"delta_{name}"], out[f"delta_{name}_se"] = d.mean(), np.std(d, ddof=1) / np.sqrt(len(d))
    return out


def reference(model, tokenizer, records, components, means=None):
    """The ablation table by plain loops: every module, every record, one forward each."""
    spec = describe(model)
    examples = tokenize_records(records, tokenizer)
    base = _outputs(model, examples)
    rows = []
    for layer in range(1, spec.n_layers + 1):
        for comp in components:
            if comp == "attn_head":
                for h in range(spec.n_heads):
                    rows.append({"layer": layer, "component": comp, "head": h,
                                 **_row(base, _outputs(_without_head(model, spec, layer, h), examples))})
                continue
            module = spec.block_part(layer - 1, getattr(spec.layout, comp))
            handle = _output_hook(module, None if means is None else means[(layer, comp)])
            try:
                ablated = _outputs(model, examples)
                rows.append({"layer": layer, "component": comp, "head": np.nan, **_row(base, ablated)})
            finally:
                handle.remove()
    return pd.DataFrame(rows), base


def _compare(table, ref):
    assert list(table[["layer", "component"]].itertuples(index=False)) == list(
        ref[["layer", "component"]].itertuples(index=False))
    np.testing.assert_array_equal(table["head"].astype(float).to_numpy(), ref["head"].astype(float).to_numpy())
    for col in ("delta_nll", "delta_nll_se", "delta_entropy", "delta_entropy_se"):
        np.testing.assert_allclose(table[col].to_numpy(float), ref[col].to_numpy(float), atol=1e-4, rtol=0, err_msg=col)


@pytest.mark.parametrize("name", ["stories", "llama", "gpt2"])
def test_zero_ablation_equals_plain_reference(name, stories, tiny):
    model, tok = stories if name == "stories" else tiny(name)
    components = ("attn", "ffn", "attn_head")
    table = ablate(model, tok, TEXTS, components=components, batch_size=2, copies=5, progress=False)
    ref, base = reference(model, tok, TEXTS, components)
    _compare(table, ref)
    n = sum(e.stop - e.start for e in tokenize_records(TEXTS, tok))
    assert (table["n_tokens"] == n).all() and (table["n_next_tokens"] == n - 2).all()  # two text records end
    assert table.attrs["meta"]["baseline"]["nll"] == pytest.approx(np.nanmean(base[1]), abs=1e-5)
    assert table.attrs["meta"]["baseline"]["entropy"] == pytest.approx(base[0].mean(), abs=1e-5)


def test_mean_ablation_equals_its_definition(stories):
    """Mean over the kept (response-predicting) positions of every record, substituted at every position."""
    model, tok = stories
    spec = describe(model)
    examples = tokenize_records(CHAT, tok)
    writes: dict = {}
    handles = [_capture(spec.block_part(i, getattr(spec.layout, c)), writes, (i + 1, c))
               for i in range(spec.n_layers) for c in ("attn", "ffn")]
    for e in examples:
        with torch.no_grad():
            model(input_ids=torch.tensor([e.input_ids]))
    for h in handles:
        h.remove()
    kept = np.concatenate([np.arange(e.start, e.stop) for e in examples])
    rec = np.concatenate([[i] * (e.stop - e.start) for i, e in enumerate(examples)])
    means = {key: np.mean([xs[r][p] for r, p in zip(rec, kept)], axis=0) for key, xs in writes.items()}
    ref, _ = reference(model, tok, CHAT, ("attn", "ffn"), means=means)
    table = ablate(model, tok, CHAT, components=("attn", "ffn"), mode="mean", batch_size=2, copies=3, progress=False)
    _compare(table, ref)
    assert not np.allclose(table["delta_nll"], ablate(model, tok, CHAT, progress=False)["delta_nll"], atol=1e-3)


def _capture(module, store, key):
    def hook(_m, _a, out):
        first = out[0] if isinstance(out, tuple) else out
        store.setdefault(key, []).append(first[0].double().numpy())
    return module.register_forward_hook(hook)


def test_head_means_are_means_of_the_head_slices(stories):
    """mean_writes of attn_head = the mean of the projection input over kept positions (each head a slice)."""
    model, tok = stories
    spec = describe(model)
    examples = tokenize_records(CHAT, tok)
    seen = []
    proj = spec.head_projection(2).module
    handle = proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0].double().numpy()))
    for e in examples:
        with torch.no_grad():
            model(input_ids=torch.tensor([e.input_ids]))
    handle.remove()
    expected = np.concatenate([x[e.start:e.stop] for x, e in zip(seen, examples)]).mean(0)
    units = ablate_module.units(spec, AblationSettings(components=("attn_head",), layers=(3,)))
    means = ablate_module.mean_writes(model, spec, examples, units, batch_size=2)
    np.testing.assert_allclose(means["3.attn_head"], expected, atol=1e-6)


def test_batched_equals_one_at_a_time(tiny):
    model, tok = tiny("qwen2")
    kwargs = dict(components=("attn", "ffn", "attn_head"), progress=False)
    one = ablate(model, tok, TEXTS + CHAT, batch_size=1, copies=1, **kwargs)
    many = ablate(model, tok, TEXTS + CHAT, batch_size=4, copies=7, **kwargs)
    pd.testing.assert_frame_equal(one, many, check_exact=False, atol=1e-5, rtol=0)


def test_se_and_merging_match_numpy():
    """Per-batch count / sum / sum of squares merge to numpy's mean and sem (ddof = 1) of all differences."""
    rng = np.random.default_rng(0)
    diffs = rng.normal(0.3, 2.0, size=(3, 40))  # three units, 40 tokens
    nll = np.where(rng.random((3, 40)) < 0.2, np.nan, diffs * 0.5)
    parts = []
    for chunk in np.array_split(np.arange(40), 4):
        rows = []
        for u, (d, y) in enumerate(zip(diffs[:, chunk], nll[:, chunk])):
            y = y[~np.isnan(y)]
            rows.append({"layer": u + 1, "component": "attn", "head": -1,
                         "entropy_n": len(d), "entropy_sum": d.sum(), "entropy_sumsq": (d ** 2).sum(),
                         "nll_n": len(y), "nll_sum": y.sum(), "nll_sumsq": (y ** 2).sum()})
        rows.append({"layer": 0, "component": "baseline", "head": -1, **{k: 1.0 for k in rows[0] if "_" in k}})
        parts.append(pd.DataFrame(rows))
    table, _ = summarize(pd.concat(parts, ignore_index=True))
    np.testing.assert_allclose(table["delta_entropy"], diffs.mean(1), rtol=1e-12)
    np.testing.assert_allclose(table["delta_entropy_se"], diffs.std(1, ddof=1) / np.sqrt(40), rtol=1e-9)
    sem = [np.std(y[~np.isnan(y)], ddof=1) / np.sqrt((~np.isnan(y)).sum()) for y in nll]
    np.testing.assert_allclose(table["delta_nll_se"], sem, rtol=1e-9)
    np.testing.assert_allclose(table["delta_nll"], np.nanmean(nll, 1), rtol=1e-12)


def test_interrupted_run_resumes_to_identical_results(stories, tmp_path, monkeypatch):
    model, tok = stories
    records = TEXTS + CHAT
    kwargs = dict(components=("attn", "ffn"), mode="mean", batch_size=2, copies=4, progress=False)
    whole = ablate(model, tok, records, out_dir=tmp_path / "whole", **kwargs)
    calls = {"n": 0}
    real = ablate_module._measure

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 7:  # 11 units in forwards of 4 copies: 3 per batch, so the third batch is cut
            raise KeyboardInterrupt("killed")
        return real(*args, **kw)

    monkeypatch.setattr(ablate_module, "_measure", flaky)
    with pytest.raises(KeyboardInterrupt):
        ablate(model, tok, records, out_dir=tmp_path / "cut", **kwargs)
    assert len(list((tmp_path / "cut" / "shards").glob("*.done"))) == 2
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["status"] == "running"
    with pytest.raises(InputError, match="--resume"):
        ablate(model, tok, records, out_dir=tmp_path / "cut", **kwargs)
    calls["n"] = -100
    resumed = ablate(model, tok, records, out_dir=tmp_path / "cut", resume=True, **kwargs)
    assert calls["n"] == -100 + 3  # only the unfinished batch ran
    pd.testing.assert_frame_equal(resumed, whole, check_exact=True)
    pd.testing.assert_frame_equal(load_ablation(tmp_path / "cut"), load_ablation(tmp_path / "whole"), check_exact=True)
    with pytest.raises(InputError, match=r"settings differ .*--mode \(\"mean\" -> \"zero\"\)"):
        ablate(model, tok, records, out_dir=tmp_path / "cut", resume=True, **{**kwargs, "mode": "zero"})
    with pytest.raises(InputError, match=r"settings differ .*records"):
        ablate(model, tok, records[:-1], out_dir=tmp_path / "cut", resume=True, **kwargs)


def test_parse_layers():
    assert parse_layers("1,3,5-7, 3") == (1, 3, 5, 6, 7)
    for bad in ("", "a", "3-1", "1,,2"):
        with pytest.raises(InputError, match="--layers"):
            parse_layers(bad)


@pytest.mark.parametrize("options, error, message", [
    ({"components": ("attn", "mlp")}, InputError, r"unknown component\(s\) \['mlp'\]"),
    ({"layers": (0, 2)}, InputError, r"--layers \[0\] out of range: this model has layers 1..5"),
    ({"layers": (6,)}, InputError, r"out of range"),
    ({"mode": "resample"}, InputError, "unknown mode 'resample'"),
    ({"copies": 0}, InputError, "--copies must be at least 1"),
])
def test_bad_settings_are_one_clear_error(stories, options, error, message):
    model, tok = stories
    with pytest.raises(error, match=message):
        ablate(model, tok, TEXTS, progress=False, **options)


def test_empty_input_and_heads_behind_a_post_norm(stories, tiny):
    model, tok = stories
    with pytest.raises(InputError, match="no records given"):
        ablate(model, tok, [], progress=False)
    model, tok = tiny("olmo2")
    refusal = r"^olmo2: attention heads cannot be taken apart, because the norm 'post_attention_layernorm'"
    with pytest.raises(UnsupportedModelError, match=refusal):
        ablate(model, tok, TEXTS, components=("attn_head",), progress=False)
    assert len(ablate(model, tok, TEXTS[:1], layers=(2,), progress=False)) == 2  # attn and ffn still work


def test_cli_writes_table_and_figure_aligned_with_a_profile(tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in TEXTS) + "\n")
    prof = tmp_path / "prof"
    assert main(["profile", "--input", str(data), "--out", str(prof), "--quiet", "--components", "attn,ffn,layer",
                 "--no-tokens"]) == 0
    out = tmp_path / "abl"
    assert main(["ablate", "--input", str(data), "--out", str(out), "--quiet", "--layers", "1-5",
                 "--components", "attn,ffn", "--plot", "--profile", str(prof)]) == 0
    table = pd.read_csv(out / "ablation.csv")
    assert list(table.columns[:8]) == ["layer", "component", "head", "delta_nll", "delta_nll_se", "delta_entropy",
                                       "delta_entropy_se", "n_tokens"]
    assert table["head"].isna().all() and len(table) == 10
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "complete" and meta["mode"] == "zero" and meta["layers"] == [1, 2, 3, 4, 5]
    assert (out / "figures" / "ablation.png").is_file() and (out / "figures" / "ablation.pdf").is_file()
    assert str(out / "ablation.csv") in capsys.readouterr().out
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "A different story."}) + "\n")
    assert main(["ablate", "--input", str(other), "--out", str(tmp_path / "abl2"), "--quiet", "--layers", "1",
                 "--plot", "--profile", str(prof)]) == 2
    assert "not a profile of the same records" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--components", "attn,heads"], r"unknown component\(s\) \['heads'\]"),
    (["--layers", "9"], r"--layers \[9\] out of range"),
    (["--mode", "avg"], "invalid choice"),
    (["--profile", "nowhere"], "--profile nowhere"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    code = None
    try:
        code = main(["ablate", "--out", str(tmp_path / "o"), "--quiet", *args])
    except SystemExit as exit_:  # argparse's own choices
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(re.search(message, line) for line in err), err


def test_ablation_figure_plots_the_table(stories):
    from matplotlib.container import ErrorbarContainer

    from internal_policy.plot import Run, ablation_figure
    from internal_policy.profile import profile
    from internal_policy.stages import segment

    model, tok = stories
    table = ablate(model, tok, TEXTS[:2], progress=False)
    summary = profile(model, tok, TEXTS[:2], components=("attn", "ffn"), progress=False).summary
    stages = segment(summary.loc[summary["component"] == "ffn"].sort_values("layer")["delta"].to_numpy())
    fig = ablation_figure(table, Run(summary, label="m", stages=stages), label="m")
    for ax, prefix, column in ((fig.axes[0], "", "delta_nll"), (fig.axes[1], "entropy:", "delta_entropy")):
        bars = {p.get_gid(): p for p in ax.patches if p.get_gid()}
        # each bar's error bar: the vertical segment through its centre, from value - se to value + se
        spans = {round(seg[0][0], 6): sorted([seg[0][1], seg[1][1]]) for c in ax.containers
                 if isinstance(c, ErrorbarContainer) for seg in c.lines[2][0].get_segments()}
        for row in table.itertuples():
            bar = bars[f"{prefix}{row.component}:{row.layer}"]
            centre = bar.get_x() + bar.get_width() / 2
            value, se = getattr(row, column), getattr(row, f"{column}_se")
            assert bar.get_height() == pytest.approx(value)
            assert centre == pytest.approx(row.layer + (-0.19 if row.component == "attn" else 0.19))  # attn left
            np.testing.assert_allclose(spans[round(centre, 6)], [value - se, value + se], rtol=1e-6)
        assert any(line.get_gid() == "boundary:m" and line.get_xdata()[0] == stages.boundary_layer
                   for line in ax.lines) == (stages.boundary_layer is not None)
    lines = {line.get_gid(): line for line in fig.axes[2].lines}
    for comp in ("attn", "ffn"):
        rows = summary.loc[summary["component"] == comp].sort_values("layer")
        np.testing.assert_allclose(lines[f"profile:{comp}"].get_xdata(), rows["layer"])
        np.testing.assert_allclose(lines[f"profile:{comp}"].get_ydata(), rows["delta"], rtol=1e-6)
