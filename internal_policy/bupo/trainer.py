"""BuPO on TRL: a `GRPOTrainer` whose log-probs come from internal layer policies π^k in the internal phase.

π^k = softmax(H_k·W_Uᵀ + b) (paper Eq. 5: the raw residual, no final norm; `internal_final_norm` applies
the final norm and, as the model's own head does, its logit scale and soft-capping). TRL computes the
policy, old and reference log-probs through one method, `_get_per_token_logps_and_entropies`;
overriding it switches all three together, as the official verl code does (`global_steps <=
iterative_steps` in both `compute_log_prob` and `update_policy`). Rollouts always come from π_θ;
advantages and the clipped loss are TRL's GRPO, untouched.

Phases count rollout batches (official `global_steps`, see `config`): π^k for `internal_steps`
rollouts, or the stages of `internal_schedule` bottom-up (π^2 for 10 rollouts, then π^4 for 10, ...),
then π_θ. Stage boundaries are rollout boundaries, so old and current log-probs of one rollout always
come from the same policy.

How the forward stops after block k: `add_internal_head` gives the policy's `forward` an
`internal_layer` keyword, with which it runs the backbone truncated to blocks 1..k
(`capture.forward_until`: the block list and the final norm are swapped for the call, no exception) and
returns π^k's log-probs from inside the forward, as TRL's fused head does for π_θ. A DDP wrapper thus
sees an ordinary forward and prepares its reducer from the outputs; `ddp_find_unused_parameters=True`
(set by `BuPOConfig`) marks blocks above k unused, parameters no rank used keep `grad=None` and AdamW
leaves them untouched, exactly as on one device. Blocks k+1..L and the final norm never run, forward
or backward, so a step costs about k/L of the transformer compute plus the LM head
(bench/bupo_step.py). Only layers 1..k and the unembedding get gradient; with tied embeddings
(stories260K, Qwen3-4B) that also moves the input embedding.

Baselines (paper Table 11): `grpo`, `freeze` (blocks 1..k frozen the whole run; the embedding stays
trainable, since it is often tied to the unembedding) and `lowlr` (`lowlr_factor` × learning rate above
layer k the whole run; a tied unembedding counts as the embedding and keeps the full rate). Whether the
paper applied these for the whole run is not stated; we do.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from types import MethodType

import pandas as pd
import torch
from torch.distributed.tensor import DTensor
from trl import GRPOTrainer
from trl.kernels import ChunkedLogProbFunction

from ..capture import forward_until
from ..errors import InputError
from ..models import ModelSpec, describe
from ..runs import atomic_write
from .config import DEFAULT_INTERNAL_STEPS, BuPOConfig, Stage, parse_schedule, spaced_layers
from .evaluate import sample_completions, score_completions, summarize
from .rewards import SCORERS

logger = logging.getLogger(__name__)

LOGPROB_CHUNK = 4096
"""Vocabulary tile of TRL's chunked log-prob kernel (the full [tokens, V] logits are never built)."""

VALIDATION_FILE = "validation.csv"
"""Validation table written during training into the output folder: one row per (step, benchmark)."""


