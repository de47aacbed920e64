"""Tracked entropy quantities against plain HF computations; the callback's table during training."""

from __future__ import annotations

import pytest
import torch

from internal_policy.bupo.tracking import EntropyTracker, measure
from internal_policy.entropy import entropy_from_logits

TEXT = "The little girl was happy because she found her red ball in the park."


def test_measure_matches_hf_hidden_states(stories):
    model, tok = stories
    rows = {(r["metric"], r["layer"]): r["value"] for r in measure(model, tok, [{"text": TEXT}], k=2)}
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


def test_tracker_writes_a_row_set_per_logging_step(tiny_model_dir, tmp_path):
    from internal_policy.models import load_model
    from helpers import bupo_trainer

    model, tok = load_model(tiny_model_dir("llama"))
    tracker = EntropyTracker(tok, [{"text": TEXT}], internal_layer=1, path=tmp_path / "track.parquet")
    trainer = bupo_trainer(model, tok, tmp_path, callbacks=[tracker])
    trainer.train()
    import pandas as pd

    table = pd.read_parquet(tmp_path / "track.parquet")
    assert sorted(table.loc[table.metric == "delta_k", "step"]) == [0, 1, 2]
    assert sorted(table.loc[table.metric == "reward", "step"]) == [1, 2]
    # the internal step changed π^1 (layers <= 1 trained), so ΔH at layer 1 moved
    delta = table.loc[table.metric == "delta_k"].set_index("step")["value"]
    assert delta[1] != delta[0]
