"""The same residual decomposition read through TransformerLens 4.x (`TransformerBridge`).

This second extraction path uses the field's hook names (`blocks.{i}.hook_resid_pre`,
`hook_attn_out`, `ln1.hook_out`, ... for 0-based block i = paper layer i + 1) and no code of
`internal_policy.capture`; the test suite uses it as an independent check of the HF-hook path on
every supported architecture. It is not the default because the bridge forces eager attention
and rewrites the model it wraps (see `capture`'s docstring), so this module always boots its own
copy: from the model folder, or from a deep copy of an in-memory model.

Component mapping where the bridge has no dedicated hook: OLMo2 has no pre-norms, so
`attn_in` = `hook_resid_pre` and `ffn_in` = `hook_resid_mid`; parallel-residual blocks (GPT-NeoX)
have no `hook_resid_mid`, so `resid_mid` = `hook_resid_pre + hook_attn_out`, and those with one
shared norm (GPT-J, Phi-2, Cohere) no `ln2`, so their FFN input is `ln1.hook_out`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .capture import COMPONENTS, Site


def boot_bridge(model_or_path, tokenizer=None, device: str = "cpu"):
    """A raw `TransformerBridge` (no weight processing, so raw decodings match HF) on its own model copy."""
    from transformer_lens import TransformerBridge

    if isinstance(model_or_path, (str, Path)):
        return TransformerBridge.boot_transformers(str(model_or_path), device=device)
    return TransformerBridge.boot_transformers(
        "in-memory", hf_model=copy.deepcopy(model_or_path), tokenizer=tokenizer, device=device
    )


@torch.no_grad()
def extract_with_bridge(
    bridge, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, components=COMPONENTS
) -> dict[Site, torch.Tensor]:
    """{(layer, component): [batch, seq, d]} from one bridge forward, in paper layer numbering."""
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    _, cache = bridge.run_with_cache(input_ids, **kwargs)
    found: dict[Site, torch.Tensor] = {(0, "layer"): cache["blocks.0.hook_resid_pre"]}
    def get(name: str, default: torch.Tensor) -> torch.Tensor:
        return cache[name] if name in cache else default

    for i in range(bridge.cfg.n_layers):
        pre, attn = cache[f"blocks.{i}.hook_resid_pre"], cache[f"blocks.{i}.hook_attn_out"]
        parallel = f"blocks.{i}.hook_resid_mid" not in cache
        mid = pre + attn if parallel else cache[f"blocks.{i}.hook_resid_mid"]
        found[(i + 1, "layer")] = cache[f"blocks.{i}.hook_resid_post"]
        found[(i + 1, "attn_in")] = attn_in = get(f"blocks.{i}.ln1.hook_out", pre)
        found[(i + 1, "attn")] = attn
        found[(i + 1, "resid_mid")] = mid
        found[(i + 1, "ffn_in")] = get(f"blocks.{i}.ln2.hook_out", attn_in if parallel else mid)
        found[(i + 1, "ffn")] = cache[f"blocks.{i}.hook_mlp_out"]
    return {site: x for site, x in found.items() if site[1] in components}
