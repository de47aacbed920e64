"""Profiling runs against an independent per-record float64 computation, and run-folder mechanics."""

import importlib
import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import assert_records_match_tokens
from helpers_stats import check_stats, reference_stats

from internal_policy.data import tokenize_records
from internal_policy.entropy import Decoder
from internal_policy.errors import InputError
from internal_policy.lens_bridge import boot_bridge, extract_with_bridge
from internal_policy.models import default_model_path, describe
from internal_policy.profile import load_run, profile

RECORDS = [
    {"id": "a", "text": "Once upon a time, there was a little dog who liked to run."},
    {"id": "b", "text": "Lily had a red ball."},
    {"id": "c", "prompt": "Tom saw a big", "response": " tree in the park and he climbed it."},
    {"id": "d", "prompt": "The sun was", "response": " hot."},
    {"id": "e", "text": "One day, a cat and a bird became friends and played together in the garden all day long."},
]
KEY = ["record_id", "position", "layer", "component"]
profile_module = importlib.import_module("internal_policy.profile")  # the module (the package exports the function)
STATS = dict(stats=["all"], renyi_alpha=[0.5, math.inf], topk=3)
"""Every statistic: the scalar ones, three Rényi orders and the top 3."""


def _logits64(h, spec, final_norm=False):
    """Float64 logits of rows h written out: optional final norm (fp32 module), W_U, bias, scale, soft-cap."""
    x = spec.final_norm(h.float()).double() if final_norm else h.double()
    z = x @ spec.unembed_weight.double().T + (0 if spec.unembed_bias is None else spec.unembed_bias.double())
    if final_norm:
        z = z * spec.logit_scale
        z = torch.tanh(z / spec.logit_softcap) * spec.logit_softcap if spec.logit_softcap else z
    return z.detach()


def _cos64(a, b):
    """Cosine of matching rows; 0 where either row is the zero vector (as documented in row_cosine).

    This happens for real: OLMo embeds its pad id (= BOS here) as zeros, so its BOS stream is all zero."""
    a, b = a.double(), b.double()
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(norms > 0, (a * b).sum(-1) / norms.clamp_min(1e-300), 0.0)


