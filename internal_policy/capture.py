"""Hook-based capture of the residual-stream decomposition during one forward pass.

For each paper layer l = 1..L (block index l-1) the capture emits, in forward order,
`attn_in` (normed attention input), `attn` (A_l, what attention adds to the stream),
`resid_mid` (H_{l-1} + A_l), `ffn_in` (normed FFN input), `ffn` (F_l) and `layer` (H_l, the raw
block output, never HF's final-normed `hidden_states[-1]`); layer 0 emits only `layer` (H_0,
the embedding output the first block reads, after any embedding scaling).

Why plain PyTorch hooks on the HF model rather than TransformerLens' `TransformerBridge`: the
bridge forces eager attention (slow and memory-hungry on long responses), mutates a model passed
in (it would break the TRL policy and `save_pretrained`), and does not compose with
`device_map` sharding. The hook *names* follow the field's convention all the same, and
`internal_policy.lens_bridge` recomputes the same tensors through the bridge; the test suite
checks that both paths agree on every supported architecture.

Per-head writes (`attn_head`, opt-in with `heads=True`): a forward pre-hook on the attention output
projection (`BlockLayout.attn_out`) emits its input z = the heads' outputs concatenated
[batch, seq, n_heads·head_dim], just before `attn` of the same layer; `HeadProjection.writes` turns
(kept) rows of z into each head's write z_h W_O[h] [..., n_heads, d_model], so a consumer that keeps
few positions never builds the full [batch, seq, n_heads, d_model] tensor. Head writes exclude the
projection's bias: Σ_h writes + bias = A_l. Models with a norm between the projection and the stream
(Gemma2/3, OLMo2/3) are refused (`ModelSpec.head_projections`).

Emission is streaming (a callback per tensor) so a consumer can decode and drop each tensor at
once: peak memory then does not grow with the number of layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .models import BlockLayout, ModelSpec, describe

COMPONENTS: tuple[str, ...] = ("layer", "attn_in", "attn", "resid_mid", "ffn_in", "ffn")
"""The default components (see the module docstring); `layer` at layer 0 is the embedding output."""
HEAD = "attn_head"
"""The per-head component: opt-in, since its cost grows with the number of heads."""
ALL_COMPONENTS: tuple[str, ...] = (*COMPONENTS, HEAD)
"""Every component a profile can ask for."""

Site = tuple[int, str]
"""(paper layer 0..L, component)."""

OnTensor = Callable[[int, str, torch.Tensor, "Site | None"], None]
"""callback(layer, component, tensor [batch, seq, d], alias): `alias` names an earlier site that is
the very same tensor (e.g. OLMo2's attention reads H_{l-1} unnormed): then `tensor` is None and the
consumer reuses what it computed for `alias` instead of decoding again. For `attn_head` the tensor is
the output projection's input z [batch, seq, n_heads·head_dim] (see the module docstring)."""

TL_HOOK_NAMES: dict[str, str] = {
    "layer": "blocks.{i}.hook_resid_post",
    "attn_in": "blocks.{i}.ln1.hook_out",
    "attn": "blocks.{i}.hook_attn_out",
    "resid_mid": "blocks.{i}.hook_resid_mid",
    "ffn_in": "blocks.{i}.ln2.hook_out",
    "ffn": "blocks.{i}.hook_mlp_out",
}
"""TransformerLens names of each component for 0-based block i (= paper layer i + 1)."""


def alias_of(layout: BlockLayout, layer: int, component: str) -> Site | None:
    """The earlier site that is the very same tensor as (layer, component), or None.

    Attention without an input norm reads H_{l-1} (OLMo2); an FFN without one reads resid_mid; an FFN
    sharing the attention's norm (Phi-2, GPT-J, Cohere) reads attn_in."""
    if component == "attn_in" and layout.attn_in is None:
        return (layer - 1, "layer")
    if component == "ffn_in" and layout.ffn_in is None:
        return (layer, "resid_mid")
    if component == "ffn_in" and layout.ffn_in == layout.attn_in:
        return (layer, "attn_in")
    return None


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def capture(model: nn.Module, on_tensor: OnTensor, spec: ModelSpec | None = None,
            heads: bool = False) -> Iterator[ModelSpec]:
    """Within the block, every forward of `model` streams its decomposition to `on_tensor`.

    With `heads`, also (layer, "attn_head", z) with z the output projection's input (see module docstring)."""
    spec = spec or describe(model)
    if heads:
        spec.head_projections()
    layout = spec.layout
    block_input: dict[int, torch.Tensor] = {}
    handles = []

    def on_block_input(index):
        def hook(_module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            block_input[index] = h
            if index == 0:
                on_tensor(0, "layer", h, None)
        return hook

    def on_attn_in(index):
        return lambda _m, _a, out: on_tensor(index + 1, "attn_in", _first(out), None)

    def on_attn(index):
        def hook(_module, _args, out):
            layer, a = index + 1, _first(out)
            if (alias := alias_of(layout, layer, "attn_in")) is not None:
                on_tensor(layer, "attn_in", None, alias)
            on_tensor(layer, "attn", a, None)
            on_tensor(layer, "resid_mid", block_input[index] + a, None)
        return hook

    def on_heads(index):
        def hook(_module, args, kwargs):
            on_tensor(index + 1, HEAD, args[0] if args else next(iter(kwargs.values())), None)
        return hook

    def on_ffn_in(index):
        return lambda _m, _a, out: on_tensor(index + 1, "ffn_in", _first(out), None)

    def on_ffn(index):
        def hook(_module, _args, out):
            layer = index + 1
            if (alias := alias_of(layout, layer, "ffn_in")) is not None:
                on_tensor(layer, "ffn_in", None, alias)
            on_tensor(layer, "ffn", _first(out), None)
        return hook

    def on_block_output(index):
        def hook(_module, _args, out):
            on_tensor(index + 1, "layer", _first(out), None)
            block_input.pop(index, None)
        return hook

    try:
        for i, block in enumerate(spec.layers):
            handles.append(block.register_forward_pre_hook(on_block_input(i), with_kwargs=True))
            if layout.attn_in is not None:
                handles.append(spec.block_part(i, layout.attn_in).register_forward_hook(on_attn_in(i)))
            if heads:
                handles.append(spec.block_part(i, layout.attn_out).register_forward_pre_hook(on_heads(i),
                                                                                            with_kwargs=True))
            handles.append(spec.block_part(i, layout.attn).register_forward_hook(on_attn(i)))
            if layout.ffn_in is not None and layout.ffn_in != layout.attn_in:
                handles.append(spec.block_part(i, layout.ffn_in).register_forward_hook(on_ffn_in(i)))
            handles.append(spec.block_part(i, layout.ffn).register_forward_hook(on_ffn(i)))
            handles.append(block.register_forward_hook(on_block_output(i)))
        yield spec
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def extract(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    components: tuple[str, ...] = COMPONENTS,
    spec: ModelSpec | None = None,
) -> dict[Site, torch.Tensor]:
    """All requested components of one forward pass, as {(layer, component): [batch, seq, d]}.

    `attn_head` (not in the default) gives each head's write [batch, seq, n_heads, d] (bias excluded).
    Holds every tensor at once: for profiling long inputs use `capture` with a streaming consumer.
    """
    found: dict[Site, torch.Tensor] = {}
    spec = spec or describe(model)
    projections = spec.head_projections() if HEAD in components else []

    def keep(layer, component, x, alias):
        if component == HEAD:
            found[(layer, component)] = projections[layer - 1].writes(x.detach())
        elif component in components:
            found[(layer, component)] = found[alias] if alias is not None else x.detach()

    with capture(model, keep, spec, heads=bool(projections)):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return found


def _owner(model: nn.Module, child: nn.Module) -> tuple[nn.Module, str]:
    """The module holding `child` as a direct submodule, and the attribute name it is held under."""
    for module in model.modules():
        for name, sub in module.named_children():
            if sub is child:
                return module, name
    raise ValueError(f"{type(child).__name__} is not a submodule of {type(model).__name__}")


@contextmanager
def truncated(
    model: nn.Module, layer: int, spec: ModelSpec | None = None, final_norm: bool = False
) -> Iterator[ModelSpec]:
    """Within the block, the model's backbone runs blocks 1..`layer` only and its last hidden state is raw H_layer.

    The block list is swapped for its first `layer` blocks and the final norm for an identity (kept with
    `final_norm=True`), and both are put back on exit. The forward so ends after block `layer` without an
    exception, so a wrapper around the model (DDP, FSDP, DeepSpeed) runs its own pre/post-forward code as for
    any forward; blocks above `layer` never run and get no gradient. Paper numbering: 0 = the embedding output.
    """
    spec = spec or describe(model)
    if not 0 <= layer <= spec.n_layers:
        raise ValueError(f"layer {layer} is out of range: this model has layers 0..{spec.n_layers} (paper numbering)")
    swaps = [(*_owner(model, spec.layers), spec.layers[:layer])]
    if spec.final_norm is not None and not final_norm:
        swaps.append((*_owner(model, spec.final_norm), nn.Identity()))
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in swaps]
    try:
        for owner, name, replacement in swaps:
            setattr(owner, name, replacement)
        yield spec
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (HF `base_model`: `model.model`, `model.transformer`, ...)."""
    return getattr(model, "base_model", model)


def forward_until(
    model: nn.Module, layer: int, spec: ModelSpec | None = None, **inputs
) -> torch.Tensor:
    """Raw H_layer (paper numbering, 0 = embedding) from a forward that stops after that block (`truncated`).

    Blocks above `layer` never run, so they cost nothing and receive no gradient; the result keeps
    its autograd graph.
    """
    with truncated(model, layer, spec):
        return backbone(model)(**inputs, use_cache=False)[0]
