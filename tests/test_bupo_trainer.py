"""BuPO trainer: which policy gives the log-probs at each step, where gradients flow, the baselines."""

from __future__ import annotations

import pytest
import torch
from helpers import bupo_trainer
from transformers import TrainerCallback

from internal_policy.errors import InputError
from internal_policy.models import describe, load_model

class _GradNorms(TrainerCallback):
    """Per optimizer step, the gradient norm of every parameter (0 where it has no gradient)."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: 0.0 if p.grad is None else p.grad.norm().item() for n, p in model.named_parameters()})


@pytest.fixture
def fresh_llama(tiny_model_dir):
    """A tiny untied 3-layer Llama, loaded fresh because training mutates it."""
    return load_model(tiny_model_dir("llama"))


def test_phase_switch_on_policy(fresh_llama, tmp_path):
    model, tok = fresh_llama
    ran_above = []
    hook = describe(model).layers[1].register_forward_hook(lambda *a: ran_above.append(torch.is_grad_enabled()))
    trainer = bupo_trainer(model, tok, tmp_path)
    grads = _GradNorms()
    trainer.add_callback(grads)
    trainer.train()
    hook.remove()
    log = [(e["step"], e["role"], e["policy"]) for e in trainer.phase_log]
    assert log == [(1, "current", "pi^1"), (1, "old", "pi^1"), (2, "current", "pi_theta"), (2, "old", "pi_theta")]
    # block 2 (HF index 1) never ran with grad in step 1: only step 2's training forward reached it
    assert ran_above.count(True) == 1
    internal, full = grads.steps
    above = [n for n in internal if n.startswith(("model.layers.1.", "model.layers.2.", "model.norm."))]
    below = [n for n in internal if n not in above]
    assert len(above) == 2 * 9 + 1 and "lm_head.weight" in below and "model.embed_tokens.weight" in below
    assert all(internal[n] == 0.0 for n in above)
    assert all(internal[n] > 0.0 for n in below)
    assert all(v > 0.0 for v in full.values())


def test_phase_switch_with_separate_old_logps(fresh_llama, tmp_path):
    # num_iterations=2: one rollout serves two optimizer steps, so TRL computes old log-probs at generation time
    model, tok = fresh_llama
    trainer = bupo_trainer(model, tok, tmp_path, num_iterations=2, internal_steps=2, max_steps=4)
    trainer.train()
    log = [(e["step"], e["role"], e["policy"]) for e in trainer.phase_log]
    assert log == [(1, "old", "pi^1"), (1, "current", "pi^1"), (2, "current", "pi^1"),
                   (3, "old", "pi_theta"), (3, "current", "pi_theta"), (4, "current", "pi_theta")]


def test_switch_inside_a_rollout_is_refused(fresh_llama, tmp_path):
    model, tok = fresh_llama
    with pytest.raises(InputError, match="multiple"):
        bupo_trainer(model, tok, tmp_path, num_iterations=2, internal_steps=1)


def test_internal_logps_match_plain_log_softmax(stories):
    from internal_policy.bupo.trainer import internal_logps

    model, tok = stories
    spec = describe(model)
    ids = torch.tensor([tok("The little girl was happy because she found her ball.")["input_ids"]])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[3]  # raw H_3 (not the last layer)
    h1 = hidden[:, :-1].clone().requires_grad_(True)
    h2 = hidden[:, :-1].clone().requires_grad_(True)
    targets = ids[:, 1:]
    logps, entropy = internal_logps(h1, targets, spec, temperature=0.7, compute_entropy=True)
    logp_all = torch.log_softmax((h2 @ spec.unembed_weight.T) / 0.7, dim=-1)
    expected = logp_all.gather(-1, targets[..., None])[..., 0]
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, -(logp_all.exp() * logp_all).sum(-1), rtol=1e-5, atol=1e-5)
    logps.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-6)


def test_freeze_baseline_gives_no_gradient_to_layers_up_to_k(fresh_llama, tmp_path):
    model, tok = fresh_llama
    trainer = bupo_trainer(model, tok, tmp_path, method="freeze", internal_layer=2, max_steps=1)
    grads = _GradNorms()
    trainer.add_callback(grads)
    trainer.train()
    (step,) = grads.steps
    frozen = [n for n in step if n.startswith(("model.layers.0.", "model.layers.1."))]
    assert len(frozen) == 18 and all(step[n] == 0.0 for n in frozen)
    assert all(v > 0 for n, v in step.items() if n not in frozen)
    assert {e["policy"] for e in trainer.phase_log} == {"pi_theta"}


def test_lowlr_baseline_scales_the_rate_above_k(fresh_llama, tmp_path):
    model, tok = fresh_llama
    trainer = bupo_trainer(model, tok, tmp_path, method="lowlr", internal_layer=1, learning_rate=1e-3)
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert len(lr_of) == len(names)
    for name, lr in lr_of.items():
        above = name.startswith(("model.layers.1.", "model.layers.2.", "model.norm."))
        assert lr == pytest.approx(1e-4 if above else 1e-3), name


def test_bad_internal_layer_is_a_clear_error(fresh_llama, tmp_path):
    model, tok = fresh_llama
    with pytest.raises(InputError, match="layers 1..3"):
        bupo_trainer(model, tok, tmp_path, internal_layer=4)
    with pytest.raises(InputError, match="needs internal_layer"):
        bupo_trainer(model, tok, tmp_path, internal_layer=None)


def test_auto_internal_layer_is_the_profile_boundary_layer(tmp_path):
    from internal_policy.bupo import resolve_internal_layer
    from internal_policy.profile import profile
    from internal_policy.stages import run_boundary_layer

    model, tok = load_model()
    records = [{"text": "Once upon a time, there was a little girl named Lily. She loved to play outside."},
               {"text": "The little girl was happy because she found her red ball in the park."}]
    profile(model, tok, records, out_dir=tmp_path / "run", progress=False)  # the full profile, all components
    expected = run_boundary_layer(tmp_path / "run")
    assert 1 <= expected < describe(model).n_layers
    assert resolve_internal_layer("auto", model, tok, records) == expected
    assert resolve_internal_layer("auto", model, tok, profile_run=tmp_path / "run") == expected
    with pytest.raises(InputError, match="needs a profile"):
        bupo_trainer(model, tok, tmp_path / "out", internal_layer="auto")


def test_internal_final_norm_option_decodes_through_the_norm(stories):
    from internal_policy.bupo.trainer import internal_logps

    model, tok = stories
    spec = describe(model)
    ids = torch.tensor([tok("Once upon a time there was a dog.")["input_ids"]])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[2][:, :-1]
        logps, _ = internal_logps(hidden, ids[:, 1:], spec, final_norm=True)
        logits = model.model.norm(hidden) @ model.lm_head.weight.T
    expected = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)


def test_bupo_with_vllm_importance_correction_is_refused(tmp_path):
    from internal_policy.bupo import BuPOConfig

    with pytest.raises(InputError, match="vllm_importance_sampling_correction=False"):
        BuPOConfig(output_dir=str(tmp_path), internal_layer=2, use_vllm=True, use_cpu=True)
    BuPOConfig(output_dir=str(tmp_path), internal_layer=2, use_vllm=True, vllm_importance_sampling_correction=False,
               use_cpu=True)
