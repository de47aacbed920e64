"""AttnRL on TRL: branching rollouts with TreeRL advantages, in a `BuPOTrainer`.

TRL's `rollout_func` cannot add rows, so `AttnRLTrainer` overrides the rollout/scoring step,
`_generate_and_score_completions`. TRL's own step samples and scores the n initial responses per
question; then, for each question held by this process:
1. selection scores: every response step's FCI from one eager-attention pass (`fci.step_attention`;
   for `attn`, and for adaptive sampling's all-correct rule whatever the selector), or π_θ's token
   entropies (`entropy`): a no-grad forward of its own, not merged with TRL's old-log-prob forward (that
   one is π^k's in BuPO's internal phase, and its left-padded rows would shift the step positions);
   `bench/attnrl_train_step.py` prints its share of a step (`fci_share`);
2. the plan: every response, or with `adaptive_sampling` `plan_branching`'s ceil(n·e^(−acc)); N
   points per branched response by the selector; T continuations per point, sampled with TRL's
   generation helper from prompt + the parent's tokens before the point and cut so that prefix +
   continuation fit `max_completion_length`;
3. the continuations are scored with the trainer's reward functions, and each question's tree gives
   the training rows: its trained leaves (`tree.tree_advantages`), every token carrying its segment's
   TreeRL advantage A = ((V − V_root) + (V − V_parent)) / √(leaves below), without std normalisation.
   A response with no branch below the root gets A = 2·(r − mean r): its global and local terms are
   the same number. Unbranched responses count in V_root but are not trained on. Questions whose
   rows all share one reward are dropped (`zero_std_filter`).

The batch returned has one row per leaf and a (rows × tokens) advantages tensor, which TRL's
`_compute_loss` accepts. `num_items_in_batch` (the `dapo` loss's normaliser) is recomputed over the
new rows. When TRL computes old log-probs (or reference log-probs, β > 0), every row gets them:
an initial response keeps TRL's, a continuation row's are computed through
`_get_per_token_logps_and_entropies` (so during BuPO's internal phase they are π^k's, as TRL's are),
with its prefix tokens set to its parent's values. The row count is padded to a multiple of
`steps_per_generation` (TRL's `split_tensor_dict` would silently drop a remainder), and to the
largest count of any process (TRL gathers per-row loss metrics, which needs equal micro-batches),
with copies of a real row whose completion mask and advantages are zero.

With `off_policy_branching` (one-step off-policy), the rollout call at step t samples batch t's initial responses
and the continuations of batch t−1's branch points, and trains batch t−1's trees: prefix tokens keep
their old log-probs from θ_{t−1} (stored with the pending trees), continuation tokens get θ_t's. The
first rollout batch has no trees to train (its steps see zero gradient; weight decay still applies).

Several processes: TRL gathers the rewards of every process (a question's n responses may be split
over processes). Here each question's tree must live on one process, so the per-process generation
batch (`per_device_train_batch_size × steps_per_generation`) must hold whole questions (checked).
Reward calls for continuations go through TRL's `_calculate_rewards`, whose gather needs equal
sizes: every process pads its continuation list to the largest one with a filler prompt, and keeps
its own slice. Counts for the logs are summed over processes; the adaptive running mean takes every
process's all-correct questions, so it is the same number everywhere.

Logged per rollout (TRL's scalars, prefix `attnrl/`, and the table `OUTPUT_DIR/branching.csv`,
`BRANCH_COLUMNS`): questions, branch points chosen, rows added, rows trained, the share of
zero-variance questions before branching (initial rewards) and after (the whole tree), generated
tokens (initial completions + continuation tokens kept) and their running total. The adaptive
running mean, the token total and the pending trees are saved in every checkpoint
(`attnrl_state-<rank>.pt`) and restored on resume.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import pad

from ..bupo.trainer import BuPOTrainer, append_csv
from ..errors import InputError
from .config import AttnRLConfig
from .fci import attention_modules, step_attention
from .sampling import RunningMean, plan_branching
from .select import select_attn, select_entropy, select_random, step_points
from .steps import Steps, sequence_steps, token_texts
from .tree import Continuation, branch_prefixes, tree_advantages

BRANCH_FILE = "branching.csv"
"""Per-rollout branching table written into the output folder (one row per rollout call)."""

STATE_FILE = "attnrl_state-{rank}.pt"
"""Per-process branching state in each checkpoint folder: running mean, token total, pending trees."""

BRANCH_COLUMNS = {
    "step": "first optimizer step (1-based) trained on this call's rows",
    "questions": "questions in the rollout batch",
    "zero_std_before": "share of them whose n initial rewards are all equal",
    "branched_responses": "responses chosen for branching",
    "branch_points": "branch points chosen (repeats of a point counted)",
    "point_position": "mean position of the points in their response (0 = start, 1 = end)",
    "dropped_questions": "all-correct questions dropped by adaptive sampling",
    "unbranchable": "responses planned for branching that have too few steps (or tokens) to branch",
    "trees": "questions whose trees are completed by this call (off-policy: the previous batch's)",
    "zero_std_after": "share of those trees whose leaves (initial + continuations) all share one reward",
    "rows_added": "continuations sampled",
    "branch_reward": "mean reward of the continuations",
    "filtered_questions": "trees dropped by the zero-variance filter",
    "train_rows": "training rows (trained leaves kept)",
    "padding_rows": "zero-advantage rows added to reach a multiple of steps_per_generation",
    "generated_tokens": "initial completion tokens + continuation tokens kept",
    "generated_tokens_total": "running total of generated_tokens",
    "initial_reward": "mean reward of the initial responses",
    "running_fci": "adaptive sampling's running mean FCI of all-correct questions (NaN before any)",
}


@dataclass
class Question:
    """One question's initial responses on this process, their selection scores and branching plan."""

    prompt: Any
    """The prompt as the reward functions see it (text or chat messages)."""
    inputs: dict
    """Its dataset row (the reward functions' keyword arguments)."""
    prompt_ids: list[int]
    responses: list[list[int]]
    rewards: list[float]
    old_logps: list[list[float]] | None = None
    steps: list[Steps | None] = field(default_factory=list)
    fci: list[np.ndarray | None] = field(default_factory=list)
    entropies: list[list[float]] = field(default_factory=list)
    plan: list[int] | None = None
    """Responses to branch; None: dropped by adaptive sampling."""
    points: dict[int, list[int]] = field(default_factory=dict)
    """{response: response-relative token indices} to branch at."""
    continuations: list[Continuation] = field(default_factory=list)

    def mean_fci(self) -> float:
        """Mean over responses of the mean FCI over their response steps (y_1 = 0 included)."""
        return float(np.mean([np.mean(y[1:]) if y is not None and len(y) > 1 else 0.0 for y in self.fci]))