def hf_hook_sites(model, ids):
    """Plain HF forward hooks on a Llama-layout model (independent of internal_policy.capture)."""
    sites, layers = {}, model.model.layers
    def embedding(module, args, kwargs):
        sites[(0, "layer")] = (args or [kwargs["hidden_states"]])[0]

    hooks = [layers[0].register_forward_pre_hook(embedding, with_kwargs=True)]
    for i, blk in enumerate(layers):
        l = i + 1
        hooks += [
            blk.input_layernorm.register_forward_hook(lambda m, a, o, l=l: sites.__setitem__((l, "attn_in"), o)),
            blk.self_attn.register_forward_hook(lambda m, a, o, l=l: sites.__setitem__((l, "attn"), o[0])),
            blk.post_attention_layernorm.register_forward_hook(
                lambda m, a, o, l=l: sites.__setitem__((l, "ffn_in"), o)),
            blk.mlp.register_forward_hook(lambda m, a, o, l=l: sites.__setitem__((l, "ffn"), o)),
            blk.register_forward_hook(
                lambda m, a, o, l=l: sites.__setitem__((l, "layer"), o[0] if isinstance(o, tuple) else o)),
        ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    for l in range(1, len(layers) + 1):
        sites[(l, "resid_mid")] = sites[(l - 1, "layer")] + sites[(l, "attn")]
    return sites


def reference_tokens(model, tokenizer, records, sites_of, final_norm=False, stats=False):
    """One record at a time, no padding, full float64 softmax per kept position; with `stats`, every
    statistic of STATS (z_out = the model's own logits, y = the next token) in `ref_<name>` columns."""
    spec = describe(model)
    frames = []
    for ex in tokenize_records(records, tokenizer):
        ids = torch.tensor([ex.input_ids])
        sites = {k: v[0, ex.start : ex.stop] for k, v in sites_of(ids).items()}
        with torch.no_grad():
            z_out = model(ids).logits[0, ex.start : ex.stop].double()
        y = torch.tensor([ex.input_ids[p + 1] if p + 1 < len(ex.input_ids) else -1 for p in range(ex.start, ex.stop)])
        found = {k: reference_stats(_logits64(v, spec, final_norm), y, z_out, STATS["renyi_alpha"] + [2.0],
                                    STATS["topk"]) for k, v in sites.items()}
        for (layer, comp), values in found.items():
            h = values["entropy"]
            delta = cos = np.full_like(h, np.nan)
            if comp == "layer" and layer > 0:
                delta = h - found[(layer - 1, "layer")]["entropy"]
            if comp in ("attn", "ffn"):
                delta = h - found[(layer, comp + "_in")]["entropy"]
                other = sites[(layer - 1, "layer")] if comp == "attn" else sites[(layer, "resid_mid")]
                cos = _cos64(sites[(layer, comp)], other).numpy()
            frame = pd.DataFrame({"record_id": ex.record_id, "position": np.arange(ex.start, ex.stop), "layer": layer,
                                  "component": comp, "entropy": h, "delta": delta, "cos_resid": cos})
            if stats:
                for name, v in values.items():
                    frame[f"ref_{name}"] = list(v) if v.ndim > 1 else v
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def assert_stats_match(ours, ref):
    """Every statistic column of `ours` against the reference's `ref_<name>` columns (helpers_stats.check_stats)."""
    merged = ref.merge(ours, on=KEY, suffixes=("_ref", ""))
    assert len(merged) == len(ref) == len(ours)
    names = [c.removeprefix("ref_") for c in ref.columns if c.startswith("ref_")]
    check_stats({c: merged[c].to_numpy() for c in merged.columns},
                {n: np.stack(merged[f"ref_{n}"].to_list()) if n.startswith("topk_") and n != "topk_clear"
                 else merged[f"ref_{n}"].to_numpy() for n in names})


def assert_tokens_match(ours, ref, atol=1e-4):
    merged = ref.merge(ours, on=KEY, how="outer", suffixes=("_ref", ""), indicator=True)
    assert (merged["_merge"] == "both").all(), merged[merged["_merge"] != "both"].head()
    for col in ("entropy", "delta", "cos_resid"):
        a, b = merged[col].to_numpy(float), merged[col + "_ref"].to_numpy(float)
        assert (np.isnan(a) == np.isnan(b)).all(), col
        ok = ~np.isnan(a)
        assert np.abs(a[ok] - b[ok]).max() <= atol, (col, np.abs(a[ok] - b[ok]).max())


def test_stories_matches_plain_hf_hooks(stories):
    model, tok = stories
    res = profile(model, tok, RECORDS, batch_size=3, progress=False)
    ref = reference_tokens(model, tok, RECORDS, lambda ids: hf_hook_sites(model, ids))
    assert_tokens_match(res.tokens, ref)
    assert set(res.tokens.columns) == {*KEY, "token_id", "token", "entropy", "delta", "cos_resid"}


def test_stories_every_statistic_raw_and_final_norm(stories):
    """stories260K, batched with padding: all statistics of all sites (raw), and of H_l with the final norm."""
    model, tok = stories
    ref = reference_tokens(model, tok, RECORDS, lambda ids: hf_hook_sites(model, ids), stats=True)
    res = profile(model, tok, RECORDS, batch_size=3, progress=False, **STATS)
    assert_stats_match(res.tokens, ref)
    lens = reference_tokens(model, tok, RECORDS, lambda ids: hf_hook_sites(model, ids), final_norm=True, stats=True)
    res = profile(model, tok, RECORDS, batch_size=3, components=["layer"], final_norm=True, progress=False, **STATS)
    assert_stats_match(res.tokens, lens[lens["component"] == "layer"])


def test_every_architecture_matches_bridge_reference(arch, tiny, tiny_model_dir):
    """Sites from TransformerLens' bridge, one record at a time, float64: entropy, ΔH and cosines of all
    components, every statistic raw (linear path) and, with the final norm, of the layer outputs."""
    model, tok = tiny(arch)
    bridge = boot_bridge(tiny_model_dir(arch))
    res = profile(model, tok, RECORDS, batch_size=2, progress=False, **STATS)
    ref = reference_tokens(model, tok, RECORDS, lambda ids: extract_with_bridge(bridge, ids), stats=True)
    assert_tokens_match(res.tokens, ref[KEY + ["entropy", "delta", "cos_resid"]])
    assert_stats_match(res.tokens, ref)
    lens = profile(model, tok, RECORDS, batch_size=2, components=["layer"], final_norm=True, progress=False, **STATS)
    ref = reference_tokens(model, tok, RECORDS, lambda ids: extract_with_bridge(bridge, ids), final_norm=True,
                           stats=True)
    assert_stats_match(lens.tokens, ref[ref["component"] == "layer"])


def test_stories_reference_values(stories):
    """Raw-decoding entropies of stories260K, recorded when the embedded model was added (fp32, CPU)."""
    model, tok = stories
    text = [{"text": "The little girl was happy because she found her red ball in the park."}]
    res = profile(model, tok, text, components=["layer"], progress=False)
    layers = res.summary.set_index("layer")["entropy"]
    assert res.meta["n_tokens"] == 28
    np.testing.assert_allclose(layers.to_numpy(), [5.440, 4.229, 3.982, 3.593, 2.775, 1.508], atol=6e-4)
    lens = profile(model, tok, text, components=["layer"], final_norm=True, progress=False)
    assert abs(lens.summary["entropy"].iloc[-1] - 1.324) < 6e-4


@pytest.mark.parametrize("arch, linear, per_layer", [("llama", False, 6), ("llama", True, 4), ("olmo2", False, 4),
                                                     ("olmo2", True, 2), ("phi", False, 5), ("phi", True, 3)])
def test_each_unique_tensor_is_decoded_once(arch, linear, per_layer, tiny, monkeypatch):
    """Unembedding rows multiplied per kept token: H_l once as output and input; OLMo2's attn_in is H_{l-1}
    and ffn_in is resid_mid; Phi-2's FFN shares the attention's norm; with linearity resid_mid and H_l
    are sums of other sites' logits (no matmul); kl_out adds the output's rows once, not once per site."""
    model, tok = tiny(arch)
    rows = []
    real = Decoder.matmul
    monkeypatch.setattr(Decoder, "matmul", lambda self, x, w, start, stop, out=None: (
        rows.append(len(x)) if start == 0 else None, real(self, x, w, start, stop, out))[1])
    res = profile(model, tok, RECORDS, batch_size=len(RECORDS), linear=linear, progress=False)
    n_layers, n = describe(model).n_layers, res.meta["n_tokens"]
    assert sum(rows) == (1 + per_layer * n_layers) * n
    s = res.summary.set_index(["layer", "component"])["entropy"]
    if arch == "olmo2":
        assert s[(2, "attn_in")] == s[(1, "layer")] and s[(2, "ffn_in")] == s[(2, "resid_mid")]
    rows.clear()
    profile(model, tok, RECORDS, batch_size=len(RECORDS), linear=linear, stats=["kl_out"], progress=False)
    assert sum(rows) == (2 + per_layer * n_layers) * n


def test_padded_batches_equal_one_at_a_time(tiny):
    model, tok = tiny("gpt2")
    assert tok.pad_token is None  # the stories260K tokenizer has none: padding uses eos under the mask
    one = profile(model, tok, RECORDS, batch_size=1, progress=False).tokens
    many = profile(model, tok, RECORDS, batch_size=5, progress=False).tokens
    assert_tokens_match(many, one, atol=1e-4)


def test_pad_id_inside_a_record_is_attended(stories):
    """eos doubles as pad (no pad token) and also sits inside records, like Llama-3's <|eot_id|> between turns:
    only the padding may be masked, so padded batches equal plain unmasked forwards of each record."""
    model, tok = stories
    eos = tok.eos_token_id
    records = [{"id": "turns", "text": "Lily had a red ball.</s>Tom ran to the park and played with it."},
               {"id": "ids", "prompt_ids": [1, 403, eos, 407, eos], "response_ids": [261, eos, 378]},
               {"id": "short", "text": "A cat."}]
    assert tok.pad_token is None and all(eos in e.input_ids[1:-1] for e in tokenize_records(records[:2], tok))
    res = profile(model, tok, records, batch_size=3, progress=False)
    ref = reference_tokens(model, tok, records, lambda ids: hf_hook_sites(model, ids))
    assert_tokens_match(res.tokens, ref)


def test_summary_is_the_token_mean(stories):
    model, tok = stories
    res = profile(model, tok, RECORDS, progress=False)
    by_site = res.tokens.groupby(["layer", "component"])
    for row in res.summary.itertuples():
        group = by_site.get_group((row.layer, row.component))
        assert row.n_tokens == len(group)
        assert math.isclose(row.entropy, group["entropy"].mean(), abs_tol=1e-6)
        assert math.isclose(row.entropy_std, group["entropy"].std(ddof=0), abs_tol=1e-5)
        assert math.isclose(row.entropy_se, row.entropy_std / math.sqrt(row.n_tokens), rel_tol=1e-9)
        if row.component in ("attn", "ffn") or (row.component == "layer" and row.layer > 0):
            assert math.isclose(row.delta, group["delta"].mean(), abs_tol=1e-6)
        else:
            assert math.isnan(row.delta)
    n_layers = describe(model).n_layers
    assert len(res.summary) == 1 + 6 * n_layers


def test_prompt_response_positions(stories):
    model, tok = stories
    rec = {"id": "pr", "prompt": "Lily looked at the", "response": " big tree."}
    prompt_ids = tok(rec["prompt"])["input_ids"]
    response_ids = tok(rec["response"], add_special_tokens=False)["input_ids"]
    assert prompt_ids[0] == tok.bos_token_id
    res = profile(model, tok, [rec], components=["layer"], progress=False)
    positions = sorted(res.tokens["position"].unique())
    assert positions == list(range(len(prompt_ids) - 1, len(prompt_ids) + len(response_ids) - 1))
    ids = prompt_ids + response_ids
    assert [ids[p + 1] for p in positions] == response_ids


@pytest.mark.parametrize("arch, component", [("llama", "ffn"), ("olmo2", "attn"), ("olmo2", "ffn")])
def test_component_subset_keeps_deltas(arch, component, tiny):
    """A subset still decodes the inputs its ΔH needs, also where that input is an alias (OLMo2)."""
    model, tok = tiny(arch)
    full = profile(model, tok, RECORDS, progress=False).summary
    part = profile(model, tok, RECORDS, components=[component], progress=False).summary
    assert set(part["component"]) == {component}
    merged = part.merge(full, on=["layer", "component"], suffixes=("", "_full"))
    np.testing.assert_allclose(merged["delta"], merged["delta_full"], atol=1e-6)  # sums vs matmuls: rounding


def test_token_sample_is_a_subset_with_standard_errors(stories):
    model, tok = stories
    full = profile(model, tok, RECORDS, progress=False)
    half = profile(model, tok, RECORDS, token_sample=0.5, seed=3, progress=False)
    assert half.meta["n_tokens"] < full.meta["n_tokens"]
    kept = full.tokens.set_index(KEY).index.isin(half.tokens.set_index(KEY).index)
    assert_tokens_match(half.tokens, full.tokens[kept])
    s = half.summary
    np.testing.assert_allclose(s["entropy_se"], s["entropy_std"] / np.sqrt(s["n_tokens"]))


def test_interrupted_run_resumes_to_identical_results(stories, tmp_path, monkeypatch):
    model, tok = stories
    records = [{"id": f"r{i}", "text": r.get("text", "Once upon a time") + f" Day {i}."}
               for i, r in enumerate(RECORDS * 2)]
    whole = profile(model, tok, records, batch_size=2, out_dir=tmp_path / "whole", progress=False)

    calls = {"n": 0}
    real = profile_module.decode

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(profile_module, "decode", flaky)
    with pytest.raises(KeyboardInterrupt):
        profile(model, tok, records, batch_size=2, out_dir=tmp_path / "cut", progress=False)
    done = list((tmp_path / "cut" / "shards").glob("*.done"))
    assert len(done) == 2 and not (tmp_path / "cut" / "summary.csv").exists()
    with pytest.raises(Exception, match="--resume"):
        profile(model, tok, records, batch_size=2, out_dir=tmp_path / "cut", progress=False)
    calls["n"] = -100
    resumed = profile(model, tok, records, batch_size=2, out_dir=tmp_path / "cut", resume=True, progress=False)
    assert calls["n"] == -100 + 5 - len(done)  # one decoding pass per unfinished batch
    pd.testing.assert_frame_equal(resumed.summary, whole.summary, check_exact=False, atol=1e-12, rtol=0)
    pd.testing.assert_frame_equal(resumed.tokens, whole.tokens)
    pd.testing.assert_frame_equal(load_run(tmp_path / "cut").summary, load_run(tmp_path / "whole").summary)
    pd.testing.assert_frame_equal(load_run(tmp_path / "cut").records, whole.records)  # per-record sums: shard by shard
    assert_records_match_tokens(load_run(tmp_path / "cut").records, whole.tokens)
    with pytest.raises(InputError, match=r"settings differ .* --final-norm \(off -> on\)"):
        profile(model, tok, records, final_norm=True, out_dir=tmp_path / "cut", resume=True, progress=False)


def _rank_main(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from internal_policy.models import load_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model, tok = load_model()
    profile(model, tok, RECORDS, batch_size=2, out_dir=out_dir, progress=False)
    dist.destroy_process_group()


def test_two_process_merge_equals_single_process(stories, tmp_path):
    """Rank 0 profiles records a, c, e in batches of 2 and 1, rank 1 b, d in one batch: three shards of unequal
    size, merged by summing; the single-process reference is one batch of all five."""
    import torch.multiprocessing as mp

    model, tok = stories
    single = profile(model, tok, RECORDS, batch_size=len(RECORDS), progress=False)
    mp.spawn(_rank_main, args=(2, str(tmp_path / "pg"), str(tmp_path / "run")), nprocs=2, join=True)
    merged = load_run(tmp_path / "run")
    assert merged.meta["n_records"] == len(RECORDS) and merged.meta["world_size"] == 2
    assert len(list((tmp_path / "run" / "shards").glob("*.done"))) == 3
    assert (merged.summary["n_tokens"] == merged.tokens.groupby(["layer", "component"]).size().max()).all()
    # ranks batch records differently, so per-token values differ by float rounding only
    means = [c for c in single.summary.columns if not c.endswith(("_sum", "_sumsq"))]
    pd.testing.assert_frame_equal(merged.summary[means], single.summary[means], check_exact=False, atol=1e-6, rtol=0)
    assert_tokens_match(merged.tokens, single.tokens, atol=1e-5)
    assert_records_match_tokens(merged.records, merged.tokens)
    by_site = merged.tokens.groupby(["layer", "component"], sort=False)["entropy"]
    np.testing.assert_allclose(merged.summary["entropy"], by_site.mean().reindex(
        pd.MultiIndex.from_frame(merged.summary[["layer", "component"]])).to_numpy(), atol=1e-6)


def test_accelerate_dispatched_model_profiles_the_same(stories, tmp_path):
    """A device_map model (accelerate hooks; two blocks offloaded to disk) gives the same entropies."""
    from transformers import AutoModelForCausalLM

    model, tok = stories
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "disk" if i in (1, 2) else "cpu" for i in range(describe(model).n_layers)}}
    dispatched = AutoModelForCausalLM.from_pretrained(default_model_path(), device_map=device_map, dtype=torch.float32,
                                                      offload_folder=str(tmp_path)).eval()
    assert set(dispatched.hf_device_map.values()) == {"cpu", "disk"}
    whole = profile(model, tok, RECORDS, progress=False)
    split = profile(dispatched, tok, RECORDS, progress=False)
    pd.testing.assert_frame_equal(split.summary, whole.summary, check_exact=False, atol=1e-6, rtol=0)


