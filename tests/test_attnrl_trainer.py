"""AttnRL branching in the trainer: the rows, prefixes, TreeRL advantages, padding, normaliser and old
log-probs of the batch `_generate_and_score_completions` returns (checked against plain recomputations),
composition with BuPO's internal phase, off-policy branching, and the entropy selector."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers_bupo import PROMPTS, reference_logps
from test_attnrl_fci import plain_fci

from internal_policy.attnrl.select import select_attn, step_points
from internal_policy.attnrl.steps import sequence_steps, token_texts
from internal_policy.errors import InputError
from internal_policy.models import load_model

TEMPERATURE = 0.9


def parity_reward(completions, completion_ids, **_):
    """1 when the completion's token ids sum to an odd number: a coin flip per sequence, recomputable from ids."""
    return [float(sum(ids) % 2) for ids in completion_ids]


def _trainer(model, tok, tmp_path, **overrides):
    from datasets import Dataset

    from internal_policy.attnrl.config import AttnRLConfig
    from internal_policy.attnrl.trainer import AttnRLTrainer

    settings = dict(output_dir=str(tmp_path), method="grpo", per_device_train_batch_size=4, num_generations=4,
                    max_completion_length=12, max_steps=2, use_cpu=True, bf16=False, report_to="none",
                    save_strategy="no", logging_steps=1, learning_rate=1e-3, weight_decay=0.0, seed=0,
                    disable_tqdm=True, temperature=TEMPERATURE, branching="attn", branch_step_sep=["e"],
                    branch_min_distance=0, fci_delta=2, zero_std_filter=False)
    config = AttnRLConfig(**{**settings, **overrides})
    return AttnRLTrainer(model, parity_reward, config, train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                         processing_class=tok)


def _rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def _spy(trainer, model):
    """Record every rollout call: its batch, the trees, the prefixes sampled, and reference log-probs of the
    batch rows and of the initial responses under the policy of that moment (π^k in BuPO's internal phase)."""
    calls, prefixes = [], []
    generate, single = trainer._generate_and_score_completions, trainer._generate_single_turn

    def sample(prompt_ids, *args):
        prefixes.append([list(p) for p in prompt_ids])
        return single(prompt_ids, *args)

    def call(inputs):
        prefixes.clear()
        out = generate(inputs)
        k = trainer.span_at().layer if trainer.span_at() else None
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        want, _ = reference_logps(model, ids, mask, k, TEMPERATURE, out["completion_ids"].shape[1])
        prompt_ids, completion_ids = trainer._rollout
        initial, entropy = [], []  # each initial response alone, no padding: π's log-probs, π_θ's entropies
        for p, c in zip(prompt_ids, completion_ids):
            row = torch.tensor([list(p) + list(c)])
            initial.append(reference_logps(model, row, torch.ones_like(row), k, TEMPERATURE, len(c))[0][0].tolist())
            entropy.append(reference_logps(model, row, torch.ones_like(row), None, TEMPERATURE, len(c))[1][0])
        calls.append({"out": {key: v.clone() if torch.is_tensor(v) else v for key, v in out.items()}, "want": want,
                      "trees": trainer.last_trees, "prefixes": [list(p) for p in prefixes[1:]],
                      "fci": _eager_fci(model, trainer.processing_class, trainer.last_trees),
                      "initial": initial, "entropy": entropy, "rollout": (list(prompt_ids), list(completion_ids)),
                      "log": dict(trainer.branch_log[-1])})
        return out

    trainer._generate_and_score_completions, trainer._generate_single_turn = call, sample
    return calls


def _eager_fci(model, tok, questions, delta=2):
    """Per question, per response: FCI by the plain float64 loop over HF's eager `output_attentions` of
    prompt + response alone (no padding), on the model of this moment (π_θ, the sampling policy)."""
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = []
        for q in questions:
            out.append([])
            for response in q.responses:
                steps = sequence_steps(len(q.prompt_ids), token_texts(tok, response), ("e",))
                with torch.no_grad():
                    attentions = model(input_ids=torch.tensor([q.prompt_ids + response]), output_attentions=True,
                                       use_cache=False).attentions
                out[-1].append(plain_fci([a[0] for a in attentions], steps, delta) if steps.n_steps > 2 else None)
        return out
    finally:
        model.set_attn_implementation(original)


