"""Statistics of decoded policies: one small definition each, all reduced in one pass over vocabulary chunks.

Notation: z = a site's logits (raw h·W_Uᵀ + b, or with the final norm), p = softmax(z); z_out, p_out =
the model's own output logits at that position (what ``model(...).logits`` gives: final norm, logit
scale, soft-capping and bias included); y = the next token. All values are fp32, in nats.

| name | value |
|---|---|
| ``entropy`` | H(p) = −Σ_v p_v log p_v |
| ``renyi<α>`` | −1/(α−1) · log Σ_v p_v^α (α > 0, α ≠ 1); ``renyiinf`` = −log max_v p_v (min-entropy) |
| ``nll`` | −log p_y |
| ``rank`` | 1 + #{v : z_v > z_y} |
| ``kl_out`` | KL(p_out ‖ p) = Σ_v p_out,v (log p_out,v − log p_v) (the direction tuned-lens reports) |
| ``top1_agree`` | 1 if argmax z = argmax z_out, else 0 |
| ``topk`` | the k most likely ids and their probabilities (per token, never averaged) |

α → 1 is the Shannon entropy: ``renyi1`` is refused in favour of ``entropy``. ``nll`` and ``rank``
exist only where a next token exists (NaN elsewhere); their counts are kept apart for merging.

How the pass works. `Online` holds, per row, the running maximum m and s = Σ e^{z−m} (so
lse = m + log s) and feeds every vocabulary chunk to each statistic twice: `before` sees the raw
logits (counting, top-k, argmax), `after` sees z − m and e^{z−m} for the new maximum (sums of
exponentials). When the maximum moves from m to m' every sum in units of m is rescaled by
r = e^{m−m'}; a sum of e^{z−m}·(z−m) also gains δ·s with δ = m − m'. KL(p_out ‖ p) keeps
A = Σ e^{z_out−a}((z_out−a) − (z−b)) with a, b the two running maxima; when they move by δ_out, δ
it becomes r_out·(A + (δ_out − δ)·s_out), and KL = A/s_out − log s_out + log s.

`decode` runs that pass for many row blocks ("sites") at once: per token chunk, the rows of every
site (and of the reference, whose logits are z_out) are stacked into one matmul per vocabulary
chunk, so the unembedding is read once per token chunk, not once per site. Sites given as sums of
other sites (raw decoding is linear: z(H_l) = z(H_{l−1}) + z(A_l) + z(F_l)) are not multiplied at
all: their logit block is the sum of blocks already computed, the bias added once. The temporaries
are three fp32 blocks of about [token_chunk × vocab_chunk] (logits, their exponentials, a scratch for
products), allocated once per call, whatever the number of sites or tokens.

A new statistic is one subclass of `Statistic` plus its entry in `_FAMILY` (and its tests).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from .errors import InputError

if TYPE_CHECKING:
    from .entropy import Decoder

Key = Hashable
"""A site's name in `decode` (the profile uses (layer, component))."""


