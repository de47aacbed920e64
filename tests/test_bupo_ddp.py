"""BuPO under DDP: two gloo CPU ranks (torch.multiprocessing) take internal-phase steps and end identical.

Before the truncated forward went through the model's own forward, it stopped by raising inside the
DDP-wrapped model, DDP never prepared its reducer, and each rank stepped on its own gradients
(parameters 3e-2 apart after two steps). Blocks above k must also stay exactly where they were: with
weight decay on, that holds only if they get no gradient at all (DDP's find_unused_parameters), not a
zero one.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

PROMPTS = ["Once upon a time", "The cat sat", "Tom had a", "One day Lily"]
CASES = {
    "bupo": dict(internal_layer=1, internal_steps=2),  # two internal steps of π^1
    "schedule": dict(internal_schedule="1:1,2:1", force_schedule=True),  # π^1, then π^2
}
NEVER_USED = {  # parameters above every k of the case (3-layer model; HF block i = paper layer i + 1)
    "bupo": ("model.layers.1.", "model.layers.2.", "model.norm."),
    "schedule": ("model.layers.2.", "model.norm."),
}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from internal_policy.bupo import BuPOConfig, BuPOTrainer
    from internal_policy.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    for name, overrides in CASES.items():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = BuPOConfig(output_dir=f"{out}/{name}", method="bupo", per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=6, max_steps=2, use_cpu=True, bf16=False, report_to="none",
                          save_strategy="no", learning_rate=1e-2, weight_decay=0.01, seed=0, disable_tqdm=True,
                          **overrides)
        trainer = BuPOTrainer(model, lambda completions, **_: [float(len(c)) for c in completions], args,
                              train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
        trainer.train()
        assert trainer.accelerator.num_processes == world and type(trainer.model_wrapped).__name__ == \
            "DistributedDataParallel"
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.save({"before": before, "after": after, "log": trainer.phase_log}, f"{out}/{name}-{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_end_internal_steps_with_identical_parameters(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    for name in CASES:
        ranks = [torch.load(tmp_path / f"{name}-{r}.pt") for r in range(2)]
        assert [e["policy"] for e in ranks[0]["log"] if e["role"] == "current"] == (
            ["pi^1", "pi^1"] if name == "bupo" else ["pi^1", "pi^2"])
        for param, value in ranks[0]["after"].items():
            torch.testing.assert_close(ranks[1]["after"][param], value, rtol=0, atol=0, msg=f"{name}: {param}")
            moved = not torch.equal(value, ranks[0]["before"][param])
            assert moved == (not param.startswith(NEVER_USED[name])), f"{name}: {param} moved={moved}"
