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
from einops import einsum, rearrange
from torch import nn

from .errors import InputError, UnsupportedModelError  # UnsupportedModelError: also importable from here

DEFAULT_MODEL = "stories260K"
"""Name of the embedded default model (Karpathy's llama2.c stories260K, MIT licence)."""


@dataclass(frozen=True)
class BlockLayout:
    """Submodule names inside one decoder block (attribute paths relative to the block).

    attn / ffn: the module whose output is exactly what the sublayer adds to the residual stream.
    attn_in / ffn_in: the module whose output is the sublayer's normed input; None means the
    sublayer reads the residual stream directly (H_{l-1} for attention, resid_mid for the FFN).
    In parallel blocks (GPT-NeoX, GPT-J, Phi-2, Cohere) attention and FFN both read H_{l-1}: ffn_in
    is then a norm of H_{l-1}, and resid_mid = H_{l-1} + A_l is reported but read by no module.
    """

    attn: str
    ffn: str
    attn_in: str | None
    ffn_in: str | None
    attn_out: str = "self_attn.o_proj"
    """The attention output projection, whose input is the concatenation of the heads' outputs z_h."""


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
    "gpt2": BlockLayout("attn", "mlp", "ln_1", "ln_2", "attn.c_proj"),
    "gpt_neox": BlockLayout("attention", "mlp", "input_layernorm", "post_attention_layernorm", "attention.dense"),
    "gptj": BlockLayout("attn", "mlp", "ln_1", "ln_1", "attn.out_proj"),
    "phi": BlockLayout("self_attn", "mlp", "input_layernorm", "input_layernorm", "self_attn.dense"),
    "cohere": BlockLayout("self_attn", "mlp", "input_layernorm", "input_layernorm"),
}
_LAYER_LISTS = ("layers", "h", "blocks")
_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "ln_final")


@dataclass(frozen=True)
class HeadProjection:
    """The attention output projection of one block, split by head: A = Σ_h z_h W[h] (+ bias).

    `weight[h]` is [head_dim, d_model] (HF Linear and GPT-2 Conv1D both normalised to this), `bias` the
    projection's bias or None. `norm_after` names the norm that sits between the projection and the
    residual stream (Gemma2/3 sandwich, OLMo2 post-norm): there A_l = norm(Σ_h ...) is not a sum of heads.
    """

    module: nn.Module
    n_heads: int
    head_dim: int
    weight: torch.Tensor
    bias: torch.Tensor | None
    norm_after: str | None

    def writes(self, z: torch.Tensor) -> torch.Tensor:
        """Each head's write z_h W[h] [..., n_heads, d_model] from the projection input z [..., n_heads·head_dim].

        The bias is not in any head's write: Σ_h writes + bias is the projection's output."""
        heads = rearrange(z, "... (h d) -> ... h d", h=self.n_heads)
        return einsum(heads, self.weight.to(z.dtype), "... h d, h d m -> ... h m")


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
    n_heads: int = 0

    @property
    def n_layers(self) -> int:
        """L, the number of decoder blocks."""
        return len(self.layers)

    @property
    def d_model(self) -> int:
        """Width of the residual stream (columns of the unembedding)."""
        return self.unembed_weight.shape[1]

    @property
    def vocab_size(self) -> int:
        """|V|, the number of rows of the unembedding."""
        return self.unembed_weight.shape[0]

    def head_projection(self, index: int) -> HeadProjection:
        """The per-head view of 0-based block `index`'s attention output projection (see `HeadProjection`)."""
        module = self.block_part(index, self.layout.attn_out)
        weight = module.weight if isinstance(module, nn.Linear) else module.weight.T  # Conv1D stores [in, out]
        n_heads = self.n_heads
        if n_heads < 1:
            raise UnsupportedModelError(f"{self.model_type}: the config gives no number of attention heads "
                                        "(num_attention_heads or n_head), so the attention write cannot be split "
                                        "by head")
        if weight.shape[1] % n_heads:
            raise UnsupportedModelError(f"{self.model_type}: output projection input size {weight.shape[1]} is not "
                                        f"a multiple of {n_heads} heads")
        head_dim = weight.shape[1] // n_heads
        per_head = rearrange(weight, "m (h d) -> h d m", h=n_heads)
        norm_after = None if self.layout.attn == self.layout.attn_out.split(".")[0] else self.layout.attn
        return HeadProjection(module, n_heads, head_dim, per_head, getattr(module, "bias", None), norm_after)

    def head_projections(self) -> list[HeadProjection]:
        """Every block's `HeadProjection` (0-based block index); an `UnsupportedModelError` where a norm sits between
        the projection and the stream, so that head writes do not sum to A_l (profiling and ablation both ask here)."""
        projections = [self.head_projection(i) for i in range(self.n_layers)]
        if projections and projections[0].norm_after is not None:
            raise UnsupportedModelError(
                f"{self.model_type}: attention heads cannot be taken apart, because the norm "
                f"{projections[0].norm_after!r} sits between the output projection and the residual stream "
                "(A_l = norm(Σ_h head writes) is not a sum of heads); drop attn_head from --components and use attn")
        return projections

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
    base = getattr(model, "base_model", model)
    layers = next((getattr(base, n) for n in _LAYER_LISTS if isinstance(getattr(base, n, None), nn.ModuleList)), None)
    if layers is None:
        raise UnsupportedModelError(f"{arch}: no decoder block list found (looked for {_LAYER_LISTS} "
                                    f"on {type(base).__name__})")
    final_norm = next((getattr(base, n) for n in _FINAL_NORMS if isinstance(getattr(base, n, None), nn.Module)), None)
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise UnsupportedModelError(f"{arch}: no output embedding (lm_head) to decode hidden states with")
    for part in {layout.attn, layout.ffn, layout.attn_in, layout.ffn_in, layout.attn_out} - {None}:
        module = layers[0]
        for name in part.split("."):
            if not hasattr(module, name):
                raise UnsupportedModelError(f"{arch}: decoder block has no submodule {part!r} expected by its layout")
            module = getattr(module, name)
    scale = getattr(config, "logit_scale", None) or 1.0  # Cohere multiplies its logits
    return ModelSpec(
        model_type=model_type,
        layers=layers,
        layout=layout,
        final_norm=final_norm,
        unembed_weight=head.weight,
        unembed_bias=getattr(head, "bias", None),
        logit_softcap=getattr(config, "final_logit_softcapping", None),
        logit_scale=float(scale),
        n_heads=int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 0)),
    )


