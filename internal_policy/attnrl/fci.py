"""Forward Context Influence (FCI) of every reasoning step, from one forward pass (AttnRL).

For layer l (paper numbering 1..L; HF block l-1) and head h, with A[t, s] the softmax attention
probability of query token t on key s and W the row-normalised step-membership matrix:

    α^{l,h} = W A Wᵀ        (α[j, k] = mean over t in step j of mean over s in step k of A[t, s])
    y_k = max over (l, h) of Σ_{j ≥ k+Δ} α^{l,h}[j, k]        (Δ = 4: the next Δ-1 steps are ignored)

and y_0 = y_1 = 0 (the prompt and the first response step are never branch points); steps that start
after a `</think>` token get 0.

How the probabilities are obtained. HF's eager attention builds each layer's full
[batch, heads, T, T] probabilities (and `output_attentions` would then keep all L of them), which at
8k tokens is gigabytes per layer. So for the duration of one pass `step_attention` switches the model
to a registered attention implementation of its own: the model file's *own* `eager_attention_forward`
(so soft-capping, scaling, grouped-query heads and sliding windows are exactly the model's) run on
blocks of at most `QUERY_BLOCK` queries, each over only the keys its mask lets it see (under a causal
mask that skips about half of the T × T work). Each block's probabilities are reduced to the
[heads × steps × steps] matrix at once and dropped, and a layer's FCI is kept as soon as that layer has
run: memory holds one [batch, heads, block, T] block, never a layer's T × T map nor all layers'. The
one T × T object is the boolean mask the model builds once per pass ([batch, 1, T, T], 1 byte each).
The attention output is the eager one (equal to the model's usual kernel up to float rounding), so
the same pass can serve log-probs. On exit the model's previous implementation (sdpa, flash, ...)
is restored. Computing the probabilities from q/k captured by hooks would need each architecture's
RoPE, q/k norms, soft-capping and masks re-implemented; going through `AttentionInterface` gets the
post-RoPE q/k and the model's own eager math for free. `bench/attnrl_step.py` measures the pass
against a log-prob forward and against HF's plain eager attention. Models whose attention does not
go through that interface (e.g. GPT-J) are refused with a one-line error.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..models import ModelSpec, describe
from .steps import Steps

IMPLEMENTATION = "internal_policy_fci"
"""Name under which the query-chunked eager attention is registered in transformers' AttentionInterface."""
CHUNK_ELEMENTS = 2**25
"""Largest query block's probabilities, [batch, heads, queries, keys] elements (128 MiB in fp32)."""
QUERY_BLOCK = 128
"""Most queries per block: smaller blocks skip more of the causally masked keys, at some per-block cost
(128 was the fastest of 64-512 in bench/attnrl_step.py --query-block on CPU)."""

_ACTIVE: dict[nn.Module, tuple[StepAttention, int]] = {}
"""Attention modules of the models inside `step_attention`: module -> (accumulator, paper layer)."""


def check_delta(delta: int) -> int:
    """Δ must be a whole number ≥ 1 (Δ = 1 sums the step itself and every later step)."""
    if isinstance(delta, bool) or not isinstance(delta, (int, np.integer)) or delta < 1:
        raise InputError(f"delta (Δ) must be an integer >= 1, got {delta!r}; the published value is 4")
    return int(delta)


