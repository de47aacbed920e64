"""Head-level internal policies (`attn_head`) against independent float64 computations.

The reference never uses `HeadProjection`: it takes z from its own pre-hook on the output projection
and slices the module's weight by hand (Linear [out, in], GPT-2 Conv1D [in, out]).
"""

import importlib
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import assert_records_match_tokens
from helpers_stats import check_stats, reference_stats
from transformers.pytorch_utils import Conv1D

from internal_policy.capture import extract
from internal_policy.cli import main
from internal_policy.data import tokenize_records
from internal_policy.errors import InputError
from internal_policy.models import describe
from internal_policy.plot import KINDS, Run, heads_figure, plot_runs
from internal_policy.predict import predict
from internal_policy.profile import load_run, profile
from internal_policy.settings import ProfileSettings
from internal_policy.stages import segment

RECORDS = [
    {"id": "a", "text": "Once upon a time, there was a little dog who liked to run."},
    {"id": "b", "prompt": "Tom saw a big", "response": " tree in the park."},
    {"id": "c", "text": "Lily had a red ball."},
]
POST_NORM = ("gemma2", "gemma3_text", "olmo2", "olmo3")
"""Architectures whose attention write passes a norm after the output projection: heads are refused."""
profile_module = importlib.import_module("internal_policy.profile")


def _projection_weight(module) -> torch.Tensor:
    """The output projection as a float64 [d_model, n_heads·head_dim] matrix, read off the module by hand."""
    w = module.weight.detach().double()
    return w.T if isinstance(module, Conv1D) else w


def _reference_writes(model, spec, input_ids):
    """{block index: float64 head writes [seq, H, d]}, the model's hidden states and output logits of one record."""
    zs, handles = {}, []
    for i in range(spec.n_layers):
        module = spec.block_part(i, spec.layout.attn_out)
        handles.append(module.register_forward_pre_hook(lambda _m, args, i=i: zs.__setitem__(i, args[0].detach())))
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids[None], output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    writes = {}
    for i, z in zs.items():
        w = _projection_weight(spec.block_part(i, spec.layout.attn_out))
        d_head = w.shape[1] // spec.n_heads
        writes[i] = torch.stack([z[0, :, h * d_head:(h + 1) * d_head].double() @ w[:, h * d_head:(h + 1) * d_head].T
                                 for h in range(spec.n_heads)], dim=1)
    return writes, out.hidden_states, out.logits[0]


def test_head_writes_sum_to_the_attention_write(arch, tiny):
    """Σ_h head writes + the projection bias = A_l as the capture reports it, on every supported architecture."""
    model, _ = tiny(arch)
    spec = describe(model)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    if arch in POST_NORM:
        with pytest.raises(InputError, match=rf"^{arch}: .*'post_attention_layernorm'.* drop attn_head") as err:
            extract(model, ids, components=("attn", "attn_head"))
        assert "\n" not in str(err.value)
        return
    found = extract(model, ids, components=("attn", "attn_head"))
    for layer in range(1, spec.n_layers + 1):
        heads = found[(layer, "attn_head")]
        assert heads.shape == (2, 9, spec.n_heads, spec.d_model)
        bias = spec.block_part(layer - 1, spec.layout.attn_out).bias
        total = heads.double().sum(-2) + (0 if bias is None else bias.double())
        torch.testing.assert_close(total, found[(layer, "attn")].double(), atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=["stories", "qwen3", "gpt2"])
def head_run(request, tiny):
    """(model, tokenizer, examples, in-memory profile with attn_head and every scalar statistic); stories260K
    (8 heads over 4 KV heads), a grouped-query qwen3 (4 over 2, head_dim given apart from d/H) and GPT-2 (Conv1D,
    bias)."""
    model, tok = request.getfixturevalue("stories") if request.param == "stories" else tiny(request.param)
    result = profile(model, tok, RECORDS, components=("layer", "attn_head", "ffn"), stats=["all"], progress=False)
    examples = tokenize_records(RECORDS, tok, None, False, {}, vocab_size=model.get_input_embeddings().weight.shape[0])
    return model, tok, examples, result


