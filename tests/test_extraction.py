"""Residual decomposition on every supported architecture, checked against TransformerLens and HF."""

import pytest
import torch

from internal_policy.capture import COMPONENTS, extract, forward_until
from internal_policy.entropy import Decoder, entropy_from_logits
from internal_policy.lens_bridge import boot_bridge, extract_with_bridge
from internal_policy.models import UnsupportedModelError, describe


def _ids(seed=0, shape=(2, 11)):
    return torch.randint(3, 512, shape, generator=torch.Generator().manual_seed(seed))


def test_residual_adds_up(arch, tiny):
    model, _ = tiny(arch)
    found = extract(model, _ids())
    spec = describe(model)
    assert set(found) == {(0, "layer")} | {(l, c) for l in range(1, spec.n_layers + 1) for c in COMPONENTS}
    for l in range(1, spec.n_layers + 1):
        h_prev, a, f, h = found[(l - 1, "layer")], found[(l, "attn")], found[(l, "ffn")], found[(l, "layer")]
        torch.testing.assert_close(h_prev + a + f, h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(found[(l, "resid_mid")], h_prev + a, atol=1e-6, rtol=0)


def test_hf_hooks_agree_with_transformerlens_bridge(arch, tiny, tiny_model_dir):
    model, _ = tiny(arch)
    ids = _ids(1)
    ours = extract(model, ids)
    theirs = extract_with_bridge(boot_bridge(tiny_model_dir(arch)), ids)
    assert set(ours) == set(theirs)
    for site in ours:
        scale = theirs[site].abs().max().item() + 1e-6
        assert (ours[site] - theirs[site]).abs().max().item() / scale < 1e-4, site


def test_last_layer_is_raw_and_final_norm_gives_model_output(arch, tiny):
    model, _ = tiny(arch)
    ids = _ids(2)
    spec = describe(model)
    found = extract(model, ids, components=("layer",))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    raw_top = found[(spec.n_layers, "layer")]
    # HF's last hidden state is final-normed; ours is the raw block output
    torch.testing.assert_close(spec.final_norm(raw_top), out.hidden_states[-1], atol=1e-5, rtol=1e-5)
    assert (raw_top - out.hidden_states[-1]).abs().max() > 1e-2
    lens = Decoder.from_spec(spec, final_norm=True).entropy(raw_top)
    torch.testing.assert_close(lens, entropy_from_logits(out.logits), atol=1e-4, rtol=0)


def test_gemma2_softcap_only_with_final_norm(tiny):
    model, _ = tiny("gemma2")
    spec = describe(model)
    assert spec.logit_softcap == 5.0
    raw = Decoder.from_spec(spec)
    assert raw.softcap is None and raw.norm is None
    h = extract(model, _ids(3), components=("layer",))[(1, "layer")]
    plain = entropy_from_logits(h @ spec.unembed_weight.T)
    torch.testing.assert_close(raw.entropy(h), plain, atol=1e-5, rtol=0)


def test_forward_until_stops_at_layer(arch, tiny):
    model, _ = tiny(arch)
    ids = _ids(4)
    found = extract(model, ids, components=("layer",))
    spec = describe(model)
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(spec.layers)]
    try:
        for k in (0, 2, spec.n_layers):
            ran.clear()
            torch.testing.assert_close(forward_until(model, k, input_ids=ids), found[(k, "layer")])
            assert ran == list(range(k))
    finally:
        for h in handles:
            h.remove()
    with pytest.raises(ValueError, match="out of range"):
        forward_until(model, spec.n_layers + 1, input_ids=ids)


def test_unsupported_architecture_names_itself():
    from transformers import BertConfig, BertLMHeadModel

    bert = BertLMHeadModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=16, is_decoder=True))
    with pytest.raises(UnsupportedModelError, match="BertLMHeadModel.*model_type='bert'"):
        describe(bert)
