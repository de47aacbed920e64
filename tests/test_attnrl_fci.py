"""AttnRL steps and FCI: exact step ranges, FCI against a plain float64 loop over attention probabilities
(hand-built tensors and HF's own `output_attentions`), and the model left as it was."""

import numpy as np
import pytest
import torch

from internal_policy.attnrl.fci import fci_from_attentions, step_attention, step_fci
from internal_policy.attnrl.steps import Steps, sequence_steps, split_steps, token_texts
from internal_policy.errors import InputError


def plain_fci(attentions, steps: Steps, delta: int) -> np.ndarray:
    """The formula, loop by loop in float64: y_k = max_{l,h} Σ_{j ≥ k+Δ} mean_{t∈j} mean_{s∈k} A[t, s]."""
    ranges, n = steps.ranges, steps.n_steps
    y = np.zeros(n)
    for k in range(n):
        best = -np.inf
        for layer in attentions:  # [heads, T, T] of one row
            for head in np.asarray(layer, dtype=np.float64):
                total = 0.0
                for j in range(k + delta, n):
                    (t0, t1), (s0, s1) = ranges[j], ranges[k]
                    total += sum(head[t, s] for t in range(t0, t1) for s in range(s0, s1)) / ((t1 - t0) * (s1 - s0))
                best = max(best, total)
        y[k] = best
    y[:2] = 0.0
    if steps.think_end is not None:
        y[[start > steps.think_end for start, _ in ranges]] = 0.0
    return y


# -- steps ---------------------------------------------------------------------------------------

def test_split_after_separator_tokens_with_fallbacks():
    assert split_steps(["a", "b\n\n", "c", "d\n\nx", "e"]) == [(0, 2), (2, 4), (4, 5)]
    assert split_steps(["a", "b\n", "c", "d\n"]) == [(0, 2), (2, 4)]  # no "\n\n": split at "\n"; no empty tail
    assert split_steps(["a\n", "b\n\n", "c"]) == [(0, 2), (2, 3)]  # "\n\n" wins: the lone "\n" does not cut
    assert split_steps(["a", "b", "c"]) == [(0, 1), (1, 2), (2, 3)]  # no separator: every token is a step
    assert split_steps(["x.", "y", "z."], (".",)) == [(0, 1), (1, 3)]


def test_sequence_steps_exact_ranges_on_stories_tokens(stories):
    _, tokenizer = stories
    ids = tokenizer("Hello there.\n\nNew para.\nLine", add_special_tokens=False)["input_ids"]
    assert [i for i, t in enumerate(ids) if t == 13] == [5, 6, 14]  # "\n" byte tokens; "\n\n" is never one token
    steps = sequence_steps(4, token_texts(tokenizer, ids))
    assert steps.ranges == ((0, 4), (4, 10), (10, 11), (11, 19), (19, 22))
    assert "".join(tokenizer.decode(ids[a - 4 : b - 4]) for a, b in steps.ranges[1:]) == tokenizer.decode(ids)
    by_period = sequence_steps(4, token_texts(tokenizer, ids), (".",))
    assert by_period.ranges == ((0, 4), (4, 9), (9, 18), (18, 22))


def test_think_end_silences_later_steps():
    steps = sequence_steps(3, ["a\n\n", "b\n\n", "c</think>", "\n\n", "d\n\n", "e"])
    assert steps.think_end == 5
    assert steps.silenced() == [True, True, False, False, True, True]
    assert sequence_steps(3, ["a\n\n", "b"], think_end=None).think_end is None


# -- FCI on hand-built attention -----------------------------------------------------------------

def _random_attention(gen, layers, batch, heads, width, lengths):
    """Row-stochastic causal probabilities; rows beyond a sequence's length are junk that must not count."""
    out = []
    for _ in range(layers):
        logits = torch.randn(batch, heads, width, width, generator=gen, dtype=torch.float64) * 2
        logits = logits.masked_fill(torch.ones(width, width, dtype=torch.bool).triu(1), -torch.inf)
        for row, n in enumerate(lengths):
            logits[row, :, :, n:] = -torch.inf
            logits[row, :, n:, :] = 0.0
        out.append(logits.softmax(-1))
    return out


@pytest.mark.parametrize("delta", [1, 2, 4])
def test_fci_equals_plain_formula_on_hand_built_attention(delta):
    gen = torch.Generator().manual_seed(delta)
    steps = [Steps(((0, 4), (4, 6), (6, 7), (7, 11), (11, 12), (12, 15), (15, 18), (18, 20))),
             Steps(((0, 2), (2, 5), (5, 6), (6, 9), (9, 10), (10, 12), (12, 14), (14, 16), (16, 17)), think_end=13)]
    attentions = _random_attention(gen, 3, 2, 3, 20, [20, 17])
    got = fci_from_attentions(attentions, steps, delta).fci()
    for row in range(2):
        want = plain_fci([a[row] for a in attentions], steps[row], delta)
        assert np.abs(got[row] - want).max() <= 1e-6, (got[row], want)
        assert np.count_nonzero(want) >= 2  # a non-trivial comparison