def test_each_head_statistic_equals_a_float64_decoding(head_run):
    """Every statistic and cos_resid of every head, per token, against z_h W_O[h] decoded raw in float64."""
    model, _, examples, result = head_run
    spec = describe(model)
    tokens = result.tokens.loc[result.tokens["component"] == "attn_head"]
    w_u = spec.unembed_weight.detach().double()
    b_u = 0 if spec.unembed_bias is None else spec.unembed_bias.detach().double()
    reference = []
    for example in examples:
        ids = torch.tensor(example.input_ids)
        writes, hidden, logits = _reference_writes(model, spec, ids)
        positions = np.arange(example.start, example.stop)
        y = torch.tensor(list(example.input_ids[1:]) + [-1])[positions]
        for i, per_head in writes.items():
            for h in range(spec.n_heads):
                x = per_head[positions, h]
                ref = reference_stats(x @ w_u.T + b_u, y, logits[positions], alphas=(2.0,))
                cos = torch.nn.functional.cosine_similarity(x, hidden[i][0, positions].double(), dim=-1)
                reference.append(pd.DataFrame({"record_id": example.record_id, "position": positions, "layer": i + 1,
                                               "head": h, "cos_ref": cos.numpy(),
                                               **{f"{k}_ref": v for k, v in ref.items()}}))
    reference = pd.concat(reference, ignore_index=True)
    both = tokens.merge(reference, on=["record_id", "position", "layer", "head"], validate="one_to_one")
    assert len(both) == len(tokens) == len(reference)
    ref = {k.removesuffix("_ref"): both[k].to_numpy() for k in both.columns if k.endswith("_ref") and k != "cos_ref"}
    check_stats({c: both[c].to_numpy() for c in ("entropy", "renyi2", "nll", "rank", "kl_out", "top1_agree")}, ref)
    np.testing.assert_allclose(both["cos_resid"], both["cos_ref"], atol=1e-5)
    assert both["delta"].isna().all()  # heads have no ΔH

    # the summary's head rows are the token means of the reference (a plain groupby, float64)
    summary = result.summary.loc[result.summary["component"] == "attn_head"].set_index(["layer", "head"])
    means = reference.groupby(["layer", "head"])[["entropy_ref", "nll_ref", "cos_ref"]].mean()
    np.testing.assert_allclose(summary.loc[means.index, "entropy"], means["entropy_ref"], atol=1e-5)
    np.testing.assert_allclose(summary.loc[means.index, "nll"], means["nll_ref"], atol=1e-5)
    np.testing.assert_allclose(summary.loc[means.index, "cos_resid"], means["cos_ref"], atol=1e-6)
    assert (summary["n_tokens"] == sum(e.stop - e.start for e in examples)).all()


def test_head_column_is_a_nullable_integer_and_other_rows_are_unchanged(head_run, tmp_path):
    model, tok, _, result = head_run
    spec = describe(model)
    summary = result.summary
    assert str(summary["head"].dtype) == "Int64" and list(summary.columns[:3]) == ["layer", "component", "head"]
    heads = summary.loc[summary["component"] == "attn_head"]
    assert heads.groupby("layer")["head"].apply(list).tolist() == [list(range(spec.n_heads))] * spec.n_layers
    assert summary.loc[summary["component"] != "attn_head", "head"].isna().all()
    assert str(result.tokens["head"].dtype) == "Int64"
    head_tokens = result.tokens.loc[result.tokens["component"] == "attn_head", "head"].to_numpy(dtype=int)
    assert (head_tokens.reshape(-1, spec.n_heads) == np.arange(spec.n_heads)).all()  # heads in order per token, layer
    # the same run without heads: no head column, and the other rows' numbers as with heads
    plain = profile(model, tok, RECORDS, components=("layer", "ffn"), stats=["all"], progress=False)
    assert "head" not in plain.summary.columns and "head" not in plain.tokens.columns
    rest = summary.loc[summary["head"].isna()].drop(columns="head").reset_index(drop=True)
    pd.testing.assert_frame_equal(rest, plain.summary, check_exact=False, atol=1e-5, rtol=1e-6)
    # a run folder reads back with the same integer heads
    on_disk = profile(model, tok, RECORDS[:1], components=("attn_head",), out_dir=tmp_path, progress=False)
    back = load_run(tmp_path)
    assert str(back.summary["head"].dtype) == "Int64"
    pd.testing.assert_frame_equal(back.summary, on_disk.summary, check_exact=False, atol=1e-12, rtol=0)


