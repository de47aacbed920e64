"""The unembedding readout (`Decoder`) and internal-policy entropy H(softmax(x·W_Uᵀ + b)), in nats.

`Decoder` turns hidden rows into fp32 logits chunk by chunk: raw h·W_Uᵀ + b (the paper's internal
policy), or with the final norm, logit scale and soft-cap (the logit lens; `Decoder.output_of` is
the model's own readout, z_out). Accumulation is fp32 whatever the model dtype: on CUDA the
bf16/fp16 matmul writes fp32 logits directly (`out_dtype`), on CPU the operands are upcast. Its
`entropy` and `statistics` run the one-pass online reduction of `internal_policy.stats`, so the
largest temporaries are a few [token_chunk × vocab_chunk] fp32 blocks whatever the number of
tokens, layers or the vocabulary size.

Why not TRL's `trl.kernels.ChunkedLogProbFunction`, which also returns per-row entropy of any
hidden/weight/bias on CPU and GPU: its logits tiles are in the inputs' dtype, so on bf16 inputs
its entropies are off by up to 7e-2 nats against a float64 reference (this module: 3e-6; faster
on CPU only because the matmul is bf16), and on fp32 copies it is exact but 1.05x slower; it also
lacks the other statistics, stacked sites and linear sums (bench/trl_entropy.py; figures in
bench/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .models import ModelSpec
from .stats import ENTROPY, Statistic, decode


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Plain entropy (nats, fp32) of softmax over the last dim: the reference the chunked path must match."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def row_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching rows, fp32 (0 where a row is all zeros)."""
    a, b = a.float(), b.float()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)


def _fp32_out_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda" or dtype == torch.float32:
        return False
    try:
        a = torch.ones(2, 2, device=device, dtype=dtype)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


@dataclass
class Decoder:
    """Unembedding readout: logits = post(norm?(x) @ Wᵀ + b), with post = scale then soft-cap.

    With `norm` (the model's final norm) the readout is the classic logit lens, and on the last
    layer it equals the model's own output distribution; without it (the default and the paper's
    choice) it is the raw internal policy. Soft-capping and logit scaling belong to the model's
    own readout and are applied only together with the final norm, so raw decoding stays
    exactly h·W_Uᵀ + b.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    norm: nn.Module | None = None
    softcap: float | None = None
    scale: float = 1.0
    token_chunk: int | None = None
    vocab_chunk: int | None = None
    _weight_fp32: torch.Tensor | None = field(default=None, repr=False)
    _fp32_out: bool | None = field(default=None, repr=False)

    @classmethod
    def from_spec(cls, spec: ModelSpec, final_norm: bool = False, **chunks) -> Decoder:
        """The decoder of a described model; `final_norm=True` gives the logit-lens variant."""
        if final_norm and spec.final_norm is None:
            raise ValueError(f"{spec.model_type}: the model has no final norm to apply (use final_norm=False)")
        return cls(
            weight=spec.unembed_weight,
            bias=spec.unembed_bias,
            norm=spec.final_norm if final_norm else None,
            softcap=spec.logit_softcap if final_norm else None,
            scale=spec.logit_scale if final_norm else 1.0,
            **chunks,
        )

    @classmethod
    def output_of(cls, spec: ModelSpec, **chunks) -> Decoder:
        """The model's own readout (final norm if it has one, logit scale, soft-cap, bias): `model(...).logits`."""
        return cls(weight=spec.unembed_weight, bias=spec.unembed_bias, norm=spec.final_norm,
                   softcap=spec.logit_softcap, scale=spec.logit_scale, **chunks)

    @property
    def vocab_size(self) -> int:
        """|V|, the number of rows of the unembedding."""
        return self.weight.shape[0]

    def _chunks(self) -> tuple[int, int]:
        """(rows per stacked block, vocabulary entries per chunk)."""
        cuda = self.weight.device.type == "cuda"
        return self.token_chunk or (4096 if cuda else 1024), self.vocab_chunk or (32768 if cuda else 1024)

    def mm_weight(self) -> torch.Tensor:
        """The unembedding in the dtype the matmul runs in (fp32, except CUDA half types with fp32 output)."""
        w = self.weight.detach()
        if self._fp32_out is None:
            self._fp32_out = _fp32_out_mm_supported(w.device, w.dtype)
        if self._fp32_out or w.dtype == torch.float32:
            return w
        if self._weight_fp32 is None:
            self._weight_fp32 = w.float()
        return self._weight_fp32

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden rows [n, d] on the unembedding's device, normed if the decoder has a norm, in the matmul dtype."""
        w = self.mm_weight()
        x = x.to(w.device)
        if self.norm is not None:
            x = self.norm(x.to(next(self.norm.parameters(), w).dtype))
        return x.to(w.dtype)

    def matmul(self, x: torch.Tensor, w: torch.Tensor, start: int, stop: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 x @ w[start:stop]ᵀ (no bias), written into `out` when given."""
        wc = w[start:stop]
        if self._fp32_out:
            z = torch.mm(x, wc.T, out_dtype=torch.float32)
            return out.copy_(z) if out is not None else z
        return torch.mm(x, wc.T, out=out) if out is not None else torch.mm(x, wc.T)

    def add_bias(self, z: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """z += b[start:stop] (in place; no-op without a bias)."""
        if self.bias is not None:
            z += self.bias.detach()[start:stop].float()
        return z

    def post(self, z: torch.Tensor) -> torch.Tensor:
        """The readout's scale, then soft-cap c·tanh(z/c), in place (no-op for raw decoding)."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Full fp32 logits [..., V] (for small inputs and tests; the statistics never build these)."""
        rows = self.prepare(x.reshape(-1, x.shape[-1]))
        z = self.matmul(rows, self.mm_weight(), 0, self.vocab_size)
        return self.post(self.add_bias(z, 0, self.vocab_size)).reshape(*x.shape[:-1], -1)

    def statistics(self, x: torch.Tensor, stats: Sequence[Statistic], targets: torch.Tensor | None = None,
                   reference: tuple[Decoder, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Statistics of the decoded policy of each row of `x` [n, d] in one pass ({column: values}, see stats.py)."""
        return decode(self, {0: x}, stats, targets=targets, reference=reference)[0]

    def entropy(self, x: torch.Tensor) -> torch.Tensor:
        """Entropy in nats (fp32) of the decoded policy of each row of `x` [..., d] → [...]."""
        flat = x.reshape(-1, x.shape[-1])
        return self.statistics(flat, [ENTROPY])["entropy"].reshape(x.shape[:-1])