def test_fci_takes_the_max_over_heads_and_layers():
    """One head of one layer looks far back at step 2; its sum, not a mean over heads/layers, is y_2."""
    width, ranges = 12, ((0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12))
    uniform = torch.tril(torch.ones(width, width, dtype=torch.float64))
    uniform = (uniform / uniform.sum(-1, keepdim=True))[None, None].repeat(1, 2, 1, 1)
    sharp = uniform.clone()
    sharp[0, 1, 8:, :] = 0.0
    sharp[0, 1, 8:, 4] = 1.0  # layer 2, head 1: queries of steps 4-5 put everything on token 4 (step 2)
    y = fci_from_attentions([uniform, sharp], [Steps(ranges)], delta=2).fci()[0]
    assert y[2] == pytest.approx(0.5 + 0.5)  # α[4,2] = α[5,2] = mean over s∈{4,5} of [1, 0] = 0.5
    assert y[0] == y[1] == 0.0


# -- FCI through the model -----------------------------------------------------------------------

def _batch(tokenizer, gen, lengths, width):
    ids = torch.randint(3, 512, (len(lengths), width), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return ids, mask


def _reference(model, ids, mask, steps, delta):
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(original)
    return [plain_fci([a[row] for a in out.attentions], s, delta) for row, s in enumerate(steps)]


STEPS = [Steps(((0, 5), (5, 9), (9, 15), (15, 16), (16, 22), (22, 30), (30, 34), (34, 40))),
         Steps(((0, 3), (3, 10), (10, 12), (12, 20), (20, 25), (25, 33)), think_end=21)]


@pytest.mark.parametrize("arch", ["stories", "llama", "gpt2", "gemma2", "gemma3_text", "qwen3", "olmo2"])
def test_fci_matches_output_attentions_and_leaves_model_unchanged(arch, stories, tiny):
    """Padded batch, query blocks of 3 rows; GQA (stories, llama, qwen3), GPT-2 Conv1D, soft-capping
    (gemma2), a 4-token sliding window (gemma3), q/k norms (qwen3, olmo2)."""
    model, tokenizer = stories if arch == "stories" else tiny(arch)
    gen = torch.Generator().manual_seed(0)
    ids, mask = _batch(tokenizer, gen, [40, 33], 40)
    before_impl = model.config._attn_implementation
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    heads = model.config.num_attention_heads
    result = step_fci(model, ids, mask, STEPS, delta=2, chunk_elements=2 * heads * 40 * 3)
    want = _reference(model, ids, mask, STEPS, delta=2)
    for got, ref in zip(result.fci(), want):
        assert np.abs(got - ref).max() <= 1e-4, (got, ref)
    assert sum(np.count_nonzero(r) for r in want) >= (1 if arch == "gemma3_text" else 4)  # gemma3: 4-token window
    assert model.config._attn_implementation == before_impl
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


def test_pass_logits_are_the_models_and_implementation_restored_on_error(stories):
    model, tokenizer = stories
    ids, mask = _batch(tokenizer, torch.Generator().manual_seed(1), [40, 33], 40)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with step_attention(model, STEPS, 40, delta=4, chunk_elements=100) as probe:
            inside = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert len(probe.fci()) == 2
        assert torch.allclose(inside[mask.bool()], plain[mask.bool()], atol=1e-4)
        with pytest.raises(RuntimeError, match="boom"):
            with step_attention(model, STEPS, 40):
                raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_attention_that_cannot_run_eagerly_is_refused(tiny):
    model, tokenizer = tiny("gptj")
    impl = model.config._attn_implementation
    ids, mask = _batch(tokenizer, torch.Generator().manual_seed(2), [40, 33], 40)
    with pytest.raises(InputError, match="GPTJForCausalLM: its attention cannot run eagerly"):
        step_fci(model, ids, mask, STEPS)
    assert model.config._attn_implementation == impl


@pytest.mark.parametrize("delta", [0, -1, 1.5, True])
def test_delta_below_one_is_refused(delta):
    with pytest.raises(InputError, match="delta"):
        fci_from_attentions([torch.ones(1, 1, 4, 4) / 4], [Steps(((0, 1), (1, 2), (2, 4)))], delta)
