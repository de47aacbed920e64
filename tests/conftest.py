"""Shared fixtures: the embedded model and tiny random models of every supported architecture.

Tiny models are built offline from configs, saved with `save_pretrained` next to the stories260K
tokenizer and loaded back through `load_model`, the path a user takes. Weights use a wide
initialisation and random norm gains/biases so entropies are far from ln|V| and every norm matters.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from hypothesis import settings as hypothesis_settings  # noqa: E402

# CI (`.ci/run` sets CI=1) replays the same examples every run, so a red build is reproducible;
# a local run keeps exploring new ones.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

from internal_policy.models import default_model_path, load_model  # noqa: E402

# One thread per test process: `make test` runs two xdist workers on two cores, and two torch threads per
# worker oversubscribe them (small ops then spin-wait: measured 10x slower on a busy 2-core machine).
torch.set_num_threads(1)

VOCAB = 512
COMMON = dict(vocab_size=VOCAB, initializer_range=0.2, tie_word_embeddings=False)


def _configs():
    import transformers as tf

    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, **COMMON)
    return {
        "llama": lambda: tf.LlamaConfig(**llama_like),
        "qwen2": lambda: tf.Qwen2Config(**llama_like),
        "qwen3": lambda: tf.Qwen3Config(head_dim=16, **llama_like),
        "mistral": lambda: tf.MistralConfig(**llama_like),
        "phi3": lambda: tf.Phi3Config(**{**llama_like, "num_key_value_heads": 4}, pad_token_id=0),
        "olmo2": lambda: tf.Olmo2Config(**llama_like, pad_token_id=0),
        "gemma": lambda: tf.GemmaConfig(head_dim=16, **llama_like),
        "gemma2": lambda: tf.Gemma2Config(head_dim=16, final_logit_softcapping=5.0, attn_logit_softcapping=20.0,
                                          query_pre_attn_scalar=16, **llama_like),
        "gemma3_text": lambda: tf.Gemma3TextConfig(head_dim=16, final_logit_softcapping=5.0, query_pre_attn_scalar=16,
                                                   sliding_window=4, **llama_like),
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=256, **COMMON),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                             num_attention_heads=4, max_position_embeddings=256,
                                             use_parallel_residual=True, **COMMON),
        "gptj": lambda: tf.GPTJConfig(n_embd=64, n_layer=3, n_head=4, rotary_dim=8, n_positions=256, **COMMON),
        "phi": lambda: tf.PhiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                    max_position_embeddings=256, **COMMON),
        "cohere": lambda: tf.CohereConfig(logit_scale=0.5, **llama_like),
        # mixture-of-experts FFNs and other pre-norm families
        "mixtral": lambda: tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **llama_like),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                               shared_expert_intermediate_size=32, **llama_like),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                               head_dim=16, **llama_like),
        "deepseek_v3": lambda: tf.DeepseekV3Config(
            **{**llama_like, "num_key_value_heads": 4}, n_routed_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=32, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1),
        "olmo": lambda: tf.OlmoConfig(**llama_like),
        "olmo3": lambda: tf.Olmo3Config(**llama_like),
        "smollm3": lambda: tf.SmolLM3Config(pad_token_id=0, eos_token_id=2, **llama_like),
        "glm": lambda: tf.GlmConfig(head_dim=16, pad_token_id=0, eos_token_id=2, **llama_like),
        "hunyuan_v1_dense": lambda: tf.HunYuanDenseV1Config(head_dim=16, **llama_like),
    }


ARCHITECTURES = tuple(_configs())


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Random norm gains and biases so normed inputs and biased decodings are exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln" in name or "ln_f" in name:
                param.copy_(1.0 + 0.5 * torch.randn(param.shape, generator=gen))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    """Each supported architecture in turn: a test taking `arch` runs once per architecture."""
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """factory(arch) -> folder of a saved tiny random model of that architecture (cached per session)."""
    from transformers import AutoModelForCausalLM

    made: dict[str, str] = {}
    configs = _configs()

    def make(arch: str) -> str:
        if arch not in made:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(configs[arch]())
            _randomise(model, seed=1)
            folder = tmp_path_factory.mktemp(arch)
            model.save_pretrained(folder)
            for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
                shutil.copy(default_model_path() / name, folder / name)
            made[arch] = str(folder)
        return made[arch]

    return make


@pytest.fixture(scope="session")
def stories():
    """The embedded stories260K model and tokenizer (fp32, CPU)."""
    return load_model()


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """factory(arch) -> (model, tokenizer) loaded through load_model from the saved folder."""
    cache: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = load_model(tiny_model_dir(arch))
        return cache[arch]

    return get