def _expand(ref_values: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-token reference values [T, ...] repeated for every group of `rows` = G·T site rows."""
    return ref_values.repeat(rows // ref_values.shape[0], *([1] * (ref_values.dim() - 1)))


@dataclass
class Chunk:
    """One vocabulary chunk of a block of rows as the statistics see it (see module docstring)."""

    z: torch.Tensor  # [R, C] fp32 logits; raw in `before`, minus the new running max in `after`
    start: int  # vocabulary id of column 0
    m: torch.Tensor  # new running max [R]
    delta: torch.Tensor  # old max − new max (≤ 0) [R]
    m_old: torch.Tensor  # the running max before this chunk (= m on the first chunk) [R]
    r: torch.Tensor  # e^delta [R]
    s_old: torch.Tensor  # Σ e^{z−m_old} over the previous chunks [R]
    peak: torch.Tensor | None = None  # this chunk's max [R]
    arg: torch.Tensor | None = None  # its column (first on ties), when a statistic asked for it
    y: torch.Tensor | None = None  # next token per row, −1 where none [R]
    zy: torch.Tensor | None = None  # its logit, NaN where none [R]
    ref: Chunk | None = None  # the reference's chunk (rows = tokens; our rows = groups × tokens)
    e: torch.Tensor | None = None  # e^{z − m} [R, C], set before `after`
    scratch: torch.Tensor | None = None  # reusable fp32 block of at least R·C values (no per-chunk allocation)
    cache: dict = field(default_factory=dict)

    def buffer(self, shape: torch.Size) -> torch.Tensor | None:
        """A view of the scratch block of this shape (None without one: the op then allocates)."""
        return self.scratch[: math.prod(shape)].view(shape) if self.scratch is not None else None

    @staticmethod
    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Σ over the last dim of a·b, fused (no [R, C] product is written)."""
        return torch.linalg.vecdot(a, b, dim=-1)

    def expand(self, ref_values: torch.Tensor) -> torch.Tensor:
        """Per-token reference values [T, ...] repeated for every group of our rows [G·T, ...]."""
        return _expand(ref_values, self.z.shape[0])


@dataclass
class Rows:
    """What `finish` sees: the final running max, s = Σ e^{z−m}, lse, targets and the reference's results."""

    m: torch.Tensor
    s: torch.Tensor
    y: torch.Tensor | None
    zy: torch.Tensor | None
    ref: Rows | None = None
    ref_values: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def lse(self) -> torch.Tensor:
        """log Σ_v e^{z_v} per row."""
        return self.m + self.s.log()

    def expand(self, ref_values: torch.Tensor) -> torch.Tensor:
        """Per-token reference values [T, ...] repeated for every group of our rows [G·T, ...]."""
        return _expand(ref_values, self.m.shape[0])

    def where_target(self, values: torch.Tensor) -> torch.Tensor:
        """NaN where the row has no next token."""
        return values.masked_fill(self.y < 0, float("nan"))


@dataclass(frozen=True)
class Statistic:
    """One statistic: per-row state, updated once per vocabulary chunk, finished into columns of values."""

    name: ClassVar[str] = ""
    needs_target: ClassVar[bool] = False  # needs the next token y (and z_y)
    needs_output: ClassVar[bool] = False  # needs the reference logits z_out
    reference_needs: ClassVar[tuple[Statistic, ...]] = ()  # statistics the reference itself must reduce
    needs_argmax: ClassVar[bool] = False  # needs each chunk's argmax (`Chunk.arg`)
    per_token: ClassVar[bool] = False  # stored per token only, never averaged (top-k lists)
    log_vocab_bound: ClassVar[bool] = False  # 0 ≤ value ≤ ln|V| (entropies)
    value_range: ClassVar[tuple[float, float] | None] = None  # other fixed bounds (figure colour scales)
    label: ClassVar[str] = ""

    @property
    def columns(self) -> tuple[str, ...]:
        """Names of the per-token columns `finish` returns."""
        return (self.name,)

    def start(self, rows: int, device: torch.device) -> dict:
        """The per-row state before the first chunk (a dict of tensors, updated in place)."""
        return {}

    def before(self, state: dict, c: Chunk) -> None:
        """Raw logits of the chunk (before the shift by the running max)."""

    def after(self, state: dict, c: Chunk) -> None:
        """Shifted logits `c.z` and exponentials `c.e` of the chunk."""

    def finish(self, state: dict, r: Rows) -> dict[str, torch.Tensor]:
        """The per-token columns of this statistic from the state and the final `Rows`."""
        raise NotImplementedError


@dataclass(frozen=True)
class Entropy(Statistic):
    """H(p) = log s − u/s with u = Σ e^{z−m}(z−m)."""

    name: ClassVar[str] = "entropy"
    log_vocab_bound: ClassVar[bool] = True
    label: ClassVar[str] = "entropy (nats)"

    def start(self, rows, device):
        """u = 0 per row."""
        return {"u": torch.zeros(rows, device=device)}

    def after(self, state, c):
        """Rescale u to the new running max and add this chunk's Σ e^{z−m}(z−m)."""
        state["u"] = c.r * (state["u"] + c.delta * c.s_old) + c.dot(c.e, c.z)

    def finish(self, state, r):
        """H = log s − u/s."""
        return {self.name: r.s.log() - state["u"] / r.s}


def _order_name(alpha: float) -> str:
    return "inf" if math.isinf(alpha) else f"{alpha:g}"


@dataclass(frozen=True)
class Renyi(Statistic):
    """Rényi entropy of order α: (α·log s − log q)/(α − 1) with q = Σ e^{α(z−m)}; α = inf: log s = −log max p."""

    alpha: float = 2.0
    log_vocab_bound: ClassVar[bool] = True

    def __post_init__(self):
        if not self.alpha > 0 or self.alpha == 1 or math.isnan(self.alpha):
            hint = "α = 1 is the Shannon entropy: use the 'entropy' statistic" if self.alpha == 1 else "use α > 0"
            raise InputError(f"Rényi order {self.alpha:g} is not supported; {hint}")

    @property
    def name(self) -> str:
        """The column name: `renyi<α>`."""
        return f"renyi{_order_name(self.alpha)}"

    @property
    def label(self) -> str:
        """The axis label with its order α."""
        return f"Rényi entropy, α = {_order_name(self.alpha)} (nats)"

    def start(self, rows, device):
        """q = 0 per row (none for α = inf, read from s alone)."""
        return {} if math.isinf(self.alpha) else {"q": torch.zeros(rows, device=device)}

    def after(self, state, c):
        """Rescale q by e^{αδ} and add this chunk's Σ e^{α(z−m)}."""
        if math.isinf(self.alpha):
            return
        powered = (c.dot(c.e, c.e) if self.alpha == 2  # the power written into the scratch block, not a new one
                   else torch.pow(c.e, self.alpha, out=c.buffer(c.e.shape)).sum(-1))
        state["q"] = c.r.pow(self.alpha) * state["q"] + powered

    def finish(self, state, r):
        """(α·log s − log q)/(α − 1); log s for α = inf."""
        if math.isinf(self.alpha):
            return {self.name: r.s.log()}
        return {self.name: (self.alpha * r.s.log() - state["q"].log()) / (self.alpha - 1)}


@dataclass(frozen=True)
class NLL(Statistic):
    """−log p_y = lse − z_y (z_y is computed once per row, before the pass)."""

    name: ClassVar[str] = "nll"
    needs_target: ClassVar[bool] = True
    label: ClassVar[str] = "NLL of the next token (nats)"

    def finish(self, state, r):
        """lse − z_y, NaN where the row has no next token."""
        return {self.name: r.where_target(r.lse - r.zy)}


@dataclass(frozen=True)
class Rank(Statistic):
    """1 + #{v : z_v > z_y}, counted exactly per chunk (the target's own column never counts)."""

    name: ClassVar[str] = "rank"
    needs_target: ClassVar[bool] = True
    label: ClassVar[str] = "rank of the next token"

    def start(self, rows, device):
        """A zero count per row of the logits above the target's."""
        return {"n": torch.zeros(rows, dtype=torch.long, device=device)}

    def before(self, state, c):
        """Count this chunk's logits strictly above z_y (the target's own column excluded)."""
        above = torch.sub(c.z, c.zy[:, None], out=c.buffer(c.z.shape)).gt_(0)  # z_v − z_y > 0 ⇔ z_v > z_y exactly
        state["n"] += above.sum(1).long()
        local = c.y - c.start
        inside = (local >= 0) & (local < c.z.shape[1])
        own = c.z.gather(1, local.clamp(0, c.z.shape[1] - 1)[:, None])[:, 0] > c.zy
        state["n"] -= (inside & own).long()

    def finish(self, state, r):
        """1 + the count, NaN where the row has no next token."""
        return {self.name: r.where_target(1 + state["n"].float())}


@dataclass(frozen=True)
class ArgMax(Statistic):
    """Index of the largest logit (the first one on ties, as torch.argmax)."""

    name: ClassVar[str] = "argmax"
    needs_argmax: ClassVar[bool] = True

    def start(self, rows, device):
        """Best value so far −inf and its index 0 per row."""
        return {"v": torch.full((rows,), -math.inf, device=device), "i": torch.zeros(rows, dtype=torch.long,
                                                                                      device=device)}

    def before(self, state, c):
        """Keep this chunk's peak where it beats the best so far (earlier chunks win ties)."""
        better = c.peak > state["v"]
        state["v"] = torch.where(better, c.peak, state["v"])
        state["i"] = torch.where(better, c.arg + c.start, state["i"])

    def finish(self, state, r):
        """The index of the largest logit."""
        return {self.name: state["i"]}


@dataclass(frozen=True)
class Top1Agree(ArgMax):
    """1 where the site's argmax is the output's argmax."""

    name: ClassVar[str] = "top1_agree"
    needs_output: ClassVar[bool] = True
    reference_needs: ClassVar[tuple[Statistic, ...]] = (ArgMax(),)
    value_range: ClassVar[tuple[float, float] | None] = (0.0, 1.0)
    label: ClassVar[str] = "top-1 agreement with the output"

    def finish(self, state, r):
        """1.0 where this row's argmax equals the output's argmax at the same token, else 0.0."""
        return {self.name: (state["i"] == r.expand(r.ref_values["argmax"])).float()}


@dataclass(frozen=True)
class KLOut(Statistic):
    """KL(p_out ‖ p), accumulated as A = Σ e^{z_out−a}((z_out−a) − (z−b)) (see module docstring).

    A is a cross-entropy-sized sum (tens of nats where the site disagrees with the output), so it is
    carried in float64 across chunks; each chunk's own sum is fp32."""

    name: ClassVar[str] = "kl_out"
    needs_output: ClassVar[bool] = True
    label: ClassVar[str] = "KL(p_out ‖ p) (nats)"

    def start(self, rows, device):
        """A = 0 per row, in float64."""
        return {"a": torch.zeros(rows, dtype=torch.float64, device=device)}

    def after(self, state, c):
        """Rescale A to both new running maxima and add this chunk's Σ e_out·((z_out−a) − (z−b))."""
        o = c.ref
        if "ez" not in o.cache:  # Σ e_out·(z_out − a) per token, shared by every site of the chunk
            o.cache["ez"] = c.dot(o.e, o.z)
        tokens, width = o.z.shape  # Σ e_out·(z − b) of every site row: one batched matrix-vector product per token
        cross = torch.bmm(c.z.view(-1, tokens, width).transpose(0, 1), o.e[:, :, None])[:, :, 0].T.reshape(-1)
        # the rescaling in float64 from the exact fp32 maxima (an fp32 e^δ is off by ~eps·|δ| relative)
        delta_out = c.expand(o.m_old).double() - c.expand(o.m).double()
        moved = (delta_out - (c.m_old.double() - c.m.double())) * c.expand(o.s_old)
        state["a"] = delta_out.exp() * (state["a"] + moved) + (c.expand(o.cache["ez"]) - cross)

    def finish(self, state, r):
        """KL = A/s_out − log s_out + log s."""
        s_out = r.expand(r.ref.s).double()
        return {self.name: (state["a"] / s_out - s_out.log() + r.s.double().log()).float()}


@dataclass(frozen=True)
class TopK(Statistic):
    """The k largest logits' ids and probabilities, merged chunk by chunk."""

    k: int = 5
    name: ClassVar[str] = "topk"
    per_token: ClassVar[bool] = True

    def __post_init__(self):
        if not 1 <= self.k <= TOPK_MAX:
            raise InputError(f"--topk must be between 1 and {TOPK_MAX}, got {self.k}")

    @property
    def columns(self) -> tuple[str, ...]:
        """Two columns: the top-k token ids and their probabilities."""
        return ("topk_ids", "topk_probs")

    def before(self, state, c):
        """Merge this chunk's k largest logits with the best k so far."""
        values, index = c.z.topk(min(self.k, c.z.shape[1]), dim=1)
        if state:
            values = torch.cat([state["v"], values], dim=1)
            index = torch.cat([state["i"], index + c.start], dim=1)
            values, best = values.topk(min(self.k, values.shape[1]), dim=1)
            index = index.gather(1, best)
        else:
            index = index + c.start
        state["v"], state["i"] = values, index

    def finish(self, state, r):
        """The ids and probabilities e^{z − lse} of the k largest logits."""
        return {"topk_ids": state["i"], "topk_probs": (state["v"] - r.lse[:, None]).exp()}


TOPK_MAX = 20
SCALAR = ("entropy", "renyi2", "nll", "rank", "kl_out", "top1_agree")
"""What `all` means: every scalar statistic (with the default Rényi order 2)."""
NAMES = (*SCALAR[:1], "renyi<α>", *SCALAR[2:], "topk")
"""Statistic names the user may ask for (`renyi<α>` for any order, e.g. renyi0.5, renyiinf)."""
_FAMILY: dict[str, type[Statistic]] = {"entropy": Entropy, "nll": NLL, "rank": Rank, "kl_out": KLOut,
                                        "top1_agree": Top1Agree}
ENTROPY = Entropy()


def parse_alpha(text: str) -> float:
    """A Rényi order from text ('0.5', '2', 'inf')."""
    try:
        return float(text)
    except ValueError:
        raise InputError(f"Rényi order {text!r} is not a number; give e.g. 0.5, 2 or inf") from None


def resolve(names: Sequence[str], renyi_alpha: Sequence[float] = (), topk: int = 0) -> list[Statistic]:
    """Statistic objects for names (`all`, `renyi<α>`, ...) plus Rényi orders and top-k; entropy always first.

    The order is canonical (entropy, Rényi by order, nll, rank, kl_out, top1_agree, topk), so equal
    requests give equal lists."""
    wanted = {"entropy"}
    alphas = {float(a) for a in renyi_alpha}
    for name in names:
        if name == "all":
            wanted.update(SCALAR)
        elif name.startswith("renyi"):
            alphas.add(parse_alpha(name[len("renyi"):]))
        elif name in _FAMILY or name == "topk":
            wanted.add(name)
        else:
            raise InputError(f"unknown statistic {name!r}; choose from {', '.join(NAMES)}, all")
    if "renyi2" in wanted:
        alphas.add(2.0)
    out: list[Statistic] = [ENTROPY, *(Renyi(a) for a in sorted(alphas))]
    out += [_FAMILY[n]() for n in ("nll", "rank", "kl_out", "top1_agree") if n in wanted]
    if "topk" in wanted or topk:
        out.append(TopK(topk or TopK.k))
    return out


def by_name(name: str) -> Statistic:
    """The statistic a column is named after (for figure labels and bounds)."""
    if name.startswith("renyi"):
        return Renyi(parse_alpha(name[len("renyi"):]))
    if name in _FAMILY:
        return _FAMILY[name]()
    raise InputError(f"unknown statistic {name!r}; choose from {', '.join(NAMES)}")


class Online:
    """Running max, Σ e^{z−m} and each statistic's state for a block of rows, fed one vocabulary chunk at a time."""

    def __init__(self, stats: Sequence[Statistic], rows: int, device: torch.device,
                 y: torch.Tensor | None = None, zy: torch.Tensor | None = None, ref: Online | None = None):
        self.stats, self.y, self.zy, self.ref = list(stats), y, zy, ref
        self.m: torch.Tensor | None = None
        self.s = torch.zeros(rows, device=device)
        self.states = [st.start(rows, device) for st in self.stats]
        self.argmax = any(st.needs_argmax for st in self.stats)

    def feed(self, z: torch.Tensor, start: int, e_out: torch.Tensor | None = None,
             ref: Chunk | None = None, scratch: torch.Tensor | None = None) -> Chunk:
        """Fold one chunk of logits [R, C] in (z is shifted in place; e_out, if given, receives e^{z−m};
        `scratch`, if given, holds the statistics' temporary products)."""
        chunk_max, arg = z.max(dim=1) if self.argmax else (z.amax(dim=1), None)
        if self.m is None:
            m, delta = chunk_max, torch.zeros_like(chunk_max)
        else:
            m = torch.maximum(self.m, chunk_max)
            delta = self.m - m
        m_old = m if self.m is None else self.m
        c = Chunk(z, start, m, delta, m_old, delta.exp(), self.s, chunk_max, arg, self.y, self.zy, ref,
                  scratch=scratch)
        for st, state in zip(self.stats, self.states):
            st.before(state, c)
        z.sub_(m[:, None])
        c.e = torch.exp(z, out=e_out) if e_out is not None else z.exp()
        for st, state in zip(self.stats, self.states):
            st.after(state, c)
        self.s = c.r * self.s + c.e.sum(dim=1)
        self.m = m
        return c

    def finish(self) -> tuple[Rows, dict[str, torch.Tensor]]:
        """Finish the reference first, then every statistic: (final Rows, {column: values})."""
        ref_rows, ref_values = self.ref.finish() if self.ref is not None else (None, {})
        rows = Rows(self.m, self.s, self.y, self.zy, ref_rows, ref_values)
        values: dict[str, torch.Tensor] = {}
        for st, state in zip(self.stats, self.states):
            values.update(st.finish(state, rows))
        return rows, values


def _target_logits(decoder: Decoder, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                   sums: Mapping[int, Sequence[int]]) -> torch.Tensor:
    """z_y of every row [G·T] (NaN where y < 0): dot products of the direct sites' rows x [D, T, d] with
    W_y, sites given as sums added up like their logits, then bias and the decoder's scale / soft-cap."""
    raw = torch.empty(x.shape[0] + len(sums), x.shape[1], device=x.device)
    raw[: x.shape[0]] = torch.bmm(x.float().transpose(0, 1), w[y.clamp(min=0)].float()[:, :, None])[:, :, 0].T
    for i, addends in sums.items():
        raw[i] = sum(raw[a] for a in addends)
    if decoder.bias is not None:
        raw += decoder.bias.detach()[y.clamp(min=0)].float()
    return decoder.post(raw).masked_fill(y < 0, float("nan")).reshape(-1)


@torch.no_grad()
def decode(
    decoder: Decoder,
    rows: Mapping[Key, torch.Tensor],
    stats: Sequence[Statistic],
    *,
    targets: torch.Tensor | None = None,
    reference: tuple[Decoder, torch.Tensor] | None = None,
    sums: Mapping[Key, Sequence[Key]] | None = None,
) -> dict[Key, dict[str, torch.Tensor]]:
    """Every statistic of every site in one pass: {key: {column: values [n] (top-k: [n, k])}}.

    rows: the hidden vectors of each site, [n, d], the same n tokens for all; targets: the next
    token of each token (−1: none); reference: (decoder, rows [n, d]) whose logits are z_out (the
    same unembedding as `decoder`); sums: sites whose logits are the sum of other sites' (raw
    decoding only), {key: addends}, each addend given in `rows` or earlier in `sums`.
    """
    sums = dict(sums or {})
    direct = [k for k in rows if k not in sums]
    keys = direct + list(sums)
    n = rows[direct[0]].shape[0]
    if sums and (decoder.norm is not None or decoder.softcap or decoder.scale != 1.0):
        raise ValueError("sums of sites need raw decoding (no final norm, scale or soft-cap)")
    needs_target = any(st.needs_target for st in stats)
    if needs_target and targets is None:
        raise ValueError("nll/rank need the next tokens (targets)")
    ref_stats = list(dict.fromkeys(r for st in stats for r in st.reference_needs))
    ref_dec, ref_rows = reference if any(st.needs_output for st in stats) and reference else (None, None)
    if any(st.needs_output for st in stats) and ref_dec is None:
        raise ValueError("kl_out/top1_agree need the reference (output) rows")
    if ref_dec is not None and ref_dec.weight is not decoder.weight:
        raise ValueError("the reference must decode with the same unembedding")
    budget, vocab_chunk = decoder._chunks()
    has_ref = int(ref_dec is not None)
    width = max(1, budget // (len(keys) + has_ref))  # tokens per chunk: the stacked block stays ~budget rows
    device, vocab, w = decoder.weight.device, decoder.vocab_size, decoder.mm_weight()
    index = {k: i for i, k in enumerate(keys)}
    found: dict[str, torch.Tensor] = {}  # column -> [sites, n, ...], filled token chunk by token chunk
    block = (len(keys) + has_ref) * min(width, n) * min(vocab_chunk, vocab)
    z_buf, e_buf, scratch = (torch.empty(block, device=device) for _ in range(3))
    for t0 in range(0, n, width):
        t1 = min(n, t0 + width)
        t = t1 - t0
        parts = ([ref_dec.prepare(ref_rows[t0:t1])] if has_ref else []) + [decoder.prepare(rows[k][t0:t1])
                                                                            for k in direct]
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        y = zy = None
        if needs_target:
            y = targets[t0:t1].to(device)
            zy = _target_logits(decoder, w, x[has_ref * t:].view(len(direct), t, -1), y,
                                {index[k]: [index[a] for a in addends] for k, addends in sums.items()})
            y = y.repeat(len(keys))
        ref = Online(ref_stats, t, device) if has_ref else None
        sites = Online(stats, len(keys) * t, device, y, zy, ref)
        at = {k: slice((has_ref + i) * t, (has_ref + i + 1) * t) for k, i in index.items()}  # each site's rows
        for v0 in range(0, vocab, vocab_chunk):
            v1 = min(vocab, v0 + vocab_chunk)
            size = (len(keys) + has_ref) * t * (v1 - v0)
            z = z_buf[:size].view(-1, v1 - v0)
            decoder.matmul(x, w, v0, v1, out=z[: x.shape[0]])
            for key, addends in sums.items():  # linearity: sums of blocks already computed, bias added after
                torch.add(z[at[addends[0]]], z[at[addends[1]]], out=z[at[key]])
                for a in addends[2:]:
                    z[at[key]] += z[at[a]]
            decoder.add_bias(z, v0, v1)
            e = e_buf[:size].view(-1, v1 - v0)
            ref_chunk = None
            if has_ref:
                ref_dec.post(z[:t])
                ref_chunk = ref.feed(z[:t], v0, e[:t], scratch=scratch)
            sites.feed(decoder.post(z[has_ref * t:]), v0, e[has_ref * t:], ref_chunk, scratch)
        _, values = sites.finish()
        for column, value in values.items():
            if column not in found:
                found[column] = value.new_empty(len(keys), n, *value.shape[1:])
            found[column][:, t0:t1] = value.view(len(keys), t, *value.shape[1:])
    return {k: {c: v[i] for c, v in found.items()} for k, i in index.items()}