def internal_logps(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    spec: ModelSpec,
    temperature: float = 1.0,
    final_norm: bool = False,
    compute_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π^k(target) and (optionally) the entropy of π^k, fp32 [B, T], from H_k [B, T, d] (differentiable).

    Logits are (H_k W_Uᵀ + b) / temperature, as TRL scales its own; with `final_norm` they are the
    model's own readout of norm(H_k) (logit scale, soft-capping). TRL's chunked kernel does the
    log-softmax in fp32 tiles over the vocabulary.
    """
    weight, bias = spec.unembed_weight, spec.unembed_bias
    if isinstance(weight, DTensor):  # FSDP2 shards: gather the head, as TRL does
        weight, bias = weight.full_tensor(), None if bias is None else bias.full_tensor()
    hidden, targets = hidden.to(weight.device), targets.to(weight.device)  # a model split by device_map
    softcap, scale = (spec.logit_softcap, spec.logit_scale) if final_norm else (None, 1.0)
    if final_norm:
        hidden = spec.final_norm(hidden)
    outputs = ("log_probs", "entropy") if compute_entropy else ("log_probs",)
    logps, entropy, *_ = ChunkedLogProbFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1), temperature, LOGPROB_CHUNK,
        softcap, scale, outputs,
    )
    return logps.view(targets.shape), entropy.view(targets.shape) if compute_entropy else None


def append_csv(path: Path, table: pd.DataFrame) -> None:
    """Append rows to a CSV table the run writes as it goes (atomically; `step` first)."""
    if path.is_file():
        table = pd.concat([pd.read_csv(path), table], ignore_index=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table[["step", *[c for c in table.columns if c != "step"]]]
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))


def add_internal_head(model, temperature: float, final_norm: bool = False) -> None:
    """Give `model.forward` an `internal_layer=k` keyword that returns π^k's (log-probs, entropy) of the next tokens.

    With it, the forward runs blocks 1..k only (`capture.forward_until`) and reads H_k out through
    `internal_logps`, inside the forward, so wrappers (DDP, FSDP, DeepSpeed) see the unembedding used
    and the whole call as one forward. `internal_keep` scores the last that many positions (TRL's
    completion tokens; default all), `internal_entropy` adds the entropy. Without `internal_layer` the
    forward is unchanged (generation, π_θ).
    """
    forward = model.forward

    @functools.wraps(type(model).forward)  # keep the signature: `generate` validates its kwargs against it
    def internal_forward(self, *args, internal_layer=None, internal_keep=0, internal_entropy=False, **kwargs):
        if internal_layer is None:
            return forward(*args, **kwargs)
        if args:
            raise TypeError("a forward with internal_layer takes keyword inputs (input_ids=..., attention_mask=...)")
        ids, spec = kwargs["input_ids"], describe(self)
        keep = internal_keep or ids.shape[1] - 1
        hidden = forward_until(self, internal_layer, spec, **kwargs)
        return internal_logps(hidden[:, -keep - 1:-1], ids[:, -keep:], spec, temperature, final_norm, internal_entropy)

    model.forward = MethodType(internal_forward, model)


def layers_above(spec: ModelSpec, k: int) -> list[torch.nn.Parameter]:
    """Parameters π^k never uses: blocks k+1..L and the final norm (less any shared with blocks 1..k)."""
    params = [p for block in spec.layers[k:] for p in block.parameters()]
    if spec.final_norm is not None:
        params += list(spec.final_norm.parameters())
    below = {id(p) for block in spec.layers[:k] for p in block.parameters()}
    return [p for p in params if id(p) not in below]


def resolve_internal_layer(layer: int | str, model, tokenizer, records=None, profile_run=None) -> int:
    """k as a paper layer number: an int is checked against 1..L; 'auto' is the boundary layer of a profile.

    The profile is read from `profile_run` (a folder written by `internal-policy profile`) or computed
    on `records` (prompt/response or text records) with the ffn components only.
    """
    n_layers = describe(model).n_layers
    if layer != "auto":
        if not 1 <= int(layer) <= n_layers:
            raise InputError(f"internal layer {layer} is out of range: this model has layers 1..{n_layers} "
                             "(paper numbering; 0 is the embedding)")
        return int(layer)
    from ..stages import boundary_layer, run_boundary_layer

    if profile_run is not None:
        return run_boundary_layer(profile_run)
    if not records:
        raise InputError("internal_layer='auto' needs a profile: pass profile_run (a profile folder) or records "
                         "(the CLI's --probe)")
    from ..profile import profile

    result = profile(model, tokenizer, records, components=("ffn_in", "ffn"), keep_tokens=False, progress=False)
    return boundary_layer(result.summary)


@dataclass(frozen=True)
class Span:
    """One internal stage in optimizer steps: π^layer trains at steps start..stop-1 (0-based `global_step`)."""

    index: int
    layer: int
    rollouts: int
    start: int
    stop: int

    @property
    def policy(self) -> str:
        """The policy's name in logs and tables: `pi^k`."""
        return f"pi^{self.layer}"


class BuPOTrainer(GRPOTrainer):
    """GRPO trainer optimising π^k (or a bottom-up schedule of π^k's) for the internal phase, then π_θ.

    `phase_log` records, per log-prob computation, the optimizer step (1-based), the role (current,
    old, ref, eval), the policy that produced it ("pi^k" or "pi_theta") and the internal stage (1-based,
    None for π_θ). `spans` are the internal stages in optimizer steps.
    """

    def __init__(self, model, reward_funcs, args: BuPOConfig, *, profile_records=None, profile_run=None, **kwargs):
        if not isinstance(args, BuPOConfig):
            raise InputError("BuPOTrainer needs a BuPOConfig (GRPOConfig plus method/internal_layer/internal_steps)")
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        self._specs: dict[int, ModelSpec] = {}
        policy = self._unwrap(self.model)
        self.n_layers = describe(policy).n_layers
        self.spans = self._spans(self._stages(policy, profile_records, profile_run))
        self.phase_log: list[dict] = []
        self.validated_steps: set[int] = set()  # steps a resumed run already validated
        generate_every = args.steps_per_generation * self.num_iterations
        self._old_from_current = args.gradient_accumulation_steps % generate_every == 0 and not (
            self.use_vllm and self.vllm_importance_sampling_correction)
        if self.spans:
            for model_ in (policy, self.ref_model):  # the reference policy (beta > 0) switches with the others
                if model_ is not None:
                    add_internal_head(self._unwrap(model_), self.temperature, args.internal_final_norm)
            logger.info("BuPO: %s", self.describe_schedule())
        if args.method == "freeze":
            for block in self.spec.layers[: self.internal_layer]:
                block.requires_grad_(False)

    def _stages(self, policy, records, profile_run) -> list[Stage]:
        """Internal stages with resolved layers; sets `internal_layer` (the top stage's k, or the tracked k)."""
        args = self.args

        def layer(value):
            return resolve_internal_layer(value, policy, self.processing_class, records, profile_run)

        self.internal_layer = None if args.internal_layer is None else layer(args.internal_layer)
        if args.method != "bupo":
            return []
        if args.internal_schedule is None:
            stages = [Stage(self.internal_layer, DEFAULT_INTERNAL_STEPS if args.internal_steps is None
                            else args.internal_steps)]
        else:
            stages = parse_schedule(args.internal_schedule)
            if stages[0].layer is None:
                layers = spaced_layers(self.internal_layer, len(stages))
                stages = [Stage(k, s.rollouts) for k, s in zip(layers, stages)]
            elif not args.force_schedule:
                self._check_below_boundary([s.layer for s in stages], layer, args.internal_layer)
            self.internal_layer = stages[-1].layer
        for stage in stages:
            if stage.layer >= self.n_layers:
                raise InputError(f"internal layer {stage.layer} is out of range for method bupo: this model has "
                                 f"layers 1..{self.n_layers} and π^{self.n_layers} decoded raw is not π_θ; use a "
                                 f"layer below {self.n_layers} (or method grpo)")
        return stages

    @staticmethod
    def _check_below_boundary(layers: list[int], layer, internal_layer) -> None:
        try:
            boundary = layer("auto")
        except InputError as err:
            raise InputError(f"checking the schedule's layers against the boundary layer needs a profile ({err}); "
                             "or set force_schedule") from None
        above = [k for k in layers if k > boundary]
        if above:
            raise InputError(f"schedule layers {above} lie above the boundary layer {boundary} (end of the "
                             "exploration stage); set force_schedule to train them anyway")
        if internal_layer == "auto":
            logger.info("schedule layers %s checked against the boundary layer %d", layers, boundary)

    def _spans(self, stages: list[Stage]) -> list[Span]:
        spans, start = [], 0
        for index, stage in enumerate(stages, 1):
            stop = start + self.args.rollouts_to_steps(stage.rollouts)
            spans.append(Span(index, stage.layer, stage.rollouts, start, stop))
            start = stop
        return [s for s in spans if s.stop > s.start]

    @property
    def spec(self) -> ModelSpec:
        """Description of the policy model (blocks, norms, unembedding)."""
        return self._spec_of(self.model)

    @property
    def tracked_layers(self) -> list[int]:
        """The layers k an entropy tracker follows: every stage's, else the configured internal layer."""
        return [s.layer for s in self.spans] or ([self.internal_layer] if self.internal_layer else [])

    def _unwrap(self, model):
        model = self.accelerator.unwrap_model(model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _spec_of(self, model) -> ModelSpec:
        model = self._unwrap(model)
        if id(model) not in self._specs:
            self._specs[id(model)] = describe(model)
        return self._specs[id(model)]

    def span_at(self, step: int | None = None) -> Span | None:
        """The internal stage training at 0-based optimizer step `step` (default: the current one), or None (π_θ)."""
        step = self.state.global_step if step is None else step
        return next((s for s in self.spans if s.start <= step < s.stop), None)

    def policy_at(self, step: int) -> str:
        """Name of the policy 0-based optimizer step `step` trains: "pi^k" or "pi_theta"."""
        span = self.span_at(step)
        return span.policy if span else "pi_theta"

    def in_internal_phase(self) -> bool:
        """True while BuPO optimises an internal policy π^k (the current step lies in an internal stage)."""
        return self.span_at() is not None

    def describe_schedule(self) -> str:
        """The run's schedule in rollout batches and optimizer steps, in one line."""
        args = self.args
        rollout = args.generation_batch_size  # global: per device × processes × steps_per_generation
        update = args.per_device_train_batch_size * self.accelerator.num_processes * args.gradient_accumulation_steps
        stages = ", ".join(f"π^{s.layer} for {s.rollouts} rollouts (steps {s.start + 1}-{s.stop})" for s in self.spans)
        return (f"rollout batch {rollout // self.num_generations} prompts × {self.num_generations} = {rollout} "
                f"completions, optimizer step {update} completions, {args.steps_per_rollout():g} steps per rollout; "
                f"{stages or 'no internal phase'}; then π_θ")

    def _record(self, model, span: Span | None) -> None:
        if not self.model.training:
            role = "eval"
        elif torch.is_grad_enabled():
            role = "current"
        else:
            role = "ref" if model is self.ref_model else "old"
        step = self.state.global_step + 1
        roles = [role, "old"] if role == "current" and self._old_from_current else [role]
        for r in roles:
            self.phase_log.append({"step": step, "role": r, "policy": span.policy if span else "pi_theta",
                                   "stage": span.index if span else None})
        logger.debug("step %d: %s log-probs from %s", step, " and ".join(roles), span.policy if span else "pi_theta")

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **multimodal,
    ):
        span = self.span_at()
        self._record(model, span)
        if span is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal)
        if any(v is not None for v in multimodal.values()):
            raise InputError("BuPO's internal phase supports text-only models; multimodal inputs were given")
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
            with self.accelerator.autocast():
                lp, ent = model(input_ids=ids, attention_mask=mask, internal_layer=span.layer,
                                internal_keep=logits_to_keep, internal_entropy=compute_entropy)
            logps.append(lp)
            entropies.append(ent)
        aux = torch.zeros((), device=input_ids.device) if compute_aux_loss else None  # no router loss below k
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, aux

    def phase_scalars(self, step: int) -> dict[str, float]:
        """Logged with every training log: which policy 0-based step `step` trained (stage 0 and layer L: π_θ)."""
        span = self.span_at(step)
        return {"bupo/internal": float(span is not None), "bupo/stage": float(span.index if span else 0),
                "bupo/layer": float(span.layer if span else self.n_layers)}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's log plus the phase scalars and the scalars of callbacks that offer them (the entropy tracker)."""
        if not any(key.startswith("eval_") for key in logs):
            logs = {**logs, **self.phase_scalars(max(self.state.global_step - 1, 0))}
            for callback in self.callback_handler.callbacks:
                if hasattr(callback, "scalars"):
                    logs.update(callback.scalars(self.state.global_step))
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Validation: `num_generations_eval` samples per problem of each eval set → Avg@n, Pass@K, Maj@K.

        Eval sets are HF datasets (or a dict of them) with `prompt` (text or chat messages) and `answer`;
        answers are checked with `args.eval_scorer`. Problems are split over the processes and gathered;
        the main process appends the table to OUTPUT_DIR/validation.csv. Sampling runs under a forked RNG,
        so validation leaves the training's random stream (and so a resumed run's numbers) unchanged; a
        step a resumed run already validated (`validated_steps`) is not validated again.
        """
        from accelerate.utils import gather_object
        from trl.models import unwrap_model_for_generation

        if self.state.global_step in self.validated_steps:
            return {}
        sets = eval_dataset if eval_dataset is not None else self.eval_dataset
        sets = sets if isinstance(sets, dict) else {"eval": sets}
        n = self.args.num_generations_eval or self.num_generations
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        rows = []
        unwrapped = unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                                gather_deepspeed3_params=self.args.ds3_gather_for_generation)
        with torch.random.fork_rng(devices=devices), unwrapped as model:
            was_training = model.training
            model.eval()
            try:
                for name, data in sets.items():
                    mine = list(range(rank, len(data), world))
                    completions = sample_completions(
                        model, self.processing_class, [data[i]["prompt"] for i in mine], n,
                        max_new_tokens=self.max_completion_length, temperature=self.temperature, top_p=self.top_p,
                        batch_size=self.args.per_device_eval_batch_size, seed=self.args.seed + self.state.global_step)
                    scores = score_completions(name, [str(data[i]["answer"]) for i in mine], completions,
                                               SCORERS[self.args.eval_scorer])
                    rows += scores.assign(problem=[mine[p] for p in scores["problem"]]).to_dict("records")
            finally:
                model.train(was_training)
        table = summarize(pd.DataFrame([r for part in gather_object([rows]) for r in part]))
        metrics = {f"{metric_key_prefix}_{row['benchmark']}/{col}": float(row[col])
                   for row in table.to_dict("records") for col in table.columns if "@" in col}
        if self.accelerator.is_main_process:
            self._append_validation(table.assign(step=self.state.global_step))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _append_validation(self, table: pd.DataFrame) -> None:
        append_csv(Path(self.args.output_dir) / VALIDATION_FILE, table)

    def create_optimizer(self, model=None):
        """TRL's optimizer; for method='lowlr' every group is split so parameters above k get lowlr_factor × lr."""
        optimizer = super().create_optimizer(model)
        if self.args.method != "lowlr":
            return optimizer
        above = {id(p) for p in layers_above(self.spec, self.internal_layer)}
        groups = []
        for group in optimizer.param_groups:
            rest = {key: value for key, value in group.items() if key != "params"}
            low = [p for p in group["params"] if id(p) in above]
            high = [p for p in group["params"] if id(p) not in above]
            groups += [{**rest, "params": high}, {**rest, "params": low, "lr": rest["lr"] * self.args.lowlr_factor}]
        optimizer.param_groups = []
        for group in groups:
            if group["params"]:
                optimizer.add_param_group(group)
        return optimizer
