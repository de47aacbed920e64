"""Internal-policy entropy: H(softmax(x·W_Uᵀ + b)) for any stack of hidden vectors, in nats.

The decoding is chunked over tokens and over the vocabulary with an online log-sum-exp, so the
largest temporary is one [token_chunk × vocab_chunk] fp32 block whatever the number of tokens,
layers or the vocabulary size. Accumulation is fp32 whatever the model dtype: on CUDA the
bf16/fp16 matmul writes fp32 logits directly (`out_dtype`), on CPU the operands are upcast.

For a vocabulary chunk with logits z, running maximum m, s = Σ e^{z-m} and u = Σ e^{z-m}(z-m):
moving the reference to m' = max(m, max z) rescales s ← r·s, u ← r·(u + δ·s) with δ = m - m',
r = e^δ; at the end H = log s - u/s (since log p = z - m - log s).

Why hand-written rather than a fused linear-cross-entropy kernel (Liger, Cut Cross-Entropy, TRL's
chunked LM head): those return the loss / log-prob of one target token and, at most, the entropy
of the *final normed* policy inside their training path; none takes an arbitrary stack of raw
residual vectors with an optional norm, soft-capping and bias and returns per-row entropy on CPU
as well as GPU. The whole algorithm is the dozen lines of `_entropy_rows`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .models import ModelSpec


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

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def _chunks(self) -> tuple[int, int]:
        cuda = self.weight.device.type == "cuda"
        return self.token_chunk or (4096 if cuda else 1024), self.vocab_chunk or (32768 if cuda else 1024)

    def _prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden rows and weight in the dtype the matmul runs in (fp32 except CUDA half types)."""
        w = self.weight.detach()
        x = x.to(w.device)
        if self.norm is not None:
            x = self.norm(x.to(next(self.norm.parameters(), w).dtype))
        if self._fp32_out is None:
            self._fp32_out = _fp32_out_mm_supported(w.device, w.dtype)
        if self._fp32_out:
            return x.to(w.dtype), w
        if w.dtype != torch.float32:
            if self._weight_fp32 is None:
                self._weight_fp32 = w.float()
            w = self._weight_fp32
        return x.float(), w

    def _logits(self, x: torch.Tensor, w: torch.Tensor, start: int, stop: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits of vocabulary rows [start, stop), written into `out` when given (CPU fp32 path)."""
        wc = w[start:stop]
        if self._fp32_out:
            z = torch.mm(x, wc.T, out_dtype=torch.float32)
        elif out is not None:
            z = torch.mm(x, wc.T, out=out[: x.shape[0] * wc.shape[0]].view(x.shape[0], wc.shape[0]))
        else:
            z = torch.mm(x, wc.T)
        if self.bias is not None:
            z += self.bias.detach()[start:stop].float()
        if self.scale != 1.0:
            z *= self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Full fp32 logits [..., V] (for small inputs and tests; `entropy` never builds these)."""
        rows, w = self._prepare(x.reshape(-1, x.shape[-1]))
        return self._logits(rows, w, 0, self.vocab_size).reshape(*x.shape[:-1], -1)

    @torch.no_grad()
    def entropy(self, x: torch.Tensor) -> torch.Tensor:
        """Entropy in nats (fp32) of the decoded policy of each row of `x` [..., d] → [...]."""
        shape = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        token_chunk, _ = self._chunks()
        out = torch.empty(flat.shape[0], dtype=torch.float32, device=self.weight.device)
        for start in range(0, flat.shape[0], token_chunk):
            rows, w = self._prepare(flat[start : start + token_chunk])
            out[start : start + rows.shape[0]] = self._entropy_rows(rows, w)
        return out.reshape(shape)

    def _entropy_rows(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Online log-sum-exp over vocabulary chunks (see module docstring for the update)."""
        _, vocab_chunk = self._chunks()
        # reusable blocks, so the CPU path allocates no multi-MB tensor per vocabulary chunk;
        # the CUDA fp32-output matmul allocates its own logits (the caching allocator makes that cheap)
        block = x.shape[0] * min(vocab_chunk, self.vocab_size)
        e_buf = torch.empty(block, device=x.device)
        z_buf = None if self._fp32_out else torch.empty(block, device=x.device)
        m = s = u = None
        for start in range(0, self.vocab_size, vocab_chunk):
            z = self._logits(x, w, start, start + vocab_chunk, out=z_buf)
            chunk_max = z.amax(dim=1)
            if m is None:
                m, s, u = chunk_max, torch.zeros_like(chunk_max), torch.zeros_like(chunk_max)
            else:
                new_m = torch.maximum(m, chunk_max)
                delta = m - new_m
                r = delta.exp()
                u = r * (u + delta * s)
                s = r * s
                m = new_m
            z.sub_(m[:, None])
            e = torch.exp(z, out=e_buf[: z.numel()].view_as(z))
            s += e.sum(dim=1)
            u += torch.linalg.vecdot(e, z, dim=1)
        return s.log() - u / s
