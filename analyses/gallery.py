"""Regenerate every figure in figures/ (PNG only; the API also writes PDFs).

Profiles the embedded stories260K model and two tiny random architectures (Qwen3, GPT-2, built
offline from configs with initializer_range 0.2) on the bundled sample stories, then draws:
flow, delta, cosine, heatmap (stories260K), compare (all three) and stages (hand-made ΔH_FFN curves
shaped like the paper's Qwen3-4B and Llama readings of Fig. 3, plus the two edge cases), and the
logit-lens grid of stories260K (a second profile of its layer outputs with the final norm, every
statistic and the top-3 tokens).

    HF_HUB_OFFLINE=1 PYTHONPATH=. python analyses/gallery.py [--runs runs/gallery] [--out figures]

Takes well under a minute on a laptop CPU. The tiny models are untrained: their curves show the
plots working on other depths and architectures, not the paper's findings.
"""

from __future__ import annotations

import argparse
import shutil
from importlib import resources
from pathlib import Path

import numpy as np

from internal_policy.inputs import read_jsonl
from internal_policy.models import load_model
from internal_policy.plot import (
    Run,
    compare_figure,
    cosine_figure,
    delta_figure,
    flow_figure,
    heatmap_figure,
    lens_figure,
    save_figure,
    stages_figure,
)
from internal_policy.profile import profile
from internal_policy.stages import segment


def tiny_models() -> dict:
    """name -> untrained model of another architecture and depth, sharing stories260K's 512-token vocabulary."""
    import torch
    import transformers as tf

    common = dict(vocab_size=512, initializer_range=0.2, tie_word_embeddings=False)
    configs = {
        "tiny-qwen3-12L": tf.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=12, head_dim=16,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                         **common),
        "tiny-gpt2-8L": tf.GPT2Config(n_embd=64, n_layer=8, n_head=4, n_positions=512, **common),
    }
    torch.manual_seed(0)
    return {name: tf.AutoModelForCausalLM.from_config(cfg).eval() for name, cfg in configs.items()}


def hand_made_curves() -> dict:
    """The four kinds of ΔH_FFN curve the stage rule must handle (as in tests/test_stages.py)."""
    rng = np.random.default_rng(1)
    qwen = np.r_[[4.0, 3.1, 2.2, 1.6, 1.1, 0.7], rng.uniform(-0.2, 0.2, 20), np.linspace(-0.8, -10.0, 10)]
    noisy = qwen.copy()
    noisy[[2, 15, 20, 30]] = [0.0, 1.5, -2.0, 0.3]
    llama = np.r_[rng.uniform(0.03, 0.2, 27), -0.2]
    return {
        "three stages (Qwen3-4B-like, L = 36)": segment(qwen),
        "same with four noisy layers": segment(noisy),
        "weakly positive, converging at L (Llama-like)": segment(llama),
        "no exploration stage": segment(np.r_[np.zeros(8), -np.linspace(0.5, 3, 6)] + rng.normal(0, 0.003, 14)),
    }


def profile_all(runs_dir: Path) -> list[Path]:
    """Profile stories260K and the tiny models on the bundled samples into fresh run folders, then the lens run."""
    records = read_jsonl(Path(str(resources.files("internal_policy") / "assets" / "samples" / "stories.jsonl")))
    model, tokenizer = load_model()
    models = {"stories260K": model, **tiny_models()}
    dirs = []
    for name, m in models.items():
        out = runs_dir / name
        shutil.rmtree(out, ignore_errors=True)
        profile(m, tokenizer, records, out_dir=out, progress=False, model_name=name)
        dirs.append(out)
    lens = runs_dir / "stories260K-lens"  # the logit lens: layer outputs with the final norm, top-3 tokens
    shutil.rmtree(lens, ignore_errors=True)
    profile(model, tokenizer, records, components=["layer"], final_norm=True, stats=["all"], topk=3, out_dir=lens,
            progress=False, model_name="stories260K")
    return [*dirs, lens]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/gallery"), help="where the profile runs go")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="where the PNGs go")
    args = parser.parse_args()
    stories, *tiny, lens = [Run.from_dir(d) for d in profile_all(args.runs)]
    figures = {
        "flow": flow_figure([stories, tiny[0]]),
        "delta": delta_figure(stories),
        "delta-tiny-qwen3": delta_figure(tiny[0]),
        "cosine": cosine_figure(stories),
        "heatmap": heatmap_figure(stories.tokens(), record_id="dog", max_positions=64, vocab_size=stories.vocab_size,
                                  label=stories.label),
        "compare": compare_figure([stories, *tiny]),
        "lens": lens_figure(lens.tokens(), record_id="dog", max_positions=24, stat="nll", label="stories260K"),
        "stages": stages_figure(hand_made_curves()),
    }
    for name, fig in figures.items():
        (path,) = save_figure(fig, args.out, name, formats=("png",))
        print(f"{path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