def _hand_tree(question):
    """Per trained row (originals with points first, then continuations): token ids and per-token advantages,
    from the definitions (float64): V = mean reward of the leaves below,
    A = (V − V_root + V − V_parent) / √leaves."""
    responses, continuations = question.responses, question.continuations
    rewards = [parity_reward(None, [r])[0] for r in responses]
    branch_rewards = [parity_reward(None, [responses[c.parent][:c.point] + list(c.ids)])[0] for c in continuations]
    root = np.mean(rewards + branch_rewards)
    rows = []

    def advantage(leaves, parent_value):
        value = np.mean(leaves)
        return ((value - root) + (value - parent_value)) / math.sqrt(len(leaves))

    def below(i, cut):  # leaves under the segment of response i that ends at `cut`
        return [rewards[i]] + [r for c, r in zip(continuations, branch_rewards) if c.parent == i and c.point >= cut]

    def path(i, upto):  # per-token advantages of response i's segments before token `upto`
        points = sorted({c.point for c in continuations if c.parent == i})
        bounds = [0, *points, len(responses[i])]
        out, parent_value = [], root
        for a, b in zip(bounds, bounds[1:]):
            if a >= upto:
                break
            leaves = below(i, b)
            out += [advantage(leaves, parent_value)] * (min(b, upto) - a)
            parent_value = np.mean(leaves)
        return out

    for i in sorted({c.parent for c in continuations}):
        rows.append((responses[i], path(i, len(responses[i])), rewards[i]))
    for c, r in zip(continuations, branch_rewards):  # it hangs off the segment of its parent that ends at its point
        own = [advantage([r], np.mean(below(c.parent, c.point)))] * len(c.ids)
        rows.append((responses[c.parent][:c.point] + list(c.ids), path(c.parent, c.point) + own, r))
    return rows


@pytest.fixture(scope="module")
def bupo_run(tiny_model_dir, tmp_path_factory):
    """BuPO (π^1 for the first rollout, then π_θ) with attn branching: 2 questions per rollout, a rollout serving
    2 optimizer steps (steps_per_generation 2, so rows are padded to even counts and TRL computes old log-probs)."""
    model, tok = load_model(tiny_model_dir("llama"))
    trainer = _trainer(model, tok, tmp_path_factory.mktemp("bupo"), method="bupo", internal_layer=1, internal_steps=1,
                       steps_per_generation=2, per_device_train_batch_size=4, max_steps=4)
    calls = _spy(trainer, model)
    trainer.train()
    return trainer, tok, calls


def test_branch_rows_are_the_trained_leaves_and_start_with_their_parents_prefix(bupo_run):
    trainer, tok, calls = bupo_run
    assert len(calls) == 2 and all(c["trees"] for c in calls)
    for call in calls:
        out, trees = call["out"], call["trees"]
        expected_prefixes = []
        for q in trees:
            assert q.responses == [list(r) for r in call["rollout"][1][:4]] or q.responses == [
                list(r) for r in call["rollout"][1][4:]]
            for i, points in sorted(q.points.items()):
                steps = sequence_steps(len(q.prompt_ids), token_texts(tok, q.responses[i]), ("e",))
                starts = {a - len(q.prompt_ids) for a, _ in steps.ranges[2:]}
                assert len(points) == 2 and set(points) <= starts  # step starts, never step 1
                expected_prefixes += [q.prompt_ids + q.responses[i][:p] for p in points for _ in range(2)]
        assert call["prefixes"] == [expected_prefixes]  # what generation was given: prompt + parent's tokens before p
        rows = _rows(out["completion_ids"], out["completion_mask"])
        hand = [r for q in trees for r in _hand_tree(q)]
        assert rows[:len(hand)] == [ids for ids, _, _ in hand]
        prompts = _rows(out["prompt_ids"], out["prompt_mask"])
        parents = [q.prompt_ids for q in trees for _ in _hand_tree(q)]
        assert prompts[:len(hand)] == parents
        assert call["log"]["train_rows"] == len(hand) and call["log"]["rows_added"] == sum(
            len(q.continuations) for q in trees)


def test_fci_and_points_follow_the_rules_on_the_sampling_policys_attention(bupo_run):
    trainer, tok, calls = bupo_run
    checked = 0
    for call in calls:
        for q, want in zip(call["trees"], call["fci"]):
            for i, ref in enumerate(want):
                if ref is None:
                    continue
                assert np.abs(q.fci[i] - ref).max() <= 1e-4, (q.fci[i], ref)
                checked += np.count_nonzero(ref)
            for i, points in q.points.items():
                steps = sequence_steps(len(q.prompt_ids), token_texts(tok, q.responses[i]), ("e",))
                assert points == step_points(steps, select_attn(want[i], steps, points=2, quantile=0.8, min_start=0,
                                                                min_distance=0))
    assert checked >= 4


def test_advantages_follow_the_tree_segment_by_segment(bupo_run):
    _, _, calls = bupo_run
    for call in calls:
        out = call["out"]
        hand = [r for q in call["trees"] for r in _hand_tree(q)]
        advantages = out["advantages"].double()
        assert advantages.shape == out["completion_ids"].shape
        for row, (ids, expected, _) in enumerate(hand):
            torch.testing.assert_close(advantages[row, :len(ids)], torch.tensor(expected, dtype=torch.float64),
                                       rtol=0, atol=1e-6)
            assert advantages[row, len(ids):].abs().sum() == 0
        assert any(len(set(np.round(e, 9))) > 1 for _, e, _ in hand)  # the rows do hold several segments