def test_token_sample_and_hidden_budget_cover_head_rows(stories, monkeypatch):
    """--token-sample keeps the same heads' values at fewer positions; the budget counts the head rows:
    40 head sites × 64 × 4 B per kept token with a budget of 3 tokens gives ⌈n / 3⌉ forwards, same numbers."""
    model, tok = stories
    records = RECORDS[:1]
    full = profile(model, tok, records, components=("attn_head",), progress=False).tokens
    sampled = profile(model, tok, records, components=("attn_head",), token_sample=0.5, progress=False).tokens
    key = ["position", "layer", "head"]
    assert 0 < len(sampled) < len(full)
    both = sampled.merge(full, on=key, suffixes=("", "_full"))
    assert len(both) == len(sampled)
    np.testing.assert_allclose(both["entropy"], both["entropy_full"], atol=1e-5)

    forwards = []
    handle = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        per_token = 5 * 8 * 64 * 4
        split = profile(model, tok, records, components=("attn_head",), hidden_budget_mb=3 * per_token / 2**20,
                        progress=False).tokens
    finally:
        handle.remove()
    n = full["position"].nunique()
    assert len(forwards) == math.ceil(n / 3)
    pd.testing.assert_frame_equal(split, full, check_exact=False, atol=1e-5, rtol=0)


def test_heads_resume_and_resume_key(stories, tmp_path, monkeypatch):
    """An interrupted run with heads resumes to the whole run's tables; dropping attn_head is refused."""
    model, tok = stories
    options = dict(components=("attn", "attn_head"), batch_size=1, progress=False)
    whole = profile(model, tok, RECORDS, out_dir=tmp_path / "whole", **options)
    real, calls = profile_module.decode, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(profile_module, "decode", flaky)
    with pytest.raises(KeyboardInterrupt):
        profile(model, tok, RECORDS, out_dir=tmp_path / "cut", **options)
    monkeypatch.setattr(profile_module, "decode", real)
    resumed = profile(model, tok, RECORDS, out_dir=tmp_path / "cut", resume=True, **options)
    pd.testing.assert_frame_equal(resumed.summary, whole.summary, check_exact=False, atol=1e-12, rtol=0)
    pd.testing.assert_frame_equal(resumed.tokens, whole.tokens)
    pd.testing.assert_frame_equal(resumed.records, whole.records, check_exact=False, atol=1e-12, rtol=0)
    assert set(whole.records["head"].dropna()) == set(range(describe(model).n_heads))
    assert_records_match_tokens(load_run(tmp_path / "cut").records, whole.tokens)
    with pytest.raises(InputError, match="attn_head: predict uses one feature per"):
        predict(tmp_path / "cut", target="record_id", components=("attn_head",))
    with pytest.raises(InputError, match=r"settings differ .* --components"):
        profile(model, tok, RECORDS, out_dir=tmp_path / "cut", resume=True, **{**options, "components": ("attn",)})


@pytest.mark.parametrize("arch", ["gemma2", "olmo2"])
def test_post_norm_architectures_are_refused(arch, tiny):
    model, tok = tiny(arch)
    with pytest.raises(InputError, match=rf"^{arch}: attention heads cannot be taken apart") as err:
        profile(model, tok, RECORDS, components=("attn_head",), progress=False)
    assert "\n" not in str(err.value)


def test_model_without_heads_is_refused(stories):
    model, tok = stories
    spec = replace(describe(model), n_heads=0)
    with pytest.raises(InputError, match="no number of attention heads") as err:
        profile(model, tok, RECORDS, components=("attn_head",), spec=spec, progress=False)
    assert "\n" not in str(err.value)
    profile(model, tok, RECORDS[:1], components=("attn",), spec=spec, progress=False)  # heads not asked: fine


