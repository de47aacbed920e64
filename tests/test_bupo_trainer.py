"""BuPO trainer: the log-probs it computes, which policy gives them at each step, where gradients flow,
the step units, the bottom-up schedule and the baselines."""

from __future__ import annotations

import pytest
import torch
from helpers_bupo import GradNorms, config, reference_logps, trainer

from internal_policy.errors import InputError
from internal_policy.models import describe, load_model


@pytest.fixture
def fresh_llama(tiny_model_dir):
    """A tiny untied 3-layer Llama, loaded fresh because training mutates it."""
    return load_model(tiny_model_dir("llama"))


def _current(log):
    return [(e["step"], e["policy"]) for e in log if e["role"] == "current"]


def _left_padded(tok, prompts, completion_len, generator):
    """Left-padded prompt ids + random completion ids, with the attention mask, as TRL builds them."""
    rows = [tok(p)["input_ids"] for p in prompts]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width + completion_len, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):width] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    ids[:, width:] = torch.randint(3, 512, (len(rows), completion_len), generator=generator)
    return ids, mask


def test_trainer_logps_are_pi_k_with_temperature_left_padding_and_bias(tiny_model_dir, tmp_path):
    # Phi: the LM head has a bias; k = 2 < L = 3, so hidden_states[2] is the raw H_2
    model, tok = load_model(tiny_model_dir("phi"))
    assert model.lm_head.bias.abs().max() > 0.01
    t = trainer(model, tok, tmp_path, internal_layer=2, temperature=0.7)
    ids, mask = _left_padded(tok, ["Once upon a time there", "A"], 5, torch.Generator().manual_seed(0))
    assert (mask[1] == 0).any()
    for step, k in ((0, 2), (1, None)):  # the internal phase, then π_θ
        t.state.global_step = step
        logps, entropy, _ = t._get_per_token_logps_and_entropies(model, ids, mask, 5, compute_entropy=True)
        want_logps, want_entropy = reference_logps(model, ids, mask, k, 0.7, 5)
        torch.testing.assert_close(logps.double(), want_logps, rtol=0, atol=2e-5)
        torch.testing.assert_close(entropy.double(), want_entropy, rtol=0, atol=2e-5)
    assert [e["policy"] for e in t.phase_log] == ["pi^2", "pi_theta"]


def test_old_logps_come_from_the_internal_policy_at_rollout_time(fresh_llama, tmp_path):
    # num_iterations=2: one rollout serves two optimizer steps, so TRL computes old log-probs at generation
    model, tok = fresh_llama
    t = trainer(model, tok, tmp_path, num_iterations=2, internal_steps=1, max_steps=4, temperature=0.8)
    checked = []
    generate = t._generate_and_score_completions

    def spy(batch):
        out = generate(batch)
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        k = 1 if t.state.global_step < 2 else None
        want, _ = reference_logps(model, ids, mask, k, 0.8, out["completion_ids"].shape[1])
        keep = out["completion_mask"].bool()
        torch.testing.assert_close(out["old_per_token_logps"].double()[keep], want[keep], rtol=0, atol=2e-5)
        checked.append(k)
        return out

    t._generate_and_score_completions = spy
    t.train()
    assert checked == [1, None]
    log = [(e["step"], e["role"], e["policy"]) for e in t.phase_log]
    assert log == [(1, "old", "pi^1"), (1, "current", "pi^1"), (2, "current", "pi^1"),
                   (3, "old", "pi_theta"), (3, "current", "pi_theta"), (4, "current", "pi_theta")]


def test_reference_logps_switch_with_the_policy(fresh_llama, tmp_path):
    model, tok = fresh_llama  # beta > 0: TRL rebuilds the reference model from the model's folder
    t = trainer(model, tok, tmp_path, beta=0.04)
    t.train()
    assert [(e["step"], e["policy"]) for e in t.phase_log if e["role"] == "ref"] == [(1, "pi^1"), (2, "pi_theta")]


def test_phase_switch_and_gradients_on_policy(fresh_llama, tmp_path):
    model, tok = fresh_llama
    ran_above = []
    hook = describe(model).layers[1].register_forward_hook(lambda *a: ran_above.append(torch.is_grad_enabled()))
    grads = GradNorms()
    t = trainer(model, tok, tmp_path, callbacks=[grads])
    t.train()
    hook.remove()
    log = [(e["step"], e["role"], e["policy"], e["stage"]) for e in t.phase_log]
    assert log == [(1, "current", "pi^1", 1), (1, "old", "pi^1", 1), (2, "current", "pi_theta", None),
                   (2, "old", "pi_theta", None)]
    assert ran_above.count(True) == 1  # block 2 (HF index 1) ran with grad only in step 2's training forward
    internal, full = grads.steps
    above = [n for n in internal if n.startswith(("model.layers.1.", "model.layers.2.", "model.norm."))]
    below = [n for n in internal if n not in above]
    assert len(above) == 2 * 9 + 1 and "lm_head.weight" in below and "model.embed_tokens.weight" in below
    assert all(internal[n] == 0.0 for n in above) and all(internal[n] > 0.0 for n in below)
    assert all(v > 0.0 for v in full.values())


