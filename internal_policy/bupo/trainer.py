"""BuPO on TRL: a `GRPOTrainer` whose log-probs come from the internal layer policy π^k for s_inter steps.

π^k = softmax(H_k·W_Uᵀ + b) (paper Eq. 5: raw residual, no final norm unless `internal_final_norm`).
TRL computes the policy, old and reference log-probs through one method,
`_get_per_token_logps_and_entropies`; overriding it switches all three together, as the official verl
code does (`global_steps <= iterative_steps` for both `compute_log_prob` and `update_policy`).
Rollouts, rewards, advantages and the clipped loss are TRL's GRPO, untouched.

Internal phase cost: the forward stops after block k (`capture.forward_until`), so blocks k+1..L, the
final norm and their backward never run; the step costs roughly k/L of the transformer compute plus
the LM head (see bench/bupo_step.py). Only layers 1..k and the unembedding get gradient; with tied
embeddings (e.g. stories260K, Qwen3-4B) that unembedding gradient also moves the input embedding.

The same trainer runs the baselines (paper Table 11): `grpo`, `freeze` (blocks 1..k frozen for the
whole run; the embedding stays trainable, since it is often tied to the unembedding) and `lowlr` (`lowlr_factor` × learning rate above layer k for the whole run; a tied
unembedding counts as the embedding and keeps the full rate). Whether the paper applied these for the
whole run is not stated; we do.
"""

from __future__ import annotations

import logging

import torch
from trl import GRPOTrainer
from trl.kernels import ChunkedLogProbFunction

from ..capture import forward_until
from ..errors import InputError
from ..models import ModelSpec, describe
from .config import BuPOConfig

logger = logging.getLogger(__name__)

LOGPROB_CHUNK = 4096
"""Vocabulary tile of TRL's chunked log-prob kernel (the full [tokens, V] logits are never built)."""


def internal_logps(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    spec: ModelSpec,
    temperature: float = 1.0,
    final_norm: bool = False,
    compute_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π^k(target) and (optionally) the entropy of π^k, fp32 [B, T], from H_k [B, T, d] (differentiable).

    Logits are (H_k W_Uᵀ + b) / temperature, as TRL scales its own; TRL's chunked kernel does the
    log-softmax in fp32 tiles over the vocabulary.
    """
    device = spec.unembed_weight.device  # a model split over devices (device_map) can end elsewhere
    hidden, targets = hidden.to(device), targets.to(device)
    if final_norm:
        hidden = spec.final_norm(hidden)
    outputs = ("log_probs", "entropy") if compute_entropy else ("log_probs",)
    logps, entropy, *_ = ChunkedLogProbFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]), spec.unembed_weight, spec.unembed_bias, targets.reshape(-1),
        temperature, LOGPROB_CHUNK, None, 1.0, outputs,
    )
    entropy = entropy.view(targets.shape) if compute_entropy else None
    return logps.view(targets.shape), entropy


def layers_above(spec: ModelSpec, k: int) -> list[torch.nn.Parameter]:
    """Parameters of blocks k+1..L and the final norm (an untied unembedding too): what π^k never uses."""
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
        raise InputError("internal_layer='auto' needs a profile: pass profile_run (a profile folder) or records")
    from ..profile import profile

    result = profile(model, tokenizer, records, components=("ffn_in", "ffn"), keep_tokens=False, progress=False)
    return boundary_layer(result.summary)


class BuPOTrainer(GRPOTrainer):
    """GRPO trainer optimising π^k for `internal_steps` optimizer steps, then π_θ (or a Table 11 baseline).

    `phase_log` records, per log-prob computation, the optimizer step (1-based), the role (current,
    old, ref) and which policy produced it ("pi^k" or "pi_theta").
    """

    def __init__(self, model, reward_funcs, args: BuPOConfig, *, profile_records=None, profile_run=None, **kwargs):
        if not isinstance(args, BuPOConfig):
            raise InputError("BuPOTrainer needs a BuPOConfig (GRPOConfig plus method/internal_layer/internal_steps)")
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        self._specs: dict[int, ModelSpec] = {}
        policy = self._unwrap(self.model)
        self.internal_layer = None
        if args.method != "grpo":
            self.internal_layer = resolve_internal_layer(args.internal_layer, policy, self.processing_class,
                                                         profile_records, profile_run)
            logger.info("BuPO method=%s internal layer k=%d (paper numbering; HF block %d)", args.method,
                        self.internal_layer, self.internal_layer - 1)
        self.phase_log: list[dict] = []
        generate_every = args.steps_per_generation * self.num_iterations
        self._old_from_current = args.gradient_accumulation_steps % generate_every == 0 and not (
            self.use_vllm and self.vllm_importance_sampling_correction)
        if args.method == "bupo" and (args.internal_steps * args.gradient_accumulation_steps) % generate_every:
            raise InputError(
                f"internal_steps={args.internal_steps} would switch policies inside a rollout that serves "
                f"{generate_every / args.gradient_accumulation_steps:g} optimizer steps (steps_per_generation × "
                "num_iterations / gradient_accumulation_steps); make internal_steps a multiple of that")
        if args.method == "freeze":
            for block in self.spec.layers[: self.internal_layer]:
                block.requires_grad_(False)

    @property
    def spec(self) -> ModelSpec:
        """Description of the policy model (blocks, norms, unembedding)."""
        return self._spec_of(self.model)

    def _unwrap(self, model):
        model = self.accelerator.unwrap_model(model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _spec_of(self, model) -> ModelSpec:
        model = self._unwrap(model)
        if id(model) not in self._specs:
            self._specs[id(model)] = describe(model)
        return self._specs[id(model)]

    def in_internal_phase(self) -> bool:
        """True while BuPO optimises π^k: optimizer steps 1..internal_steps (global_step < internal_steps)."""
        return self.args.method == "bupo" and self.state.global_step < self.args.internal_steps

    def _record(self, model, internal: bool) -> None:
        if not self.model.training:
            role = "eval"
        elif torch.is_grad_enabled():
            role = "current"
        else:
            role = "ref" if model is self.ref_model else "old"
        policy = f"pi^{self.internal_layer}" if internal else "pi_theta"
        step = self.state.global_step + 1
        roles = [role, "old"] if role == "current" and self._old_from_current else [role]
        for r in roles:
            self.phase_log.append({"step": step, "role": r, "policy": policy})
        logger.info("step %d: %s log-probs from %s", step, " and ".join(roles), policy)

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **multimodal,
    ):
        internal = self.in_internal_phase()
        self._record(model, internal)
        if not internal:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal)
        if any(v is not None for v in multimodal.values()):
            raise InputError("BuPO's internal phase supports text-only models; multimodal inputs were given")
        spec = self._spec_of(model)
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
            with self.accelerator.autocast():
                hidden = forward_until(model, self.internal_layer, spec=spec, input_ids=ids, attention_mask=mask)
            lp, ent = internal_logps(hidden[:, -logits_to_keep - 1:-1], ids[:, -logits_to_keep:], spec,
                                     self.temperature, self.args.internal_final_norm, compute_entropy)
            logps.append(lp)
            entropies.append(ent)
        aux = torch.zeros((), device=input_ids.device) if compute_aux_loss else None  # no router loss below k
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, aux

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
