"""Load a causal LM and describe where its residual-stream pieces live.

`describe(model)` returns a `ModelSpec`: the decoder blocks, the final norm, the unembedding
(weight, bias, logit soft-capping / scaling) and, per block, which submodule writes A_l and F_l
into the residual stream and which produces the normed module inputs. Everything else in the
package (capture, profiling, BuPO) works from a `ModelSpec`, so adding an architecture means
adding one row to `_BLOCK_LAYOUTS`.

Layer numbering: the paper's l = 1..L (0 = embedding output). `spec.layers[i]` is the 0-based
HF / TransformerLens block i, i.e. paper layer l = i + 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL = "stories260K"
"""Name of the embedded default model (Karpathy's llama2.c stories260K, MIT licence)."""


class UnsupportedModelError(ValueError):
    """The model's architecture cannot be split into H_{l-1} + A_l + F_l = H_l."""


@dataclass(frozen=True)
class BlockLayout:
    """Submodule names inside one decoder block (attribute paths relative to the block).

    attn / ffn: the module whose output is exactly what the sublayer adds to the residual stream.
    attn_in / ffn_in: the module whose output is the sublayer's normed input; None means the
    sublayer reads the residual stream directly (H_{l-1} for attention, resid_mid for the FFN).
    parallel: attention and FFN both read H_{l-1} (GPT-NeoX, GPT-J, Phi-2, Cohere); then ffn_in is
    the norm of H_{l-1} and resid_mid = H_{l-1} + A_l is reported but read by no module.
    """

    attn: str
    ffn: str
    attn_in: str | None
    ffn_in: str | None
    parallel: bool = False


_PRE_NORM = BlockLayout("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
_SANDWICH = BlockLayout(  # Gemma2/3: extra post-norms sit between the sublayer and the residual add
    "post_attention_layernorm", "post_feedforward_layernorm", "input_layernorm", "pre_feedforward_layernorm"
)
_POST_NORM = BlockLayout("post_attention_layernorm", "post_feedforward_layernorm", None, None)  # OLMo2

_BLOCK_LAYOUTS: dict[str, BlockLayout] = {
    **{t: _PRE_NORM for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gemma",
        "olmo", "deepseek_v3", "smollm3", "glm", "hunyuan_v1_dense",
    )},
    **{t: _SANDWICH for t in ("gemma2", "gemma3_text")},
    **{t: _POST_NORM for t in ("olmo2", "olmo3")},
    "gpt2": BlockLayout("attn", "mlp", "ln_1", "ln_2"),
    "gpt_neox": BlockLayout("attention", "mlp", "input_layernorm", "post_attention_layernorm", parallel=True),
    "gptj": BlockLayout("attn", "mlp", "ln_1", "ln_1", parallel=True),
    "phi": BlockLayout("self_attn", "mlp", "input_layernorm", "input_layernorm", parallel=True),
    "cohere": BlockLayout("self_attn", "mlp", "input_layernorm", "input_layernorm", parallel=True),
}
_LAYER_LISTS = ("layers", "h", "blocks")
_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "ln_final")


@dataclass
class ModelSpec:
    """Where the residual-stream pieces of one loaded model live (see module docstring)."""

    model_type: str
    layers: nn.ModuleList
    layout: BlockLayout
    final_norm: nn.Module | None
    unembed_weight: torch.Tensor
    unembed_bias: torch.Tensor | None
    logit_softcap: float | None = None
    logit_scale: float = 1.0

    @property
    def n_layers(self) -> int:
        """L, the number of decoder blocks."""
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.unembed_weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.unembed_weight.shape[0]

    def block_part(self, index: int, name: str) -> nn.Module:
        """Submodule `name` (a dotted path) of 0-based block `index` (paper layer index + 1)."""
        module: nn.Module = self.layers[index]
        for part in name.split("."):
            module = getattr(module, part)
        return module


def describe(model: nn.Module) -> ModelSpec:
    """Build the `ModelSpec` of a HF causal LM, or raise `UnsupportedModelError` naming what is missing."""
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    layout = _BLOCK_LAYOUTS.get(model_type)
    if layout is None:
        raise UnsupportedModelError(
            f"architecture {arch} (model_type={model_type!r}) has no residual-stream layout; supported "
            f"model types: {', '.join(sorted(_BLOCK_LAYOUTS))}. Add a BlockLayout row in "
            "internal_policy/models.py naming its attention/FFN write modules and input norms."
        )
    if model_type == "gpt_neox":
        layout = BlockLayout(**{**layout.__dict__, "parallel": bool(getattr(config, "use_parallel_residual", True))})
    base = getattr(model, "base_model", model)
    layers = next((getattr(base, n) for n in _LAYER_LISTS if isinstance(getattr(base, n, None), nn.ModuleList)), None)
    if layers is None:
        raise UnsupportedModelError(f"{arch}: no decoder block list found (looked for {_LAYER_LISTS} on {type(base).__name__})")
    final_norm = next((getattr(base, n) for n in _FINAL_NORMS if isinstance(getattr(base, n, None), nn.Module)), None)
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise UnsupportedModelError(f"{arch}: no output embedding (lm_head) to decode hidden states with")
    for part in {layout.attn, layout.ffn, layout.attn_in, layout.ffn_in} - {None}:
        module = layers[0]
        for name in part.split("."):
            if not hasattr(module, name):
                raise UnsupportedModelError(f"{arch}: decoder block has no submodule {part!r} expected by its layout")
            module = getattr(module, name)
    scale = getattr(config, "logit_scale", None) or 1.0
    if getattr(config, "logits_scaling", None):  # Granite divides its logits
        scale = 1.0 / config.logits_scaling
    return ModelSpec(
        model_type=model_type,
        layers=layers,
        layout=layout,
        final_norm=final_norm,
        unembed_weight=head.weight,
        unembed_bias=getattr(head, "bias", None),
        logit_softcap=getattr(config, "final_logit_softcapping", None),
        logit_scale=float(scale),
    )


def default_model_path() -> Path:
    """Path of the embedded stories260K model folder shipped inside the package."""
    return Path(str(resources.files("internal_policy") / "assets" / DEFAULT_MODEL))


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """Turn a CLI dtype name into a torch dtype ('auto' keeps the checkpoint's)."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device | None = "cpu",
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
):
    """Load (model, tokenizer) in eval mode; None or 'stories260K' loads the embedded default model.

    The tokenizer is returned as loaded; models without a pad token are handled by the batching
    code (it pads with eos/unk under an attention mask), so nothing is mutated here.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path() if name_or_path in (None, DEFAULT_MODEL) else name_or_path
    if isinstance(path, (str, os.PathLike)) and str(path).startswith((".", "/")) and not Path(path).exists():
        raise FileNotFoundError(f"model folder {path} does not exist; pass a local HF model folder or a hub name")
    kwargs = {"dtype": resolve_dtype(dtype)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load model {name_or_path!r}: {err}. Offline, pass a local folder saved with save_pretrained."
        ) from err
    if device_map is None and device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def pad_token_id(tokenizer) -> int:
    """A token id to pad with: the pad token, else eos, else unk, else 0 (always under an attention mask)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if candidate is not None:
            return int(candidate if not isinstance(candidate, list) else candidate[0])
    return 0


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's position scheme supports, if the config says."""
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
