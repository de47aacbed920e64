"""BuPO and AttnRL branching under DDP: two gloo CPU ranks (torch.multiprocessing) take steps and end identical.

Before the truncated forward went through the model's own forward, it stopped by raising inside the
DDP-wrapped model, DDP never prepared its reducer, and each rank stepped on its own gradients
(parameters 3e-2 apart after two steps). Blocks above k must also stay exactly where they were: with
weight decay on, that holds only if they get no gradient at all (DDP's find_unused_parameters), not a
zero one.

The `attnrl` case branches rollouts (adaptive sampling, so the ranks add different numbers of rows):
each rank holds one question, its continuations' rewards come back from TRL's gathered reward call
at its own offset, `num_items_in_batch` is the mask sum over both ranks, and the adaptive running
mean is the same on both.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp
from helpers_bupo import PROMPTS, easy_or_parity_reward

CASES = {
    "bupo": dict(internal_layer=1, internal_steps=2),  # two internal steps of π^1
    "schedule": dict(internal_schedule="1:1,2:1", force_schedule=True),  # π^1, then π^2
    "attnrl": dict(method="grpo", branching="random", adaptive_sampling=True, branch_step_sep=["e"],
                   branch_min_distance=0, fci_delta=2, max_completion_length=10),
}
NEVER_USED = {  # parameters above every k of the case (3-layer model; HF block i = paper layer i + 1)
    "bupo": ("model.layers.1.", "model.layers.2.", "model.norm."),
    "schedule": ("model.layers.2.", "model.norm."),
    "attnrl": (),
}


def _record_batches(trainer, into: list) -> None:
    """Keep, per rollout, this rank's mask sum and normaliser and its continuations (leaf ids, reward)."""
    generate = trainer._generate_and_score_completions

    def spy(inputs):
        out = generate(inputs)
        leaves = [(q.prompt, q.responses[c.parent][:c.point] + list(c.ids), c.reward) for q in trainer.last_trees
                  for c in q.continuations]
        into.append({"mask": out["completion_mask"].sum().item(), "items": out["num_items_in_batch"].item(),
                     "leaves": leaves, "running": trainer.running.mean})
        return out

    trainer._generate_and_score_completions = spy


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from internal_policy.attnrl.config import AttnRLConfig
    from internal_policy.attnrl.trainer import AttnRLTrainer
    from internal_policy.bupo import BuPOConfig, BuPOTrainer
    from internal_policy.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    for name, overrides in CASES.items():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        branching = name == "attnrl"
        settings = dict(output_dir=f"{out}/{name}", method="bupo", per_device_train_batch_size=4, num_generations=4,
                        max_completion_length=6, max_steps=2, use_cpu=True, bf16=False, report_to="none",
                        save_strategy="no", learning_rate=1e-2, weight_decay=0.01, seed=0, disable_tqdm=True)
        args = (AttnRLConfig if branching else BuPOConfig)(**{**settings, **overrides})
        reward = easy_or_parity_reward if branching else lambda completions, **_: [float(len(c)) for c in completions]
        trainer = (AttnRLTrainer if branching else BuPOTrainer)(
            model, reward, args, train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
        batches = []
        if branching:
            _record_batches(trainer, batches)
        trainer.train()
        assert trainer.accelerator.num_processes == world and type(trainer.model_wrapped).__name__ == \
            "DistributedDataParallel"
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.save({"before": before, "after": after, "log": trainer.phase_log, "batches": batches},
                   f"{out}/{name}-{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_end_internal_steps_with_identical_parameters(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    for name in CASES:
        ranks = [torch.load(tmp_path / f"{name}-{r}.pt") for r in range(2)]
        if name == "attnrl":
            _check_branching(*[r["batches"] for r in ranks])
        else:
            assert [e["policy"] for e in ranks[0]["log"] if e["role"] == "current"] == (
                ["pi^1", "pi^1"] if name == "bupo" else ["pi^1", "pi^2"])
        for param, value in ranks[0]["after"].items():
            torch.testing.assert_close(ranks[1]["after"][param], value, rtol=0, atol=0, msg=f"{name}: {param}")
            moved = not torch.equal(value, ranks[0]["before"][param])
            assert moved == (not param.startswith(NEVER_USED[name])), f"{name}: {param} moved={moved}"


def _check_branching(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second) == 2
    assert any(len(a["leaves"]) != len(b["leaves"]) for a, b in zip(first, second))  # uneven ranks were exercised
    for a, b in zip(first, second):
        assert a["items"] == b["items"] == a["mask"] + b["mask"]
        assert a["running"] == b["running"]
        for prompt, ids, reward in a["leaves"] + b["leaves"]:
            assert reward == easy_or_parity_reward([prompt], None, [ids])[0]
    assert first[-1]["running"] is not None  # all-correct questions were met