class StepAttention:
    """Step-to-step attention and FCI of one batch (one `Steps` per row), filled layer by layer.

    Used by the model pass (`step_attention`, one query block at a time) and by `fci_from_attentions`
    (given probabilities), so both compute α and y with the same code. α is accumulated in float64.
    """

    def __init__(self, steps: Sequence[Steps], width: int, n_layers: int, delta: int = 4,
                 device: torch.device | str = "cpu", chunk_elements: int = CHUNK_ELEMENTS):
        self.delta = check_delta(delta)
        self.chunk_elements = max(1, int(chunk_elements))
        if not steps:
            raise InputError("no sequences to score")
        too_long = [s.length for s in steps if s.length > width]
        if too_long:
            raise InputError(f"steps cover {max(too_long)} tokens but the sequences are {width} wide")
        self.steps, self.n_layers = list(steps), n_layers
        n_steps = max(s.n_steps for s in steps)
        weights = torch.zeros(len(steps), n_steps, width)
        for row, sequence in enumerate(steps):
            for k, (start, end) in enumerate(sequence.ranges):
                weights[row, k, start:end] = 1.0 / (end - start)
        self.weights = weights.to(device)
        index = torch.arange(n_steps)
        self.later = (index[:, None] >= index[None, :] + self.delta).double()  # [j, k]: j ≥ k + Δ
        self.per_layer = torch.zeros(len(steps), n_layers, n_steps, dtype=torch.float64)
        self.layers_seen: list[int] = []

    def block(self, probs: torch.Tensor, first_query: int) -> torch.Tensor:
        """W[:, queries] · A[queries, :] · Wᵀ for one block of query rows: [batch, heads, steps, steps]."""
        dtype = torch.promote_types(probs.dtype, torch.float32)
        weights = self.weights.to(probs.device, dtype)
        rows = weights[:, None, :, first_query : first_query + probs.shape[-2]]
        keys = weights[:, None, :, : probs.shape[-1]].transpose(-1, -2)
        return rows @ (probs.detach().to(dtype) @ keys)

    def add_layer(self, layer: int, alpha: torch.Tensor) -> None:
        """Record paper layer `layer`'s α [batch, heads, steps, steps]: keep max over heads of Σ_{j ≥ k+Δ} α[j, k]."""
        alpha = alpha.double()
        influence = (alpha * self.later.to(alpha.device)).sum(-2)  # [batch, heads, k]
        self.per_layer[:, layer - 1] = influence.amax(1).cpu()
        self.layers_seen.append(layer)

    def fci(self) -> list[np.ndarray]:
        """FCI y_k of every step of every row (float64, length = that row's step count)."""
        missing = sorted(set(range(1, self.n_layers + 1)) - set(self.layers_seen))
        if missing:
            raise InputError(f"no attention probabilities reached layers {missing}: the model's attention "
                             "did not run through the query-chunked eager implementation")
        best = self.per_layer.amax(1)
        out = []
        for row, sequence in enumerate(self.steps):
            y = best[row, : sequence.n_steps].numpy().copy()
            y[np.asarray(sequence.silenced())] = 0.0
            out.append(y)
        return out


def fci_from_attentions(attentions: Sequence[torch.Tensor], steps: Sequence[Steps], delta: int = 4) -> StepAttention:
    """FCI from given probabilities, one [batch, heads, T, T] tensor per layer (e.g. `output_attentions`)."""
    if not attentions:
        raise InputError("no attention tensors given")
    result = StepAttention(steps, attentions[0].shape[-1], len(attentions), delta, attentions[0].device)
    for layer, probs in enumerate(attentions, start=1):
        result.add_layer(layer, result.block(probs, 0))
    return result