def test_schedule_trains_layers_bottom_up(fresh_llama, tmp_path):
    model, tok = fresh_llama
    grads = GradNorms()
    t = trainer(model, tok, tmp_path, callbacks=[grads], internal_layer=None, internal_steps=None,
                internal_schedule="1:1,2:1", force_schedule=True, max_steps=3)
    t.train()
    assert _current(t.phase_log) == [(1, "pi^1"), (2, "pi^2"), (3, "pi_theta")]
    assert [e["stage"] for e in t.phase_log if e["role"] == "current"] == [1, 2, None]
    for step, trained in zip(grads.steps, (("model.layers.0.",), ("model.layers.0.", "model.layers.1."), None)):
        for name, norm in step.items():
            block = name.startswith(("model.layers.", "model.norm."))
            assert (norm > 0) == (trained is None or not block or name.startswith(trained)), name
    assert t.phase_scalars(1) == {"bupo/internal": 1.0, "bupo/stage": 2.0, "bupo/layer": 2.0}
    assert t.phase_scalars(2) == {"bupo/internal": 0.0, "bupo/stage": 0.0, "bupo/layer": 3.0}
    logged = [h for h in t.state.log_history if "loss" in h]
    assert [(h["bupo/stage"], h["bupo/layer"]) for h in logged] == [(1.0, 1.0), (2.0, 2.0), (0.0, 3.0)]


def test_internal_steps_count_rollout_batches(fresh_llama, tmp_path):
    # steps_per_generation=2: a rollout batch serves 2 optimizer steps, so internal_steps=1 covers steps 1-2
    model, tok = fresh_llama
    t = trainer(model, tok, tmp_path, steps_per_generation=2, internal_steps=1, max_steps=4)
    assert t.args.steps_per_rollout() == 2 and [(s.start, s.stop) for s in t.spans] == [(0, 2)]
    t.train()
    assert _current(t.phase_log) == [(1, "pi^1"), (2, "pi^1"), (3, "pi_theta"), (4, "pi_theta")]
    assert [(e["step"], e["policy"]) for e in t.phase_log if e["role"] == "old"] == [(1, "pi^1"), (3, "pi_theta")]


def test_official_preset_reproduces_the_official_schedule(tmp_path):
    from internal_policy.bupo import BuPOConfig, official_preset

    assert official_preset(8)["per_device_train_batch_size"] == 32
    cfg = BuPOConfig(output_dir=str(tmp_path), internal_layer=6, use_cpu=True, **official_preset(1))
    assert cfg.generation_batch_size == 128 * 8  # one rollout batch: 128 prompts × 8 samples
    assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps == 32 * 8  # one optimizer step
    assert cfg.steps_per_rollout() == 4 and cfg.rollouts_to_steps(cfg.internal_steps) == 120
    assert cfg.max_steps == 300 * 4 and cfg.save_steps == 400 and cfg.eval_steps == 120
    with pytest.raises(InputError, match="does not split"):
        official_preset(3)


def test_a_phase_ending_inside_an_optimizer_step_is_refused(fresh_llama, tmp_path):
    model, tok = fresh_llama
    with pytest.raises(InputError, match="inside an optimizer step"):
        trainer(model, tok, tmp_path, gradient_accumulation_steps=2, steps_per_generation=1, internal_steps=1)
    with pytest.raises(InputError, match="inside a rollout batch"):
        config(tmp_path, steps_per_generation=2, save_strategy="steps", save_steps=3)


@pytest.mark.parametrize("text, message", [
    ("2:10,2:5", "strictly increasing"), ("3:10,2:5", "strictly increasing"), ("2:10,5", "mixes"),
    ("2:0", "rollouts >= 1"), ("a:3", "LAYER:ROLLOUTS"), ("", "LAYER:ROLLOUTS"),
])
def test_bad_schedules_are_refused(text, message):
    from internal_policy.bupo.config import parse_schedule

    with pytest.raises(InputError, match=message):
        parse_schedule(text)


def test_schedule_rules(tmp_path):
    from internal_policy.bupo.config import Stage, parse_schedule, spaced_layers

    assert parse_schedule("2:10, 4:10") == [Stage(2, 10), Stage(4, 10)]
    assert spaced_layers(6, 3) == [2, 4, 6] and spaced_layers(4, 2) == [2, 4] and spaced_layers(5, 5) == [1, 2, 3, 4, 5]
    with pytest.raises(InputError, match="distinct layers"):
        spaced_layers(2, 3)
    for overrides, message in (
        (dict(method="freeze", internal_schedule="1:1"), "needs method bupo"),
        (dict(internal_layer=None, internal_schedule="1:1", internal_steps=3), "either internal_steps"),
        (dict(internal_layer=2, internal_steps=None, internal_schedule="1:1,2:1"), "leave internal_layer unset"),
        (dict(internal_layer=None, internal_steps=None, internal_schedule="5,5"), "needs internal_layer"),
    ):
        with pytest.raises(InputError, match=message):
            config(tmp_path, **overrides)