def default_model_path() -> Path:
    """Path of the embedded stories260K model folder shipped inside the package."""
    return Path(str(resources.files("internal_policy") / "assets" / DEFAULT_MODEL))


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
DTYPES = ("auto", *_DTYPES)
"""Dtype names the CLI accepts ('auto' keeps the checkpoint's)."""


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """Turn a CLI dtype name into a torch dtype ('auto' keeps the checkpoint's)."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    if dtype not in _DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> str:
    """A device this machine has: None picks cuda when available, else cpu; a missing one is an InputError."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (parsed.index or 0) >= count:
            raise InputError(f"device {str(device)!r} is not available: this machine has {count} CUDA GPU(s) "
                             f"visible to torch{f' (cuda:0..cuda:{count - 1})' if count else ''}; use --device cpu")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {str(device)!r} is not available (no Apple-silicon GPU); use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"device {str(device)!r} is not supported; use cpu, cuda, cuda:N or mps")
    return str(parsed)


def _is_path(name: str | os.PathLike) -> bool:
    """Whether a --model value can only be a local folder: an existing path, or a string a hub id never is.

    Hub ids are 'name' or 'org/name'; a leading '.', '/' or '~', a backslash or a second '/' mark a path.
    A missing 'name' or 'org/name' is tried on the hub, and the error then names both readings.
    """
    text = str(name)
    return (not isinstance(name, str) or Path(text).expanduser().exists() or text.startswith((".", "/", "~"))
            or "\\" in text or text.count("/") > 1)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device | None = "cpu",
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
):
    """Load (model, tokenizer) in eval mode; None or 'stories260K' loads the embedded default model.

    `device=None` leaves the model where `from_pretrained` put it. The tokenizer is returned as
    loaded; models without a pad token are handled by the batching code (it pads with eos/unk under
    an attention mask), so nothing is mutated here. A missing folder, a hub name that cannot be
    fetched, or a damaged checkpoint raises `InputError`.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path() if name_or_path in (None, DEFAULT_MODEL) else name_or_path
    if _is_path(path) and not Path(str(path)).expanduser().exists():
        raise InputError(f"model folder {path} does not exist; pass an existing folder saved with save_pretrained "
                         "(or a hub id such as org/name)")
    if _is_path(path) and not Path(str(path)).expanduser().is_dir():
        raise InputError(f"model path {path} is a file; pass the folder that holds config.json and the weights")
    kwargs = {"dtype": resolve_dtype(dtype)}
    device = resolve_device(device) if device is not None else None
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except SafetensorError as err:
        raise InputError(f"model {path}: a weights file (*.safetensors) is damaged or truncated ({err}); "
                         "copy or download it again") from err
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not _is_path(path):
            from huggingface_hub import constants

            reason = f"there is no folder {path} here, and " + (
                "the hub is off (HF_HUB_OFFLINE is set) and its cache does not hold it" if constants.HF_HUB_OFFLINE
                else f"the hub could not provide it ({reason.rstrip('.')})")
        raise InputError(f"could not load model {path}: {reason.rstrip('.')}; "
                         "pass a local folder saved with save_pretrained") from err
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
