"""The chunked entropy engine against a float64 full-softmax computation and known properties."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from internal_policy.entropy import Decoder, entropy_from_logits, row_cosine


def reference_entropy(x, w, b=None, norm=None, scale=1.0, softcap=None):
    """Plain float64 loop: one full softmax per row."""
    out = []
    for row in x.double():
        h = norm(row.float()).double() if norm is not None else row
        z = h @ w.double().T
        if b is not None:
            z = z + b.double()
        z = z * scale
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        p = torch.softmax(z, dim=-1)
        out.append(-(p * torch.log(p.clamp_min(1e-300))).sum().item())
    return torch.tensor(out, dtype=torch.float64)


dims = st.tuples(st.integers(1, 40), st.integers(1, 24), st.integers(2, 300))


@settings(max_examples=40, deadline=None)
@given(dims, st.integers(1, 17), st.integers(1, 97), st.floats(0.1, 30.0), st.integers(0, 2**31 - 1))
def test_chunked_equals_full_softmax_and_is_bounded(shape, token_chunk, vocab_chunk, spread, seed):
    n, d, v = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * spread
    w = torch.randn(v, d, generator=g)
    b = torch.randn(v, generator=g)
    dec = Decoder(w, b, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    h = dec.entropy(x)
    assert h.dtype == torch.float32
    ref = reference_entropy(x, w, b)
    np.testing.assert_allclose(h.double().numpy(), ref.numpy(), atol=1e-4, rtol=0)
    assert (h >= -1e-5).all() and (h <= math.log(v) + 1e-4).all()
    unchunked = Decoder(w, b, token_chunk=n, vocab_chunk=v).entropy(x)
    np.testing.assert_allclose(h.numpy(), unchunked.numpy(), atol=1e-4)


@given(st.integers(2, 5000))
@settings(max_examples=20, deadline=None)
def test_uniform_logits_give_log_vocab(v):
    dec = Decoder(torch.randn(v, 8), vocab_chunk=333)
    h = dec.entropy(torch.zeros(3, 8))
    np.testing.assert_allclose(h.numpy(), math.log(v), rtol=1e-6)


@given(st.integers(2, 2000), st.integers(0, 10**6))
@settings(max_examples=20, deadline=None)
def test_one_dominant_logit_gives_zero(v, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(v, 4)
    hot = int(torch.randint(v, (1,), generator=g))
    w[hot, 0] = 1.0
    h = Decoder(w, vocab_chunk=77).entropy(torch.tensor([[500.0, 0, 0, 0]]))
    assert 0 <= h.item() < 1e-6


def test_norm_scale_softcap_and_bias_match_reference():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(13, 16, generator=g) * 5, torch.randn(101, 16, generator=g), torch.randn(101, generator=g)
    norm = torch.nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0, generator=g)
    dec = Decoder(w, b, norm=norm, scale=0.5, softcap=3.0, token_chunk=5, vocab_chunk=17)
    ref = reference_entropy(x, w, b, norm=norm, scale=0.5, softcap=3.0)
    np.testing.assert_allclose(dec.entropy(x).double().numpy(), ref.numpy(), atol=1e-5)
    full = entropy_from_logits(dec.logits(x)).detach()
    np.testing.assert_allclose(full.double().numpy(), ref.numpy(), atol=1e-5)


def test_half_precision_inputs_accumulate_in_fp32():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(64, 32, generator=g) * 3, torch.randn(4000, 32, generator=g)
    h16 = Decoder(w.bfloat16(), vocab_chunk=1000).entropy(x.bfloat16())
    ref = reference_entropy(x.bfloat16().float(), w.bfloat16().float())
    assert h16.dtype == torch.float32
    np.testing.assert_allclose(h16.double().numpy(), ref.numpy(), atol=1e-4)


def test_leading_dims_are_kept():
    dec = Decoder(torch.randn(50, 8))
    assert dec.entropy(torch.randn(2, 3, 8)).shape == (2, 3)


def test_row_cosine_matches_formula():
    a, b = torch.randn(7, 5), torch.randn(7, 5)
    ref = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    np.testing.assert_allclose(row_cosine(a, b).numpy(), ref.numpy(), atol=1e-6)
    np.testing.assert_allclose(row_cosine(a, 2 * a).numpy(), 1.0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_weights_fp32_out_matmul_match_float64():
    """On CUDA, bf16 weights are decoded by a matmul that writes fp32 logits: exact bf16 products, fp32
    sums, so the entropy matches a float64 computation on the same bf16 values (bf16 logits: ~0.2 nats off)."""
    g = torch.Generator().manual_seed(3)
    spread = torch.linspace(0.1, 4.0, 300)[:, None]  # entropies from ~0 to ~10 nats
    x = torch.randn(300, 64, generator=g) * spread
    w, b = torch.randn(40_000, 64, generator=g), torch.randn(40_000, generator=g)
    x16, w16, b16 = x.bfloat16(), w.bfloat16(), b.bfloat16()
    dec = Decoder(w16.cuda(), b16.cuda(), token_chunk=128)  # default vocabulary chunks: 2 of them on CUDA
    h = dec.entropy(x16.cuda())
    assert dec._fp32_out and h.dtype == torch.float32 and h.device.type == "cuda"
    ref = reference_entropy(x16.double(), w16.double(), b16.double())
    np.testing.assert_allclose(h.cpu().double().numpy(), ref.numpy(), atol=2e-4, rtol=0)
    assert (h >= -1e-5).all() and (h <= math.log(40_000) + 1e-4).all()
