"""One settings object for a profiling run: API parameters, run.json, the resume key and the CLI flags.

`ProfileSettings` is the single place where a profiling option is declared: its name, default,
help text and whether it changes the numbers. `profile(..., **options)` accepts its fields,
`run.json` stores them, `internal-policy profile` generates one flag per field from the metadata
(`add_arguments` / `from_args`), and `resume_key` is what a resumed run must match.

The resume key also fingerprints what the numbers depend on besides the settings:
- `records_sha256`: the tokenised records (ids, token ids, kept span): a different input, edited
  texts under the same ids, another tokenizer or chat template all change it;
- `chat_template_sha256`: the chat template in use (`--chat-template` file or the tokenizer's own);
- `weights_sha256`: SHA-256 of every parameter and buffer of the loaded model (name, dtype, shape,
  bytes). This reads the weights once, copying GPU tensors to the CPU one at a time: one SHA-256
  pass over the model's bytes on one CPU core (not benchmarked). It hashes the weights actually
  used (after dtype conversion or in-memory edits, and for hub models), which file hashes would not;
  parameters offloaded to disk by accelerate (meta tensors) are covered by hashing the model
  folder's weight files instead;
- `dtype`: the unembedding's dtype.
Batch size, the hidden-state budget and the linear path are not in the key: they change results
only by float rounding; nor is `group_by`, which only regroups finished per-record sums at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from .capture import ALL_COMPONENTS, COMPONENTS, HEAD
from .errors import InputError
from .stats import NAMES, TOPK_MAX, Statistic, parse_alpha, resolve


def csv_list(text: str) -> tuple[str, ...]:
    """A comma-separated CLI list, items stripped; empty items are an InputError."""
    items = tuple(part.strip() for part in text.split(","))
    if not text.strip() or not all(items):
        raise InputError(f"expected a non-empty comma-separated list, got {text!r}")
    return items


def _name(text: str) -> str:
    if not text.strip():
        raise InputError("expected a record field name, got an empty string")
    return text.strip()


def _alphas(text: str) -> tuple[float, ...]:
    return tuple(parse_alpha(a) for a in csv_list(text))


def _option(default, help: str, *, parse=None, flag: str | None = None, key: bool = True, cli: bool = True):
    """A settings field: default, help, CLI parser/flag, and whether the resume key includes it."""
    meta = {"help": help, "parse": parse, "flag": flag, "key": key, "cli": cli}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ProfileSettings:
    """What a profiling run computes; every field is also an `internal-policy profile` flag (see module docstring)."""

    components: tuple[str, ...] = _option(COMPONENTS, f"comma-separated subset of {','.join(ALL_COMPONENTS)}; "
                                          f"{HEAD} (one row per attention head, opt-in: its cost grows with the "
                                          "number of heads) is not in the default", parse=csv_list)
    stats: tuple[str, ...] = _option(("entropy",), f"statistics to compute, comma-separated: {', '.join(NAMES)} "
                                     "or all (every scalar one); entropy is always computed", parse=csv_list)
    renyi_alpha: tuple[float, ...] = _option((), "Rényi orders to add as renyi<α> columns, e.g. 0.5,2,inf",
                                             parse=_alphas)
    topk: int = _option(0, f"store the K most likely tokens and probabilities per site and token (K <= {TOPK_MAX}; "
                        "the `lens` figure needs K >= 1)")
    final_norm: bool = _option(False, "apply the final norm before decoding (logit lens); default: raw h·W_Uᵀ as "
                               "in the paper")
    token_sample: float | None = _option(None, "decode a seeded random fraction of the positions")
    seed: int = _option(0, "seed of --token-sample and of --generate sampling")
    truncate: bool = _option(False, "cut records longer than the context instead of failing")
    keep_tokens: bool = _option(True, "skip tokens.parquet (summary.csv and records.parquet only; for big runs)",
                                flag="--no-tokens")
    chat: dict = _option({}, "chat-template options (the CLI fills them from --thinking / --chat-option)",
                         flag="--thinking/--chat-option", cli=False)
    group_by: str | None = _option(None, "also summarise per value of this record field (e.g. correct, from --generate "
                                   "on prompts with gold answers): summary.csv gets a `group` column", parse=_name,
                                   key=False)
    batch_size: int = _option(8, "records per batch (one shard each)", key=False)
    hidden_budget_mb: float = _option(2048.0, "MiB of kept hidden rows held per forward pass; a batch above it runs as "
                                      "several forwards (a long record as several prefixes)", key=False)
    linear: bool = _option(True, "decode every site by a matmul instead of summing the logits of H_l = H_{l-1} + "
                           "A_l + F_l (raw fp32 decoding only; equal to float rounding)", flag="--no-linear", key=False)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        unknown = [c for c in self.components if c not in ALL_COMPONENTS]
        if unknown or not self.components:
            raise InputError(f"unknown component(s) {unknown or '(none given)'}; "
                             f"choose from {', '.join(ALL_COMPONENTS)}")
        set_("components", tuple(c for c in ALL_COMPONENTS if c in self.components))
        chosen = resolve(self.stats, self.renyi_alpha, self.topk)  # validates names, orders and k
        set_("stats", tuple(st.name for st in chosen))
        set_("renyi_alpha", ())  # folded into `stats` as renyi<α> names: one spelling per request
        set_("topk", next((st.k for st in chosen if st.name == "topk"), 0))
        set_("chat", dict(self.chat))
        if self.topk and not self.keep_tokens:
            raise InputError("--topk stores per-token lists in tokens.parquet: drop --no-tokens or --topk")
        if self.token_sample is not None and not 0 < self.token_sample <= 1:
            raise InputError(f"token_sample must be a fraction in (0, 1], got {self.token_sample}")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.hidden_budget_mb > 0:
            raise InputError(f"hidden_budget_mb must be positive, got {self.hidden_budget_mb}")

    def statistics(self) -> list[Statistic]:
        """The requested statistics (entropy first; see `internal_policy.stats`)."""
        return resolve(self.stats, (), self.topk)

    def to_json(self) -> dict:
        """Plain JSON values (lists for tuples), as stored in run.json."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def resume_key(self) -> dict:
        """The settings a resumed run must match (`key=True` fields), JSON-normalised."""
        data = self.to_json()
        return {f.name: data[f.name] for f in fields(self) if f.metadata["key"]}

    @staticmethod
    def flag(name: str) -> str:
        """The CLI flag of a field (e.g. keep_tokens → --no-tokens)."""
        return _FIELDS[name].metadata["flag"] or "--" + name.replace("_", "-")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per CLI field, generated from the fields (an unset flag keeps the field's default)."""
        for f in fields(cls):
            if not f.metadata["cli"]:
                continue
            default = f.default if f.default is not MISSING else f.default_factory()
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            kwargs = dict(dest=f.name, default=argparse.SUPPRESS)
            if isinstance(default, bool):
                kwargs["action"] = "store_false" if default else "store_true"
                help_ = f.metadata["help"]
            else:
                kwargs["type"] = float if f.name == "token_sample" else str if f.metadata["parse"] else type(default)
                help_ = f"{f.metadata['help']} (default: {shown if shown not in ('', None) else 'none'})"
            parser.add_argument(cls.flag(f.name), help=help_, **kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **extra) -> ProfileSettings:
        """Settings from parsed CLI arguments (flags the user gave) plus `extra` fields."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if f.metadata["cli"] and hasattr(args, f.name)}
        parsed = {}
        for name, value in given.items():
            parse = _FIELDS[name].metadata["parse"]
            try:
                parsed[name] = parse(value) if parse and isinstance(value, str) else value
            except InputError as err:
                raise InputError(f"{cls.flag(name)}: {err}") from None
        return cls(**parsed, **extra)

    def updated(self, **options) -> ProfileSettings:
        """A copy with some fields replaced (unknown names are a TypeError, as for any keyword)."""
        return replace(self, **options) if options else self


_FIELDS = {f.name: f for f in fields(ProfileSettings)}


def _sha256(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def records_digest(examples) -> str:
    """SHA-256 of the tokenised records: ids, token ids and kept spans (what the decodings read)."""
    return _sha256(json.dumps([e.record_id, list(e.input_ids), e.start, e.stop]).encode() for e in examples)


def text_digest(text: str | None) -> str | None:
    """SHA-256 of a text (a chat template), None for none."""
    return None if text is None else _sha256([text.encode()])


def weights_digest(model) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes); see module docstring for the cost."""
    import torch

    def chunks():
        offloaded = False
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            yield f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode()
            if tensor.device.type == "meta":
                offloaded = True
                continue
            flat = tensor.detach().reshape(-1).cpu().contiguous()
            yield flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        folder = Path(str(getattr(model.config, "_name_or_path", "")))
        if offloaded and folder.is_dir():
            for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
                with path.open("rb") as handle:
                    yield from iter(lambda: handle.read(1 << 24), b"")

    return _sha256(chunks())


def fingerprints(model, spec, examples, tokenizer, weights: bool = True) -> dict:
    """The `FINGERPRINT` values of a run: dtype, records, chat template and (with `weights`) the weights' digest."""
    return {"dtype": str(spec.unembed_weight.dtype).removeprefix("torch."),
            "records_sha256": records_digest(examples),
            "chat_template_sha256": text_digest(getattr(tokenizer, "chat_template", None)),
            "weights_sha256": weights_digest(model) if weights else None}


FINGERPRINT = {"records_sha256": "the records' content (their token ids and kept spans)",
               "chat_template_sha256": "the chat template", "weights_sha256": "the model's weights",
               "dtype": "--dtype"}
"""run.json keys besides the settings that the resume key includes, and how an error names them."""


def describe_change(key: str, saved, now) -> str:
    """How a resume error names one difference: the flag or thing, with both values when they are short."""
    name = FINGERPRINT.get(key) or ProfileSettings.flag(key)
    if key in _FIELDS and isinstance(_FIELDS[key].default, bool):  # a flag: given or not
        on = lambda value: "on" if value != _FIELDS[key].default else "off"  # noqa: E731
        return f"{name} ({on(saved)} -> {on(now)})"
    if key.endswith("sha256") or any(len(json.dumps(v)) > 40 for v in (saved, now)):
        return name
    return f"{name} ({json.dumps(saved)} -> {json.dumps(now)})"


def resume_key(settings: ProfileSettings, fingerprint: Mapping) -> dict:
    """Everything a resumed run must match: the key settings and the fingerprint."""
    return {**settings.resume_key(), **{k: fingerprint[k] for k in FINGERPRINT}}
