"""`internal-policy train`: BuPO, plain GRPO or the Table 11 baselines on TRL, optionally with AttnRL branching.

The options are generated from the dataclasses by transformers' `HfArgumentParser` (TRL's
`TrlParser`): every `AttnRLConfig` field (AttnRL's branching options, `BuPOConfig`'s, TRL's
`GRPOConfig` and `TrainingArguments` included
(`--learning-rate`, `--per-device-train-batch-size`, `--report-to`, `--save-steps` ...), plus
`TrainOptions` below and the shared --model/--dtype/--device (`options`). `--config run.yaml` sets any
of them from a YAML mapping and `--preset official` the official run's values (`official_preset`);
precedence: command line > config file > preset > defaults. The parser is built inside the handler
so that other subcommands never import TRL.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields

from ..inputs import BENCHMARKS
from .options import add_model_options

PRESETS = ("none", "official")
REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
"""--report-to integrations this command checks for (name → the package to install)."""

DESCRIPTION = """Train with BuPO (π^k for --internal-steps rollout batches, or a bottom-up
--internal-schedule, then π_θ), plain GRPO, or GRPO with layers <= k frozen / 0.1x lr above k
(--method); --branching attn|random|entropy adds AttnRL's branching rollouts and TreeRL advantages
to any method. Every AttnRLConfig / BuPOConfig / GRPOConfig / TrainingArguments field is an option;
--config run.yaml sets any of them, --preset official the official BuPO run's values."""

LAUNCH = """Step units: --internal-steps and --internal-schedule count rollout batches (the official
iterative_steps); --max-steps, --save-steps, --eval-steps, --logging-steps count optimizer steps.
--per-device-train-batch-size is per device: the official mini-batch (32 prompts x 8 = 256
completions) is global; --preset official splits it over the launched processes.

Several GPUs (DDP; FSDP / DeepSpeed through an accelerate config file):
  accelerate launch --num_processes 8 -m internal_policy.cli train --preset official \\
      --model Qwen/Qwen3-4B --data deepmath-5k.parquet --internal-layer 6 --reward math-official \\
      --eval-data math500 amc2023 aime_2024 aime_2025 --out runs/bupo-qwen3-4b
Continue after an interruption: the same command with --resume."""