@contextmanager
def _max_new_tokens(config, value: int):
    """Temporarily cap a GenerationConfig's max_new_tokens."""
    saved = config.max_new_tokens
    config.max_new_tokens = value
    try:
        yield
    finally:
        config.max_new_tokens = saved


class AttnRLTrainer(BuPOTrainer):
    """`BuPOTrainer` whose rollouts branch at chosen points and train with TreeRL advantages (module doc).

    With `branching='none'` it is exactly `BuPOTrainer`. `branch_log` holds the per-rollout table
    (`BRANCH_COLUMNS`), also written to OUTPUT_DIR/branching.csv by the main process; `last_trees`
    the questions (responses, points, continuations) whose trees the last rollout call trained.
    """

    def __init__(self, model, reward_funcs, args: AttnRLConfig, **kwargs):
        if not isinstance(args, AttnRLConfig):
            raise InputError("AttnRLTrainer needs an AttnRLConfig (BuPOConfig plus the branching options)")
        super().__init__(model, reward_funcs, args, **kwargs)
        self.running = RunningMean()
        self.generated_total = 0
        self.branch_log: list[dict] = []
        self._pending: list[Question] = []
        self.last_trees: list[Question] = []  # the questions whose trees the last rollout call trained
        self._rollout: tuple[list, list] | None = None
        self._rewards: torch.Tensor | None = None
        if args.branching != "none":
            self._check_branching_setup()

    @property
    def branching(self) -> bool:
        """Whether branching rollouts are on (`branching` is not 'none')."""
        return self.args.branching != "none"

    def _check_branching_setup(self) -> None:
        args, world = self.args, self.accelerator.num_processes
        if self.tools or self.environment_factories is not None or self.rollout_func is not None:
            raise InputError("branching supports plain single-turn rollouts: no tools, environments or rollout_func")
        if world > 1 and (args.per_device_train_batch_size * args.steps_per_generation) % self.num_generations:
            raise InputError(
                f"branching keeps each question's tree on one process: per_device_train_batch_size × "
                f"steps_per_generation ({args.per_device_train_batch_size} × {args.steps_per_generation}) must be a "
                f"multiple of num_generations ({self.num_generations})")
        if self.beta != 0.0 and self.ref_model is None:
            raise InputError("branching with beta > 0 needs a reference model (not a PEFT adapter's base)")
        if args.branching == "attn" or args.adaptive_sampling:
            attention_modules(self._unwrap(self.model))  # a model without eager attention fails here, before training

    # -- what TRL's own step produced ---------------------------------------------------------------

    def _generate(self, prompts: list):
        """TRL's generation; keeps the unpadded prompt and completion ids of this process's rows."""
        result = super()._generate(prompts)
        self._rollout = (result[0], result[1])
        return result

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's reward computation (gathered over processes); keeps the result."""
        self._rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards

    def _scalar_rewards(self, gathered: torch.Tensor, start: int, count: int) -> list[float]:
        """Weighted sum over reward functions (NaN counted as 0, as TRL's logged reward) of rows start..start+count."""
        total = (gathered * self.reward_weights.to(gathered.device).unsqueeze(0)).nansum(dim=1)
        return total[start:start + count].tolist()

    # -- the rollout step ----------------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        if not self.model.training or not self.branching:
            return super()._generate_and_score_completions(inputs)
        out = super()._generate_and_score_completions(inputs)
        stats: dict[str, float] = {}
        questions = self._questions(out, inputs, stats)
        self._score_for_selection(questions, out)
        self._plan(questions, stats)
        if self.args.off_policy_branching:
            ready, self._pending = self._pending, questions
        else:
            ready = questions
        filler = (questions[0].prompt, questions[0].inputs, questions[0].prompt_ids, questions[0].responses[0])
        self._sample_continuations(ready, filler, stats)
        self.last_trees = ready
        batch = self._training_batch(ready, filler, "old_per_token_logps" in out or self.args.off_policy_branching,
                                     stats)
        self._log_branching(stats)
        return batch

    def _questions(self, out: dict, inputs: list[dict], stats: dict) -> list[Question]:
        """This process's rows grouped into questions of num_generations responses, with rewards."""
        prompt_ids, completion_ids = self._rollout
        n, group = len(completion_ids), self.num_generations
        rewards = self._scalar_rewards(self._rewards, self.accelerator.process_index * n, n)
        old = None
        if "old_per_token_logps" in out:
            old = out["old_per_token_logps"]
        elif self.args.off_policy_branching:  # the prefix tokens' θ_t log-probs, kept until batch t+1 trains them
            old = self._logps(self.model, *self._full_rows(out, completion_ids), out["completion_ids"].shape[1])
        questions = []
        for start in range(0, n, group):
            rows = range(start, start + group)
            questions.append(Question(
                inputs[start]["prompt"], inputs[start], list(prompt_ids[start]),
                [list(completion_ids[i]) for i in rows], [rewards[i] for i in rows],
                None if old is None else [old[i, :len(completion_ids[i])].tolist() for i in rows]))
        stats.update(questions=len(questions), initial_reward_sum=sum(rewards), initial_rows=n,
                     zero_var_initial=sum(len(set(q.rewards)) == 1 for q in questions),
                     generated_tokens=sum(map(len, completion_ids)))
        return questions

    @staticmethod
    def _full_rows(out: dict, completion_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """TRL's prompt + completion ids with an attention mask over every completion token (even truncated ones)."""
        mask = torch.zeros_like(out["completion_mask"])
        for row, ids in enumerate(completion_ids):
            mask[row, :len(ids)] = 1
        return (torch.cat([out["prompt_ids"], out["completion_ids"]], 1),
                torch.cat([out["prompt_mask"], mask], 1))

    @torch.no_grad()
    def _logps(self, model, ids: torch.Tensor, mask: torch.Tensor, keep: int, rows: list[int] | None = None):
        """Log-probs of the last `keep` tokens of `rows` (default all) through the policy path TRL uses (BuPO's
        π^k in its internal phase). Every process runs as many forwards (DDP syncs buffers and FSDP gathers
        parameters in each): the rows are padded with copies of row 0 to the largest count of any process."""
        index = torch.arange(ids.shape[0]) if rows is None else torch.tensor(rows, dtype=torch.long)
        count = len(index)
        top = int(self.accelerator.gather(torch.tensor([count], device=ids.device)).max())
        if top == 0:
            return torch.zeros(0, keep, device=ids.device)
        index = torch.cat([index, index.new_zeros(top - count)]).to(ids.device)
        logps, _, _ = self._get_per_token_logps_and_entropies(model, ids[index], mask[index], keep,
                                                              batch_size=self.args.per_device_train_batch_size)
        return logps[:count]

    def _score_for_selection(self, questions: list[Question], out: dict) -> None:
        """Steps and FCI (attn, adaptive sampling) or π_θ's token entropies (entropy) of every response."""
        args = self.args
        if args.branching in ("attn", "random") or args.adaptive_sampling:
            for q in questions:
                q.steps = [sequence_steps(len(q.prompt_ids), token_texts(self._tokenizer, r), args.separators)
                           for r in q.responses]
        if args.branching == "attn" or args.adaptive_sampling:
            self._fci(questions)
        if args.branching == "entropy":
            with torch.no_grad():  # π_θ, the sampling policy, whatever policy BuPO optimises
                _, entropy, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                    self, self.model, *self._full_rows(out, self._rollout[1]), out["completion_ids"].shape[1],
                    batch_size=args.per_device_train_batch_size, compute_entropy=True)
            rows = [(q, i) for q in questions for i in range(len(q.responses))]  # TRL's row order
            for row, (q, i) in enumerate(rows):
                q.entropies.append(entropy[row, :len(q.responses[i])].tolist())

    @torch.no_grad()
    def _fci(self, questions: list[Question]) -> None:
        """FCI of every response's steps: per_device_train_batch_size rows per eager-attention pass."""
        pad_id, device = self._tokenizer.pad_token_id, self.accelerator.device
        rows = [(q, i) for q in questions for i in range(len(q.responses))]
        for q in questions:
            q.fci = [None] * len(q.responses)
        size = self.args.per_device_train_batch_size
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            ids = pad([torch.tensor(q.prompt_ids + q.responses[i]) for q, i in chunk], pad_id).to(device)
            mask = pad([torch.ones(len(q.prompt_ids) + len(q.responses[i]), dtype=torch.long) for q, i in chunk],
                       0).to(device)
            with step_attention(self._unwrap(self.model), [q.steps[i] for q, i in chunk], ids.shape[1],
                                self.args.fci_delta) as result, self.accelerator.autocast():
                self.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
            for (q, i), y in zip(chunk, result.fci()):
                q.fci[i] = y

    def _plan(self, questions: list[Question], stats: dict) -> None:
        """Which responses to branch (all, or adaptive sampling's) and at which points (the selector)."""
        args = self.args
        rng = np.random.default_rng([args.seed, self.state.global_step, self.accelerator.process_index])
        if args.adaptive_sampling:
            from accelerate.utils import gather_object

            means = [q.mean_fci() for q in questions]
            mine = [m for m, q in zip(means, questions) if min(q.rewards) > 0]
            everyone = gather_object([mine])
            others = [m for rank, part in enumerate(everyone) if rank != self.accelerator.process_index for m in part]
            self.running.add(others)  # plan_branching adds this process's own: the mean is over every process
            plans = plan_branching([q.rewards for q in questions], means, self.running, rng)
        else:
            plans = [list(range(len(q.responses))) for q in questions]
        points = position = unbranchable = 0
        for q, plan in zip(questions, plans):
            q.plan = plan
            for i in plan or ():
                chosen = self._points(q, i, rng)
                if chosen is None:
                    unbranchable += 1
                    continue
                q.points[i] = chosen
                points += len(chosen)
                position += sum(p / len(q.responses[i]) for p in chosen)
        stats.update(dropped=sum(p is None for p in plans), branched=sum(len(q.points) for q in questions),
                     points=points, position_sum=position, unbranchable=unbranchable)

    def _points(self, q: Question, i: int, rng: np.random.Generator) -> list[int] | None:
        """Response-relative branch tokens of response i, or None if it has too few steps (tokens) to branch."""
        args = self.args
        if args.branching == "entropy":
            return select_entropy(q.entropies[i], args.branch_points) if len(q.responses[i]) > args.branch_points \
                else None
        steps = q.steps[i]
        if steps.n_steps < 3:  # the first response step is never a branch point
            return None
        if args.branching == "attn":
            chosen = select_attn(q.fci[i], steps, args.branch_points, args.fci_quantile, args.min_start,
                                 args.branch_min_distance)
        else:
            chosen = select_random(steps, rng, args.branch_points, args.min_start, args.branch_min_distance)
        return step_points(steps, chosen)

    def _sample_continuations(self, questions: list[Question], filler: tuple, stats: dict) -> None:
        """T continuations per branch point, cut to fit max_completion_length, scored by the reward functions."""
        wanted = [(q, p) for q in questions
                  for p in branch_prefixes(q.prompt_ids, q.responses, q.points, self.args.branch_samples)]
        device = self.accelerator.device
        top = int(self.accelerator.gather(torch.tensor([len(wanted)], device=device)).max())
        stats.update(continuations=len(wanted), continuation_tokens=0, continuation_reward_sum=0.0)
        if top == 0:
            return
        longest = self.max_completion_length
        budget = max((longest - p.point for _, p in wanted), default=1)
        fill = top - len(wanted)  # equal sizes on every process for the reward gather
        prefixes = [p.ids for _, p in wanted] + [filler[2]] * fill
        with _max_new_tokens(self.generation_config, budget):
            sampled, _ = self._generate_single_turn(prefixes, None, {}, 1)
        new = [ids[: longest - p.point] for (_, p), ids in zip(wanted, sampled)]
        leaves = [q.responses[p.parent][: p.point] + ids for (q, p), ids in zip(wanted, new)] + [filler[3]] * fill
        texts = self._tokenizer.batch_decode(leaves, skip_special_tokens=True)
        prompts = [q.prompt for q, _ in wanted] + [filler[0]] * fill
        completions = [[{"role": "assistant", "content": t}] if is_conversational({"prompt": p}) else t
                       for p, t in zip(prompts, texts)]
        gathered = self._calculate_rewards([q.inputs for q, _ in wanted] + [filler[1]] * fill, prompts, completions,
                                           leaves)
        self._pending_extra_logs.clear()  # reward-logged extras of branch rows would misalign TRL's completion table
        self._pending_metrics.clear()
        rewards = self._scalar_rewards(gathered, self.accelerator.process_index * top, len(wanted))
        for (q, p), ids, reward in zip(wanted, new, rewards):
            q.continuations.append(Continuation(p.parent, p.point, ids, reward))
        stats.update(continuation_tokens=sum(map(len, new)), continuation_reward_sum=sum(rewards))

    def _training_batch(self, questions: list[Question], filler: tuple, with_old: bool, stats: dict) -> dict:
        """One row per trained leaf (TreeRL advantages per token), padded to a multiple of steps_per_generation."""
        rows = []  # (question, leaf)
        filtered = zero_var = 0
        for q in questions:
            leaves = tree_advantages(q.responses, q.rewards, q.continuations, self.max_completion_length)
            zero_var += len({leaf.reward for leaf in leaves}) == 1
            trained = [leaf for leaf in leaves if leaf.trained]
            if trained and self.args.zero_std_filter and len({leaf.reward for leaf in trained}) == 1:
                filtered += 1
                continue
            rows += [(q, leaf) for leaf in trained]
        padding = self._padding(len(rows))
        stats.update(trees=len(questions), zero_var_tree=zero_var, filtered=filtered, train_rows=len(rows),
                     padding_rows=padding)
        device, pad_id = self.accelerator.device, self._tokenizer.pad_token_id
        prompt_ids = [q.prompt_ids for q, _ in rows] + [(rows[0][0].prompt_ids if rows else filler[2])] * padding
        completion_ids = [leaf.ids for _, leaf in rows] + [(rows[0][1].ids if rows else filler[3])] * padding
        advantages = [leaf.advantages for _, leaf in rows] + [[0.0] * len(completion_ids[-1])] * padding
        eos_and_pad = {*self.eos_token_ids, pad_id}
        kept = [not (self.mask_truncated_completions and leaf.ids[-1] not in eos_and_pad) for _, leaf in rows]
        kept += [False] * padding

        def right(values, dtype, fill=0):
            return pad([torch.tensor(v, dtype=dtype) for v in values], fill, "right", self.pad_to_multiple_of)

        batch = {
            "prompt_ids": pad([torch.tensor(p) for p in prompt_ids], pad_id, "left", self.pad_to_multiple_of),
            "prompt_mask": pad([torch.ones(len(p), dtype=torch.long) for p in prompt_ids], 0, "left",
                               self.pad_to_multiple_of),
            "completion_ids": right(completion_ids, torch.long, pad_id),
            "completion_mask": right([[int(k)] * len(c) for k, c in zip(kept, completion_ids)], torch.long),
            "advantages": right(advantages, torch.float32),
        }
        batch = {key: value.to(device) for key, value in batch.items()}
        width = batch["completion_ids"].shape[1]
        batch["num_items_in_batch"] = self.accelerator.gather(batch["completion_mask"].sum()).sum()
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        if with_old:
            batch["old_per_token_logps"] = self._old_logps(rows, ids, mask, width)
        if self.beta != 0.0:
            batch["ref_per_token_logps"] = self._logps(self.ref_model, ids, mask, width)
        return batch

    def _padding(self, rows: int) -> int:
        """Zero rows to add so that every process holds the same row count, a multiple of steps_per_generation
        (at least one row per micro-batch): TRL splits a rollout into steps_per_generation micro-batches and
        gathers per-row loss metrics, which needs equal micro-batches on every process."""
        steps = self.args.steps_per_generation
        top = int(self.accelerator.gather(torch.tensor([rows], device=self.accelerator.device)).max())
        return max(steps, -(-top // steps) * steps) - rows

    def _old_logps(self, rows: list, ids: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
        """Old log-probs of every row: the parent's for initial responses and for a continuation's prefix
        tokens, computed now (the current policy path) for a continuation's own tokens; 0 on padding rows."""
        old = torch.zeros(ids.shape[0], width, device=ids.device)
        branch = [r for r, (_, leaf) in enumerate(rows) if leaf.branch is not None]
        computed = self._logps(self.model, ids, mask, width, branch)  # called on every process, even with no rows
        if branch:
            old[branch] = computed.to(old.dtype)
        for r, (q, leaf) in enumerate(rows):
            parent = q.old_logps[leaf.parent]
            point = len(parent) if leaf.branch is None else q.continuations[leaf.branch].point
            old[r, :point] = torch.tensor(parent[:point], device=ids.device)
        return old

    # -- logs and state ------------------------------------------------------------------------------

    def _log_branching(self, stats: dict) -> None:
        """Sum the counts over processes; log the scalars and append the per-rollout table row."""
        keys = sorted(stats)
        local = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=self.accelerator.device)
        total = dict(zip(keys, self.accelerator.gather(local[None]).sum(0).tolist()))
        self.generated_total += int(total["generated_tokens"] + total["continuation_tokens"])
        share = lambda a, b: total[a] / total[b] if total[b] else math.nan  # noqa: E731
        row = {
            "step": self.state.global_step + 1, "questions": int(total["questions"]),
            "zero_std_before": share("zero_var_initial", "questions"), "branched_responses": int(total["branched"]),
            "branch_points": int(total["points"]), "point_position": share("position_sum", "points"),
            "dropped_questions": int(total["dropped"]), "unbranchable": int(total["unbranchable"]),
            "trees": int(total["trees"]), "zero_std_after": share("zero_var_tree", "trees"),
            "rows_added": int(total["continuations"]),
            "branch_reward": share("continuation_reward_sum", "continuations"),
            "filtered_questions": int(total["filtered"]), "train_rows": int(total["train_rows"]),
            "padding_rows": int(total["padding_rows"]),
            "generated_tokens": int(total["generated_tokens"] + total["continuation_tokens"]),
            "generated_tokens_total": self.generated_total,
            "initial_reward": share("initial_reward_sum", "initial_rows"),
            "running_fci": math.nan if self.running.mean is None else self.running.mean,
        }
        self.branch_log.append(row)
        metrics = self._metrics["train"]
        for key, value in row.items():
            if key not in ("step", "generated_tokens_total") and not math.isnan(value):
                metrics[f"attnrl/{key}"].append(float(value))
        metrics["attnrl/generated_tokens_total"] = [float(self.generated_total)]
        if self.accelerator.is_main_process:
            append_csv(Path(self.args.output_dir) / BRANCH_FILE, pd.DataFrame([row]))

    def _save_checkpoint(self, model, trial):
        """TRL's checkpoint plus this process's branching state (running mean, token total, pending trees)."""
        super()._save_checkpoint(model, trial)
        if self.branching:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            state = {"running": (self.running.total, self.running.count), "generated_total": self.generated_total,
                     "pending": self._pending}
            torch.save(state, folder / STATE_FILE.format(rank=self.accelerator.process_index))

    def _load_optimizer_and_scheduler(self, checkpoint):
        """On resume (where TRL restores its own controller state): the branching state, and the table up to the
        checkpoint."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not self.branching:
            return
        path = Path(checkpoint) / STATE_FILE.format(rank=self.accelerator.process_index)
        if not path.is_file():
            raise InputError(f"{checkpoint} has no {path.name}: it was not written by a branching run with this "
                             "process count; resume with the run's own settings")
        state = torch.load(path, weights_only=False)  # written by this class (pending trees are dataclasses)
        self.running.total, self.running.count = state["running"]
        self.generated_total, self._pending = state["generated_total"], state["pending"]
        step = int(Path(checkpoint).name.rsplit("-", 1)[1])
        table = Path(self.args.output_dir) / BRANCH_FILE
        if table.is_file():
            kept = pd.read_csv(table)
            kept = kept[kept["step"] <= step]
            self.branch_log = kept.to_dict("records")
            if self.accelerator.is_main_process:
                kept.to_csv(table, index=False)
