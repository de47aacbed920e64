"""Every statistic of the one-pass engine against float64 full-softmax references, properties, chunking,
stacking and linearity (profile-level checks on real models are in test_profile.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers_stats import check_stats, reference_stats
from hypothesis import given, settings
from hypothesis import strategies as st

from internal_policy.entropy import Decoder
from internal_policy.errors import InputError
from internal_policy.models import describe
from internal_policy.stats import SCALAR, decode, resolve

ALPHAS = (0.5, 2.0, 3.0, math.inf)
ALL = resolve(["all"], ALPHAS, topk=3)


def logits64(x, w, b=None, norm=None, scale=1.0, softcap=None):
    """Float64 logits row by row, the readout written out: norm, matmul, bias, scale, soft-cap."""
    h = norm(x.float()).double() if norm is not None else x.double()
    z = h @ w.double().T + (0 if b is None else b.double())
    z = z * scale
    return torch.tanh(z / softcap) * softcap if softcap else z


def problem(seed, n, d, v, spread):
    g = torch.Generator().manual_seed(seed)
    x, x_out = torch.randn(n, d, generator=g) * spread, torch.randn(n, d, generator=g) * spread
    w, b = torch.randn(v, d, generator=g), torch.randn(v, generator=g)
    y = torch.randint(-1, v, (n,), generator=g)
    return x, x_out, w, b, y


def as_numpy(values: dict) -> dict:
    return {k: v.numpy() for k, v in values.items()}


dims = st.tuples(st.integers(1, 12), st.integers(1, 16), st.integers(2, 160))


@settings(max_examples=25, deadline=None)
@given(dims, st.integers(1, 4), st.integers(1, 40), st.integers(2, 97), st.floats(0.1, 20.0), st.integers(0, 2**31 - 1))
def test_every_statistic_of_stacked_sites_equals_float64_full_softmax(shape, n_sites, token_chunk, vocab_chunk,
                                                                       spread, seed):
    """Several sites stacked, token and vocabulary chunks of any size, a reference and missing targets."""
    n, d, v = shape
    x, x_out, w, b, y = problem(seed, n, d, v, spread)
    rows = {f"s{i}": x * (1 + i) - i for i in range(n_sites)}
    dec = Decoder(w, b, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    found = decode(dec, rows, ALL, targets=y, reference=(dec, x_out))
    z_out = logits64(x_out, w, b)
    for key, h in rows.items():
        check_stats(as_numpy(found[key]), reference_stats(logits64(h, w, b), y, z_out, ALPHAS, k=min(3, v)),
                    per_logit=1e-5)
    unchunked = Decoder(w, b, token_chunk=n * (n_sites + 1), vocab_chunk=v)
    whole = decode(unchunked, rows, ALL, targets=y, reference=(unchunked, x_out))
    for key, h in rows.items():
        scale = torch.maximum(logits64(h, w, b).abs().amax(-1), z_out.abs().amax(-1)).numpy()
        for column, values in found[key].items():
            if column not in ("rank", "top1_agree", "topk_ids"):
                got, want = values.numpy().astype(float), whole[key][column].numpy().astype(float)
                assert (np.isnan(got) == np.isnan(want)).all(), column
                ok = ~np.isnan(want)
                row_scale = scale if got.ndim == 1 else scale[:, None]
                tol = 1e-4 + 5e-6 * np.abs(want) + 1e-5 * row_scale * (got.ndim == 1)
                excess = (np.abs(got - want) - tol)[ok]
                assert excess.max(initial=0) <= 0, (column, np.abs(got - want)[ok].max())


@settings(max_examples=30, deadline=None)
@given(dims, st.integers(2, 97), st.floats(0.1, 30.0), st.integers(0, 2**31 - 1))
def test_properties(shape, vocab_chunk, spread, seed):
    """renyi2 ≤ entropy ≤ ln|V|; min-entropy ≤ renyi2; KL ≥ 0 and KL(p‖p) = 0; rank ≥ 1, = 1 iff z_y is the max."""
    n, d, v = shape
    x, x_out, w, b, y = problem(seed, n, d, v, spread)
    y = y.clamp(min=0)
    dec = Decoder(w, b, vocab_chunk=vocab_chunk)
    s = dec.statistics(x, ALL, targets=y, reference=(dec, x_out))
    eps = 1e-4
    assert (s["renyi2"] <= s["entropy"] + eps).all() and (s["entropy"] <= math.log(v) + eps).all()
    assert (s["renyiinf"] <= s["renyi2"] + eps).all() and (s["renyi3"] <= s["renyi2"] + eps).all()
    assert (s["renyi2"] <= s["renyi0.5"] + eps).all() and (s["renyiinf"] >= -eps).all()
    assert (s["kl_out"] >= -eps).all()
    same = dec.statistics(x, ALL, targets=y, reference=(dec, x))
    assert same["kl_out"].abs().max() <= eps and (same["top1_agree"] == 1).all()
    z = logits64(x, w, b)
    zy = z.gather(1, y[:, None])[:, 0]
    margin = (z - zy[:, None]).abs().scatter(1, y[:, None], math.inf).min(1).values
    clear = margin > 1e-4
    assert (s["rank"] >= 1).all()
    is_max = (z.max(1).values <= zy)
    assert ((s["rank"] == 1) == is_max)[clear].all()
    assert torch.allclose(s["nll"][s["rank"] == 1], (-torch.log_softmax(z, 1).max(1).values)[s["rank"] == 1].float(),
                          atol=1e-4)


@given(st.integers(2, 3000))
@settings(max_examples=15, deadline=None)
def test_uniform_logits(v):
    """All logits equal: every entropy is ln|V|, KL to a uniform output 0, rank 1 for any target.

    (No logit is larger than the target's.)"""
    dec = Decoder(torch.randn(v, 8), vocab_chunk=333)
    s = dec.statistics(torch.zeros(3, 8), ALL, targets=torch.tensor([0, v - 1, -1]), reference=(dec, torch.zeros(3, 8)))
    for name in ("entropy", "renyi0.5", "renyi2", "renyiinf"):
        np.testing.assert_allclose(s[name].numpy(), math.log(v), rtol=1e-5)
    np.testing.assert_allclose(s["nll"][:2].numpy(), math.log(v), rtol=1e-5)
    assert s["rank"][:2].tolist() == [1, 1] and math.isnan(s["rank"][2]) and math.isnan(s["nll"][2])
    assert s["kl_out"].abs().max() < 1e-5


def test_final_norm_readout_matches_reference():
    """Norm, scale, soft-cap and bias on both the sites and the reference, as --final-norm decodes them."""
    g = torch.Generator().manual_seed(0)
    x, x_out = torch.randn(13, 16, generator=g) * 5, torch.randn(13, 16, generator=g) * 5
    w, b = torch.randn(101, 16, generator=g), torch.randn(101, generator=g)
    y = torch.randint(-1, 101, (13,), generator=g)
    norm = torch.nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0, generator=g)
    dec = Decoder(w, b, norm=norm, scale=0.5, softcap=3.0, token_chunk=5, vocab_chunk=17)
    found = dec.statistics(x, ALL, targets=y, reference=(dec, x_out))
    z, z_out = (logits64(h, w, b, norm, 0.5, 3.0) for h in (x, x_out))
    check_stats(as_numpy(found), reference_stats(z, y, z_out, ALPHAS, k=3))