def test_attn_head_is_opt_in():
    assert "attn_head" not in ProfileSettings().components
    assert ProfileSettings(components=("attn_head", "layer")).components == ("layer", "attn_head")
    with pytest.raises(InputError, match="attn_head"):
        ProfileSettings(components=("heads",))


def _summary(n_layers=4, n_heads=3, seed=0):
    """A synthetic summary with head rows and ffn rows whose ΔH_FFN gives stages."""
    rng = np.random.default_rng(seed)
    heads = pd.DataFrame([(layer, "attn_head", h, rng.uniform(3, 6), rng.uniform(0, 2))
                          for layer in range(1, n_layers + 1) for h in range(n_heads)],
                         columns=["layer", "component", "head", "entropy", "nll"])
    ffn = pd.DataFrame({"layer": range(1, n_layers + 1), "component": "ffn", "entropy": 3.0,
                        "delta": [0.8, 0.5, 0.0, -0.6][:n_layers]})
    summary = pd.concat([heads, ffn], ignore_index=True).astype({"head": "Int64"})
    summary["n_tokens"] = 10
    return summary


@pytest.mark.parametrize("stat", ["entropy", "nll"])
def test_heads_figure_draws_the_layer_by_head_grid(stat):
    summary = _summary()
    stages = segment(summary.loc[summary["component"] == "ffn", "delta"].to_numpy())
    fig = heads_figure(Run(summary, label="m", vocab_size=512, stages=stages), stat=stat)
    heat, strip = fig.axes[1], fig.axes[0]
    mesh = next(c for c in heat.collections if c.get_gid() == "heads:grid")
    expected = np.array([[summary.loc[(summary["layer"] == layer) & (summary["head"] == h), stat].item()
                          for layer in range(1, 5)] for h in range(3)])
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(3, 4), expected)
    np.testing.assert_allclose(mesh.get_coordinates()[0, :, 0], [0.5, 1.5, 2.5, 3.5, 4.5])  # layer edges
    np.testing.assert_allclose(mesh.get_coordinates()[:, 0, 1], [-0.5, 0.5, 1.5, 2.5])  # head edges
    spans = {p.get_gid(): p for p in strip.patches if (p.get_gid() or "").startswith("stage:")}
    assert set(spans) == {f"stage:{name}" for name in stages.spans()}
    first, last = stages.spans()["exploration"]
    span = spans["stage:exploration"]
    np.testing.assert_allclose([span.get_x(), span.get_x() + span.get_width()], [first - 0.5, last + 0.5])
    assert stages.boundary_layer == 2
    assert [line.get_xdata()[0] for line in heat.lines if line.get_gid() == "boundary:m"] == [2]
    assert "boundary layer 2" in strip.get_title()
    with pytest.raises(InputError, match="attn_head"):
        heads_figure(summary.loc[summary["component"] == "ffn"])


def test_cli_profile_heads_then_plot_kind_heads_and_all(tmp_path, stories, capsys):
    model, tok = stories
    assert main(["profile", "--components", "attn_head,ffn", "--out", str(tmp_path / "h"), "--quiet"]) == 0
    assert "attn_head" in load_run(tmp_path / "h").meta["components"]
    profile(model, tok, RECORDS[:2], components=("attn", "ffn"), out_dir=tmp_path / "p", progress=False)
    assert "heads" in KINDS
    assert main(["plot", str(tmp_path / "h"), "--kind", "heads", "--stat", "entropy"]) == 0
    assert {p.name for p in (tmp_path / "h" / "figures").iterdir()} == {"heads.png", "heads.pdf"}
    names = {p.name for p in plot_runs([tmp_path / "p"], tmp_path / "all")}
    assert names and not any(n.startswith("heads") for n in names)
    with pytest.raises(InputError, match="attn_head"):
        plot_runs([tmp_path / "p"], tmp_path / "x", kinds=["heads"])