def _eager_function(module: nn.Module):
    """The `eager_attention_forward` of the module's own modeling file (None if it has none)."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean keep-mask block as the additive float mask eager attention adds (0 kept, dtype min masked)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.where(mask, torch.zeros((), device=mask.device, dtype=dtype), torch.finfo(dtype).min)


def _visible_keys(mask: torch.Tensor | None, n_keys: int) -> int:
    """Keys up to the last one any query of the block may see (a causal block ignores the keys after it)."""
    if mask is None or mask.dtype != torch.bool:
        return n_keys
    seen = mask.any(dim=(0, 1, 2)).nonzero()
    return int(seen.max()) + 1 if seen.numel() else n_keys


def _chunked_eager(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs):
    """The model's eager attention, one block of queries at a time, each block only over the keys its mask
    lets it see (under a causal mask, about half the T × T work); each block's probabilities feed the
    `StepAttention` registered for this module (if any) and are dropped. Returns (output, None)."""
    eager = _eager_function(module)
    target = _ACTIVE.get(module)
    batch, heads, n_queries = query.shape[:3]
    block = n_queries
    if target is not None:
        block = max(1, min(QUERY_BLOCK, target[0].chunk_elements // (batch * heads * key.shape[-2])))
    outputs, alpha = [], None
    for first in range(0, n_queries, block):
        mask = None if attention_mask is None else attention_mask[:, :, first : first + block]
        keys = _visible_keys(mask, key.shape[-2])
        mask = None if mask is None else _additive(mask[..., :keys], query.dtype)
        out, probs = eager(module, query[:, :, first : first + block], key[:, :, :keys], value[:, :, :keys], mask,
                           **kwargs)
        outputs.append(out)
        if target is not None:
            part = target[0].block(probs, first)
            alpha = part if alpha is None else alpha + part
        del probs
    if target is not None:
        target[0].add_layer(target[1], alpha)
    return torch.cat(outputs, dim=1), None


def _boolean_mask(*args, **kwargs):
    """The 4-D boolean mask (never skipped for pure causal attention): 1 byte per entry, made additive per block."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    kwargs.pop("dtype", None)
    return sdpa_mask(*args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPLEMENTATION, _chunked_eager)
        AttentionMaskInterface.register(IMPLEMENTATION, _boolean_mask)


def attention_modules(model: nn.Module, spec: ModelSpec | None = None) -> dict[nn.Module, int]:
    """{attention module: paper layer} for every decoder block, or a one-line error if attention can't run eagerly."""
    spec = spec or describe(model)
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    can_switch = getattr(model, "_can_set_attn_implementation", None)
    found: dict[nn.Module, int] = {}
    for index, block in enumerate(spec.layers):
        module = next((m for m in block.modules() if "Attention" in type(m).__name__ and _eager_function(m)), None)
        if module is not None:
            found[module] = index + 1
    if can_switch is None or not can_switch() or len(found) != spec.n_layers:
        raise InputError(f"{arch}: its attention cannot run eagerly through transformers' AttentionInterface "
                         "(no eager_attention_forward / ALL_ATTENTION_FUNCTIONS in its modeling file), so FCI "
                         "cannot read its attention probabilities; use a model whose modeling file has them "
                         "(Llama, Qwen, Mistral, Gemma, GPT-2, GPT-NeoX, Phi, ...)")
    return found


@contextmanager
def step_attention(
    model: nn.Module,
    steps: Sequence[Steps],
    width: int,
    delta: int = 4,
    chunk_elements: int = CHUNK_ELEMENTS,
    spec: ModelSpec | None = None,
) -> Iterator[StepAttention]:
    """Within the block, forwards of `model` on a [len(steps), width] batch fill the yielded `StepAttention`.

    The model runs its eager attention in query blocks of at most `chunk_elements` probabilities (see
    the module docstring) and gets its previous attention implementation back on exit, error or not.
    Run one forward per block (`use_cache=False`); its outputs (logits) are usable as usual.
    """
    modules = attention_modules(model, spec)
    _register()
    device = model.get_input_embeddings().weight.device
    result = StepAttention(steps, width, len(modules), delta, device, chunk_elements)
    original = model.config._attn_implementation
    model.set_attn_implementation(IMPLEMENTATION)
    _ACTIVE.update({module: (result, layer) for module, layer in modules.items()})
    try:
        yield result
    finally:
        for module in modules:
            _ACTIVE.pop(module, None)
        model.set_attn_implementation(original)


@torch.no_grad()
def step_fci(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    steps: Sequence[Steps],
    delta: int = 4,
    chunk_elements: int = CHUNK_ELEMENTS,
    spec: ModelSpec | None = None,
) -> StepAttention:
    """One no-grad forward of a right-padded batch under `step_attention`; `.fci()` gives each row's y."""
    if len(steps) != input_ids.shape[0]:
        raise InputError(f"{len(steps)} step lists for a batch of {input_ids.shape[0]} rows")
    with step_attention(model, steps, input_ids.shape[1], delta, chunk_elements, spec) as result:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    return result