def test_linear_sums_equal_decoding_the_summed_rows():
    """Sites given as sums of others' logits (bias added once) equal decoding the summed hidden rows."""
    g = torch.Generator().manual_seed(1)
    h0, a, f = (torch.randn(9, 12, generator=g) * 3 for _ in range(3))
    w, b = torch.randn(200, 12, generator=g), torch.randn(200, generator=g) * 2
    y = torch.randint(-1, 200, (9,), generator=g)
    dec = Decoder(w, b, token_chunk=7, vocab_chunk=33)
    ref = (dec, h0 - f)
    summed = decode(dec, {"h0": h0, "a": a, "f": f}, ALL, targets=y, reference=ref,
                    sums={"mid": ("h0", "a"), "h1": ("mid", "f"), "h1b": ("h0", "a", "f")})
    plain = decode(dec, {"mid": h0 + a, "h1": h0 + a + f}, ALL, targets=y, reference=ref)
    for key, rows in (("mid", h0 + a), ("h1", h0 + a + f), ("h1b", h0 + a + f)):
        check_stats(as_numpy(summed[key]), reference_stats(logits64(rows, w, b), y, logits64(h0 - f, w, b),
                                                           ALPHAS, k=3))
        for column in ("entropy", "nll", "kl_out", "renyi2"):
            np.testing.assert_allclose(summed[key][column].numpy(), plain[key if key != "h1b" else "h1"][column]
                                       .numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="raw decoding"):
        decode(Decoder(w, b, scale=2.0), {"a": a, "f": f}, ALL[:1], sums={"s": ("a", "f")})


def test_entropy_fast_path_and_half_precision():
    """Decoder.entropy is the engine with entropy alone; bf16 inputs accumulate in fp32."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(64, 32, generator=g) * 3, torch.randn(4000, 32, generator=g)
    dec = Decoder(w.bfloat16(), vocab_chunk=1000)
    s = dec.statistics(x.bfloat16(), resolve(["nll", "renyi2"]), targets=torch.arange(64))
    ref = reference_stats(logits64(x.bfloat16(), w.bfloat16()), torch.arange(64))
    check_stats(as_numpy(s), {k: ref[k] for k in ("entropy", "nll", "renyi2")})
    assert torch.equal(dec.entropy(x.bfloat16()), s["entropy"])


@pytest.mark.parametrize("arch, what", [("gemma2", "soft-cap"), ("cohere", "logit scale"), ("phi", "bias")])
def test_output_readout_is_the_models_logits(arch, what, tiny):
    """z_out = Decoder.output_of(spec) applied to the raw H_L is model(...).logits, soft-cap/scale/bias included."""
    from internal_policy.capture import extract

    model, _ = tiny(arch)
    spec = describe(model)
    assert {"soft-cap": spec.logit_softcap, "logit scale": spec.logit_scale != 1.0,
            "bias": spec.unembed_bias is not None}[what]
    ids = torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(3))
    h = extract(model, ids, components=("layer",))[(spec.n_layers, "layer")]
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(Decoder.output_of(spec).logits(h), logits, atol=1e-5, rtol=1e-5)


def test_names_orders_and_bad_requests():
    names = [s.name for s in resolve(["all"], [0.5, math.inf], topk=4)]
    assert names == ["entropy", "renyi0.5", "renyi2", "renyiinf", "nll", "rank", "kl_out", "top1_agree", "topk"]
    assert [s.name for s in resolve(["renyi2", "nll"])] == ["entropy", "renyi2", "nll"]
    assert set(SCALAR) <= set(names)
    for bad, message in ((["renyi1"], "Shannon entropy"), (["renyi-2"], "α > 0"), (["renyix"], "not a number"),
                         (["perplexity"], "unknown statistic")):
        with pytest.raises(InputError, match=message):
            resolve(bad)
    with pytest.raises(InputError, match="--topk must be between 1 and 20"):
        resolve([], topk=21)