def test_padding_rows_count_normaliser(bupo_run):
    trainer, _, calls = bupo_run
    for call in calls:
        out = call["out"]
        real = call["log"]["train_rows"]
        rows = out["completion_ids"].shape[0]
        assert rows % trainer.args.steps_per_generation == 0 and rows - real == call["log"]["padding_rows"]
        assert out["completion_mask"][real:].sum() == 0 and out["advantages"][real:].abs().sum() == 0
        assert out["completion_mask"][:real].sum(1).min() > 0
        assert out["num_items_in_batch"].item() == out["completion_mask"].sum().item()
        for key in ("prompt_ids", "prompt_mask", "completion_mask", "advantages", "old_per_token_logps"):
            assert out[key].shape[0] == rows, key


def test_old_logps_of_every_row_are_the_rollout_policy_pi_k_in_the_internal_phase(bupo_run):
    trainer, _, calls = bupo_run
    assert [e["policy"] for e in trainer.phase_log if e["role"] == "old"][:1] == ["pi^1"]
    for call in calls:
        out, want = call["out"], call["want"]
        keep = out["completion_mask"].bool()
        torch.testing.assert_close(out["old_per_token_logps"].double()[keep], want[keep], rtol=0, atol=2e-5)
    # the first rollout is the internal phase: π^1's log-probs are far from π_θ's on these rows
    out = calls[0]["out"]
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    theta, _ = reference_logps(trainer.model, ids, mask, None, TEMPERATURE, out["completion_ids"].shape[1])
    keep = out["completion_mask"].bool()
    assert (theta[keep] - calls[0]["want"][keep]).abs().max() > 0.1


def test_off_policy_branching_trains_the_previous_batch_with_its_old_logps(tiny_model_dir, tmp_path):
    model, tok = load_model(tiny_model_dir("llama"))
    trainer = _trainer(model, tok, tmp_path, off_policy_branching=True, branching="random", max_steps=3,
                       learning_rate=5e-2)
    calls = _spy(trainer, model)
    trainer.train()
    first = calls[0]
    assert first["trees"] == [] and first["log"]["train_rows"] == 0 and first["out"]["completion_mask"].sum() == 0
    assert first["log"]["branch_points"] > 0 and calls[1]["log"]["trees"] == 1
    previous, call = calls[1], calls[2]  # step 2 trained (batch 1's trees), so θ moved between calls 2 and 3
    (q,) = call["trees"]
    assert q.responses == [list(r) for r in previous["rollout"][1]]  # batch t-1's responses train at step t
    out, now, before = call["out"], call["want"], previous["initial"]  # before: θ_{t-1}'s log-probs of them
    branched = sorted({c.parent for c in q.continuations})
    moved = 0.0
    for row, (ids, _, _) in enumerate(_hand_tree(q)):
        got = out["old_per_token_logps"][row, :len(ids)].double()
        if row < len(branched):  # an initial response: every token keeps θ_{t-1}'s value
            torch.testing.assert_close(got, torch.tensor(before[branched[row]], dtype=torch.float64), rtol=0,
                                       atol=2e-5)
            moved = max(moved, (got - now[row, :len(ids)]).abs().max().item())
            continue
        c = q.continuations[row - len(branched)]  # prefix: θ_{t-1}, as its parent; own tokens: θ_t
        torch.testing.assert_close(got[:c.point], torch.tensor(before[c.parent][:c.point], dtype=torch.float64),
                                   rtol=0, atol=2e-5)
        torch.testing.assert_close(got[c.point:], now[row, c.point:len(ids)], rtol=0, atol=2e-5)
    assert moved > 1e-3  # θ_{t-1} and θ_t differ, so the checks above tell them apart


def test_entropy_selector_branches_at_the_sampling_policys_most_uncertain_tokens(tiny_model_dir, tmp_path):
    model, tok = load_model(tiny_model_dir("llama"))
    trainer = _trainer(model, tok, tmp_path, branching="entropy", max_steps=1, method="bupo", internal_layer=1,
                       internal_steps=1)
    calls = _spy(trainer, model)
    trainer.train()
    (q,) = calls[0]["trees"]
    assert sorted(q.points) == [0, 1, 2, 3]
    for i, points in q.points.items():  # π_θ's entropies (the sampling policy), not π^1's, the last token excluded
        assert points == torch.argsort(-calls[0]["entropy"][i][:-1], stable=True)[:2].sort().values.tolist()


@pytest.mark.parametrize("overrides, message", [
    (dict(fci_quantile=1.5), r"fci_quantile must be in \(0, 1\]"),
    (dict(fci_delta=0), "delta"),
    (dict(branch_points=0), "branch_points must be an integer >= 1"),
    (dict(branching="none", adaptive_sampling=True), "need branching attn, random or entropy"),
    (dict(method="bupo", internal_layer=1, off_policy_branching=True), "on-policy branching with method bupo"),
    (dict(branching="tree"), "branching 'tree' is unknown"),
])
def test_bad_branching_settings_are_refused(tmp_path, overrides, message):
    from internal_policy.attnrl.config import AttnRLConfig

    with pytest.raises(InputError, match=message):
        AttnRLConfig(output_dir=str(tmp_path), use_cpu=True,
                     **{**dict(method="grpo", branching="attn", num_generations=4, per_device_train_batch_size=4),
                        **overrides})
