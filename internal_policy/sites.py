"""Which tensors of a forward pass a profile decodes, and how: directly, as an alias, or as a sum.

A `SitePlan` maps every reported site (and every input a ΔH needs) to the tensor decoded for it:
- an **alias** is the very same tensor as an earlier site (OLMo2's `attn_in` is H_{l-1}; a shared
  norm makes `ffn_in` equal `attn_in`): it is decoded once, under its source's name;
- a **sum** (raw fp32 decoding only): z(resid_mid_l) = z(H_{l-1}) + z(A_l) and z(H_l) = z(resid_mid_l)
  + z(F_l), or z(H_{l-1}) + z(A_l) + z(F_l) without resid_mid, because h ↦ h·W_Uᵀ is linear and
  H_l = H_{l-1} + A_l + F_l in every supported layout (tests/test_extraction.py). Such a site costs
  an addition of logit blocks instead of a matmul: with all six components, 4 matmuls per layer
  instead of 6 (4 instead of 5 for the official method's sites). Sums are used only where all
  addends are decoded anyway and the stream is fp32: in half precision the model rounds H_l after
  each addition, so the sum would not be the H_l the model carries;
- the rest are **direct**: their kept rows are held until the forward ends, then decoded together.

Per-head sites (`attn_head`) are (layer, "attn_head", head) with a 0-based head: always direct, one
held row block per head (their writes exclude the output projection's bias, see `capture`), with
cos(head write, H_{l-1}) as their residual cosine and no ΔH.

`RowHolder` is the capture callback that gathers those rows (and the residual cosines) in one
forward. It holds kept_tokens × (direct sites + 1) × d_model values of the model's dtype: e.g. 64
kept tokens of a 28-layer, d = 1024 fp32 model with all components (1 + 4·28 direct sites and the
output) = 64 × 114 × 1024 × 4 B ≈ 28.5 MiB; `attn_head` adds n_heads direct sites per layer.
`profile` splits a batch into forwards that keep this under `hidden_budget_mb`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .capture import HEAD, Site, alias_of
from .entropy import row_cosine
from .models import HeadProjection, ModelSpec

HeadSite = tuple[int, str, int]
"""(paper layer 1..L, "attn_head", 0-based head)."""
ORDER = ("attn_in", "attn_head", "attn", "resid_mid", "ffn_in", "ffn", "layer")
"""Forward order of the components inside one layer (used to sort tables)."""
DELTA_OF = {"layer": "layer", "attn": "attn_in", "ffn": "ffn_in"}
"""ΔH pairs: component → the input it is compared with (for `layer`, the previous layer's H)."""
COSINE_OF = {"attn": "layer", HEAD: "layer", "ffn": "resid_mid"}
"""Residual cosines: cos(A_l, H_{l-1}), cos(head write, H_{l-1}) and cos(F_l, resid_mid)."""


def delta_input(site: Site | HeadSite) -> Site | None:
    """The site a ΔH compares `site` with, or None (no ΔH for this component, or H_0)."""
    layer, component = site[:2]
    if component not in DELTA_OF or (component == "layer" and layer == 0):
        return None
    return (layer - 1, "layer") if component == "layer" else (layer, DELTA_OF[component])


@dataclass(frozen=True)
class SitePlan:
    """Reported sites in table order, the source each is decoded as, direct sources, sums, the output site."""

    sites: tuple[Site | HeadSite, ...]
    source: dict[Site | HeadSite, Site | HeadSite]
    direct: tuple[Site | HeadSite, ...]
    sums: dict[Site, tuple[Site, ...]]
    output: Site
    heads: tuple[HeadProjection, ...] = ()
    """Every block's per-head projection (0-based block index) when `attn_head` is planned."""

    @classmethod
    def build(cls, spec: ModelSpec, components: tuple[str, ...], linear: bool) -> SitePlan:
        """Plan for `components`; `linear` allows sums (the caller passes it only for raw fp32 decoding).

        `attn_head` raises an UnsupportedModelError for a model whose attention write is not a sum of heads."""
        n = spec.n_layers
        heads = tuple(spec.head_projections()) if HEAD in components else ()
        sites: list[Site | HeadSite] = [(0, "layer")] if "layer" in components else []
        for layer in range(1, n + 1):
            for c in (c for c in ORDER if c in components):
                sites += [(layer, c, h) for h in range(spec.n_heads)] if c == HEAD else [(layer, c)]
        needed = list(dict.fromkeys(s for site in sites for s in (site, delta_input(site)) if s is not None))

        def resolve(site):
            alias = alias_of(spec.layout, *site[:2])
            return resolve(alias) if alias is not None else site

        source = {s: resolve(s) for s in needed}
        decoded = set(source.values())
        order = {c: i for i, c in enumerate(ORDER)}
        unique = sorted(decoded, key=lambda s: (s[0], -1 if s == (0, "layer") else order[s[1]], s[2:]))
        sums: dict[Site, tuple[Site, ...]] = {}
        for layer in range(1, n + 1) if linear else ():
            prev, attn, mid, ffn, out = ((layer - 1, "layer"), (layer, "attn"), (layer, "resid_mid"),
                                         (layer, "ffn"), (layer, "layer"))
            if mid in decoded and {prev, attn} <= decoded:
                sums[mid] = (prev, attn)
            if out in decoded and ffn in decoded:
                if mid in decoded:
                    sums[out] = (mid, ffn)
                elif {prev, attn} <= decoded:
                    sums[out] = (prev, attn, ffn)
        direct = tuple(s for s in unique if s not in sums)
        return cls(tuple(sites), source, direct, sums, (n, "layer"), heads)


class RowHolder:
    """Capture callback: holds the kept rows of `held` sites and computes the residual cosines on the way.

    `heads` (the plan's `SitePlan.heads`) turns the `attn_head` tensor, the output projection's input,
    into one row block per head after the kept rows are selected."""

    def __init__(self, index: torch.Tensor, held: set[Site | HeadSite], device: torch.device,
                 heads: tuple[HeadProjection, ...] = ()):
        self.index, self.held, self.device, self.heads = index, held, device, heads
        self.rows: dict[Site | HeadSite, torch.Tensor] = {}
        self.cos: dict[Site | HeadSite, torch.Tensor] = {}
        self._last: dict[str, torch.Tensor] = {}

    def __call__(self, layer: int, component: str, x: torch.Tensor | None, alias: Site | None) -> None:
        """Keep the kept positions' rows of a captured tensor (an alias repeats its source's rows)."""
        if alias is not None:
            self._last[component] = self._last[alias[1]]
            return
        rows = x.detach().reshape(-1, x.shape[-1]).index_select(0, self.index.to(x.device))
        if component == HEAD:
            self._hold_heads(layer, self.heads[layer - 1].writes(rows).to(self.device))
            return
        rows = rows.to(self.device)  # with device_map, blocks sit on several GPUs
        if component in COSINE_OF:
            self.cos[(layer, component)] = row_cosine(rows, self._last[COSINE_OF[component]]).cpu()
        if (layer, component) in self.held:
            self.rows[(layer, component)] = rows
        self._last[component] = rows

    def _hold_heads(self, layer: int, writes: torch.Tensor) -> None:
        """Per-head rows [n, n_heads, d]: cosines with H_{l-1} for every head, rows of the held ones."""
        cos = row_cosine(writes, self._last[COSINE_OF[HEAD]][:, None]).cpu()
        for h in range(writes.shape[1]):
            self.cos[(layer, HEAD, h)] = cos[:, h]
            if (layer, HEAD, h) in self.held:
                self.rows[(layer, HEAD, h)] = writes[:, h]