@dataclass
class TrainOptions:
    """`train` settings outside the trainer config: inputs, reward, outputs, resume."""

    data: str = field(metadata={"help": f"training prompts: {', '.join(BENCHMARKS)}, or a .parquet/.jsonl prompt set "
                                        "(prompt + answer, or the official prompt + reward_model.ground_truth)"})
    out: str = field(metadata={"help": "output folder: checkpoint-N/, model/, train.json, phase_log.jsonl, "
                                       "tracking.parquet, validation.csv, figures"})
    reward: str = field(default="math", metadata={"help": "math (math-verify) | math-official (the official "
                                                          "code's check) | word:W1,W2 | length:LOW-HIGH"})
    probe: str | None = field(default=None, metadata={
        "help": "JSONL of held-out {'text'} or {'prompt','response'} records: entropy tracking at k, and the "
                "profile behind --internal-layer auto"})
    profile_run: str | None = field(default=None, metadata={
        "help": "profile folder for --internal-layer auto (default: profile the probe set)"})
    eval_data: list[str] | None = field(default=None, metadata={
        "help": "validation sets (benchmark names or prompt files with answers), sampled --eval-n times per "
                "problem every --eval-steps optimizer steps (and first with --eval-on-start)"})
    resume: bool = field(default=False, metadata={
        "help": "continue the run in --out from its latest checkpoint (refused if a setting that changes the "
                "numbers differs)"})


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train` to the subcommands (its options are parsed by `parse`, from the config fields)."""
    p = sub.add_parser("train", help="BuPO / GRPO training on TRL (train --help lists every option)",
                       add_help=False)  # the handler parses its arguments, with every config field
    p.set_defaults(handler=run, takes_extra=True)


def build_parser():
    """The full `train` parser: TrainOptions + AttnRLConfig fields, --model/--dtype/--device, --config, --preset."""
    from trl import TrlParser

    from ..attnrl.config import AttnRLConfig

    parser = TrlParser([TrainOptions, AttnRLConfig], prog="internal-policy train", formatter_class=_Formatter,
                       epilog=LAUNCH, description=DESCRIPTION)
    add_model_options(parser, dtype_help="bfloat16 on a GPU that supports it (weights and autocast), float32 on CPU")
    parser.add_argument("--config", default=None, help="YAML mapping of any of these options (field names)")
    parser.add_argument("--preset", choices=PRESETS, default="none",
                        help="official: the official run's batch/schedule/optimizer values (BuPOConfig "
                             "official_preset), split over the launched processes")
    return parser


def _yaml(path: str) -> dict:
    import yaml

    from ..errors import InputError

    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
    except OSError as err:
        raise InputError(f"--config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise InputError(f"--config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise InputError(f"--config {path} must hold a YAML mapping of option names to values")
    return values


def parse(argv: list[str]):
    """(TrainOptions, AttnRLConfig, namespace) from command-line arguments, config file and preset."""
    import torch

    from ..attnrl.config import AttnRLConfig
    from ..bupo.config import official_preset
    from ..errors import InputError
    from ..models import resolve_device
    from .options import auto_dtype

    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--preset", choices=PRESETS)
    first, _ = pre.parse_known_args(argv)
    file_values = _yaml(first.config) if first.config else {}
    preset = first.preset or file_values.pop("preset", "none")
    if preset == "official":
        parser.set_defaults_with_config(**official_preset(int(os.environ.get("WORLD_SIZE", "1"))))
    unknown = parser.set_defaults_with_config(**file_values)
    if unknown:
        raise InputError(f"--config {first.config}: unknown option(s) {', '.join(unknown[::2])}; use field names as "
                         "in `train --help` (underscores)")
    ns = parser.parse_args(argv)
    options = TrainOptions(**{f.name: getattr(ns, f.name) for f in fields(TrainOptions)})
    values = {f.name: getattr(ns, f.name) for f in fields(AttnRLConfig) if f.init}
    if values["output_dir"] not in (None, "trainer_output", options.out):
        raise InputError("give the output folder with --out only (not --output-dir)")
    values["output_dir"] = options.out
    ns.device = resolve_device(ns.device)  # a device this machine lacks is a one-line error
    ns.dtype = auto_dtype(ns.dtype, ns.device)
    if ns.device == "cpu" or not torch.cuda.is_available():
        values["use_cpu"] = True
    if values["bf16"] is None and not values["fp16"]:
        values["bf16"] = ns.dtype in ("bfloat16", "bf16")
    if not options.eval_data:
        values.update(eval_strategy="no", eval_on_start=False)
    elif values["eval_steps"]:
        values["eval_strategy"] = "steps"
    elif not values["eval_on_start"]:
        raise InputError("--eval-data needs --eval-steps N (validate every N optimizer steps) or --eval-on-start")
    _check_reporters(values["report_to"])
    try:
        config = AttnRLConfig(**values)
    except (ValueError, TypeError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(str(err).splitlines()[0]) from None
    return options, config, ns


def _check_reporters(report_to) -> None:
    """Refuse a --report-to integration that is not installed; wandb logs offline unless it has credentials."""
    from importlib.util import find_spec

    from ..errors import InputError

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        package = REPORTERS.get(name)
        if package == "tensorboard" and not (find_spec("tensorboard") or find_spec("tensorboardX")):
            raise InputError("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
        if package in ("wandb", "trackio") and not find_spec(package):
            raise InputError(f"--report-to {name} needs the {package} package: pip install {package}")
    if "wandb" in names and not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"  # never prompt for a login inside a job; `wandb sync` uploads later
        print("wandb: no WANDB_API_KEY / WANDB_MODE set, logging offline (upload later with `wandb sync`)")


def run(args: argparse.Namespace) -> int:
    """Train with the parsed options, then write the phase log, tracking table and figures."""
    import logging
    import warnings
    from pathlib import Path

    from transformers.utils import logging as hf_logging

    from ..bupo.data import load_prompts
    from ..bupo.plots import fig5_figure, fig7_figure
    from ..bupo.rewards import reward_by_name
    from ..bupo.run import train
    from ..inputs import read_jsonl
    from ..models import load_model
    from ..plot import save_figure

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, nothing a user can act on
    hf_logging.disable_progress_bar()
    options, config, ns = parse(args.extra)
    reward = reward_by_name(options.reward)
    prompts = load_prompts(options.data)
    eval_sets = {Path(str(d)).stem: load_prompts(d) for d in options.eval_data or ()}
    probe = read_jsonl(options.probe) if options.probe else None
    if config.process_index == 0:
        logging.basicConfig(format="%(message)s")
        logging.getLogger("internal_policy").setLevel(logging.INFO)
    model, tokenizer = load_model(ns.model, dtype=ns.dtype, device=None)
    settings = {"model": ns.model or "stories260K", "dtype": ns.dtype, "reward_spec": options.reward}
    result = train(model, tokenizer, prompts, reward, config, probe=probe, profile_run=options.profile_run,
                   eval_sets=eval_sets or None, resume=options.resume, settings=settings)
    if config.process_index != 0:
        return 0
    out = Path(options.out)
    print(f"method={config.method} internal_layer={result.internal_layer} -> {out}")
    if result.tracking is not None:
        tracking, spans = result.tracking, result.trainer.spans
        paths = save_figure(fig7_figure(tracking.assign(method=config.method), spans), out, "fig7_actor_entropy")
        for k in sorted(set(tracking.loc[tracking["k"] > 0, "k"])):
            paths += save_figure(fig5_figure(tracking, k, spans), out, f"fig5_layer{k}")
        print(f"tracking: {out / 'tracking.parquet'}; figures: {', '.join(p.name for p in paths)}")
    return 0