def test_auto_schedule_ends_at_the_boundary_layer_and_checks_named_layers(tmp_path):
    from internal_policy.bupo import resolve_internal_layer

    model, tok = load_model()  # stories260K: boundary layer 4 on these records (L = 5)
    probe = [{"text": "Once upon a time, there was a little girl named Lily. She loved to play outside."},
             {"text": "The little girl was happy because she found her red ball in the park."}]
    boundary = resolve_internal_layer("auto", model, tok, probe)
    assert boundary == 4
    auto = trainer(model, tok, tmp_path / "a", internal_layer="auto", internal_steps=None,
                   internal_schedule="1,1", profile_records=probe)
    assert [(s.layer, s.start, s.stop) for s in auto.spans] == [(2, 0, 1), (4, 1, 2)]
    with pytest.raises(InputError, match="above the boundary layer 4"):
        trainer(model, tok, tmp_path / "b", internal_layer=None, internal_steps=None, internal_schedule="2:1,5:1",
                profile_records=probe)
    with pytest.raises(InputError, match="needs a profile"):
        trainer(model, tok, tmp_path / "c", internal_layer=None, internal_steps=None, internal_schedule="2:1")


def test_bupo_refuses_options_that_act_on_pi_k(tmp_path):
    for overrides, message in (
        (dict(entropy_coef=0.01), "entropy_coef"), (dict(top_entropy_quantile=0.2), "top_entropy_quantile"),
        (dict(use_vllm=True, vllm_importance_sampling_correction=False, off_policy_mask_threshold=0.5),
         "off_policy_mask_threshold"),
        (dict(use_vllm=True), "vllm_importance_sampling_correction=False"),
        (dict(ddp_find_unused_parameters=False), "find_unused_parameters"),
    ):
        with pytest.raises(InputError, match=message):
            config(tmp_path, **overrides)
    assert config(tmp_path).ddp_find_unused_parameters is True
    config(tmp_path, method="grpo", entropy_coef=0.01)  # fine for GRPO


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


@pytest.mark.parametrize("arch", ["llama", "gemma2", "cohere"])
def test_internal_final_norm_is_the_models_own_readout(arch, tiny):
    # with the final norm, π^L is π_θ: gemma2 soft-caps its logits (cap 5), cohere scales them (0.5)
    from internal_policy.bupo.trainer import internal_logps
    from internal_policy.capture import forward_until

    model, _ = tiny(arch)
    spec = describe(model)
    ids = torch.randint(3, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        h_last = forward_until(model, spec.n_layers, input_ids=ids)
        logps, _ = internal_logps(h_last[:, :-1], ids[:, 1:], spec, final_norm=True)
    expected = torch.log_softmax(out.logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(logps.double(), expected, rtol=0, atol=2e-5)


def test_freeze_baseline_gives_no_gradient_to_layers_up_to_k(fresh_llama, tmp_path):
    model, tok = fresh_llama
    grads = GradNorms()
    t = trainer(model, tok, tmp_path, callbacks=[grads], method="freeze", internal_layer=2, max_steps=1)
    t.train()
    (step,) = grads.steps
    frozen = [n for n in step if n.startswith(("model.layers.0.", "model.layers.1."))]
    assert len(frozen) == 18 and all(step[n] == 0.0 for n in frozen)
    assert all(v > 0 for n, v in step.items() if n not in frozen)
    assert {e["policy"] for e in t.phase_log} == {"pi_theta"}


def test_lowlr_baseline_scales_the_rate_above_k(fresh_llama, tmp_path):
    model, tok = fresh_llama
    t = trainer(model, tok, tmp_path, method="lowlr", internal_layer=1, learning_rate=1e-3)
    optimizer = t.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert len(lr_of) == len(names)
    for name, lr in lr_of.items():
        above = name.startswith(("model.layers.1.", "model.layers.2.", "model.norm."))
        assert lr == pytest.approx(1e-4 if above else 1e-3), name


def test_bad_internal_layer_is_a_clear_error(fresh_llama, tmp_path):
    model, tok = fresh_llama
    with pytest.raises(InputError, match="layers 1..3"):
        trainer(model, tok, tmp_path, internal_layer=4)
    with pytest.raises(InputError, match="decoded raw is not π_θ"):
        trainer(model, tok, tmp_path, internal_layer=3)  # k = L
    trainer(model, tok, tmp_path, method="lowlr", internal_layer=3)  # fine for a baseline
    with pytest.raises(InputError, match="needs internal_layer"):
        config(tmp_path, internal_layer=None)
    with pytest.raises(InputError, match="must be a layer number"):
        config(tmp_path, method="grpo", internal_layer="abc")


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
        trainer(model, tok, tmp_path / "out", internal_layer="auto")
