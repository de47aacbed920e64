"""Tracked entropy quantities against plain HF computations; the callback's table during training."""

from __future__ import annotations

import pytest
import torch

from internal_policy.bupo.tracking import EntropyTracker, measure
from internal_policy.entropy import entropy_from_logits

TEXT = "The little girl was happy because she found her red ball in the park."


def test_measure_matches_hf_hidden_states(stories):
    model, tok = stories
    # two ks in one measurement: k = 1 rides the fused decoding, k = 2 the extra KL pass of later layers
    both = measure(model, tok, [{"text": TEXT}], k=(1, 2))
    rows = {(r["metric"], r["layer"]): r["value"] for r in both if r["k"] in (-1, 2)}
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    with torch.no_grad():
        out = model(ids, labels=ids, output_hidden_states=True)
    hs, W = out.hidden_states, model.lm_head.weight
    keep = slice(0, ids.shape[1] - 1)  # positions with a next token
    ent = {l: entropy_from_logits(hs[l][0, keep] @ W.T) for l in (1, 2, 3)}
    assert rows[("entropy", 2)] == pytest.approx(ent[2].mean().item(), abs=1e-4)
    assert rows[("delta_k", 2)] == pytest.approx((ent[2] - ent[1]).mean().item(), abs=1e-4)
    assert rows[("actor_entropy", 5)] == pytest.approx(entropy_from_logits(out.logits[0, keep]).mean().item(), abs=1e-4)
    assert rows[("perplexity", 5)] == pytest.approx(out.loss.exp().item(), rel=1e-4)
    cos = torch.nn.functional.cosine_similarity(hs[2][0, keep], hs[3][0, keep], dim=-1).mean()
    assert rows[("cos_k", 3)] == pytest.approx(cos.item(), abs=1e-5)
    p2, p3 = (torch.log_softmax(hs[l][0, keep] @ W.T, -1) for l in (2, 3))
    kl = torch.nn.functional.kl_div(p3, p2, log_target=True, reduction="none").sum(-1).mean()
    assert rows[("kl_k", 3)] == pytest.approx(kl.item(), abs=1e-4)
    assert {l for (m, l) in rows if m == "cos_k"} == {3, 4, 5}
    p1 = torch.log_softmax(hs[1][0, keep] @ W.T, -1)
    kl1 = torch.nn.functional.kl_div(p2, p1, log_target=True, reduction="none").sum(-1).mean()
    k1 = {(r["metric"], r["layer"]): r["value"] for r in both if r["k"] == 1}
    assert k1[("kl_k", 2)] == pytest.approx(kl1.item(), abs=1e-4)
    assert k1[("delta_k", 1)] == pytest.approx((ent[1] - entropy_from_logits(hs[0][0, keep] @ W.T)).mean().item(),
                                               abs=1e-4)
    assert sorted(l for (m, l) in k1 if m == "kl_k") == [2, 3, 4, 5]
    single = {(r["metric"], r["layer"]): r["value"] for r in measure(model, tok, [{"text": TEXT}], k=2)}
    assert single == pytest.approx(rows, abs=1e-6)


def test_tracker_writes_a_row_set_per_logging_step(tiny_model_dir, tmp_path):
    import pandas as pd
    from helpers_bupo import trainer

    from internal_policy.models import load_model

    model, tok = load_model(tiny_model_dir("llama"))
    t = trainer(model, tok, tmp_path, internal_layer=None, internal_steps=None, internal_schedule="1:1,2:1",
                force_schedule=True, max_steps=3)
    tracker = EntropyTracker(tok, [{"text": TEXT}], t.tracked_layers, path=tmp_path / "track.parquet",
                             policy_at=t.policy_at)
    t.add_callback(tracker)
    t.train()
    table = pd.read_parquet(tmp_path / "track.parquet")
    delta = table[table.metric == "delta_k"]
    assert sorted(zip(delta["step"], delta["k"])) == [(s, k) for s in range(4) for k in (1, 2)]
    assert sorted(table.loc[table.metric == "reward", "step"]) == [1, 2, 3]
    policy = table[table.metric == "actor_entropy"].set_index("step")["policy"]
    assert list(policy.sort_index()) == ["init", "pi^1", "pi^2", "pi_theta"]
    # the first step trained π^1 (layers <= 1), so ΔH at layer 1 moved; the tracker's scalars reach the logs
    by_step = delta[delta["k"] == 1].set_index("step")["value"]
    assert by_step[1] != by_step[0]
    logged = [h for h in t.state.log_history if "loss" in h]
    assert [h["tracker/delta_k1"] for h in logged] == pytest.approx(list(by_step[[1, 2, 3]]))
    cos2 = table[(table.metric == "cos_k") & (table.k == 2) & (table.step == 3)]["value"].mean()
    assert logged[-1]["tracker/cos_k2"] == pytest.approx(cos2)