def test_hidden_budget_splits_forwards_without_changing_results(stories, monkeypatch):
    """A budget of ~6 kept tokens per forward: batches run as several forwards and long records as prefixes
    ending at their kept positions; every statistic equals the one-forward run up to float rounding."""
    model, tok = stories
    whole = profile(model, tok, RECORDS, batch_size=5, progress=False, **STATS)
    forwards = []
    real = profile_module.decode
    monkeypatch.setattr(profile_module, "decode",
                        lambda *a, **k: (forwards.append(len(k["targets"])), real(*a, **k))[1])
    per_token = (1 + 4 * describe(model).n_layers + 1) * describe(model).d_model * 4  # direct sites + output, fp32
    split = profile(model, tok, RECORDS, batch_size=5, hidden_budget_mb=6 * per_token / 2**20, progress=False, **STATS)
    assert max(forwards) == 6 and sum(forwards) == whole.meta["n_tokens"] and len(forwards) >= 10
    scalars = [c for c in whole.tokens.columns if whole.tokens[c].dtype.kind == "f"]
    pd.testing.assert_frame_equal(split.tokens[scalars], whole.tokens[scalars], check_exact=False, atol=1e-5, rtol=0)
    assert split.tokens["topk_ids"].map(list).equals(whole.tokens["topk_ids"].map(list))
