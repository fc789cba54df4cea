"""`mallowspo train`: fine-tune a causal LM with MallowsPO.

    mallowspo train                                  # the built-in default (MallowsPO on the built-in world)
    mallowspo train --config recipe.yaml [--key value ...]
    mallowspo train --config recipe.yaml --accelerate_config zero3 [--num_processes 8]

Settings come from, in increasing priority: the built-in default (without --config) or
the recipe YAML, then ``--key value`` pairs. Keys are the fields of ``ModelArguments``,
``ScriptArguments`` and ``MallowsPOConfig`` (all of ``TrainingArguments``); see
``mallowspo train --show_fields``. ``--accelerate_config NAME_OR_PATH`` re-launches the
same command through ``accelerate launch --config_file`` (names: ddp, fsdp, zero3).

Before anything is loaded, the run checks what it can cheaply (settings, the output
directory, the checkpoint to resume from, the model path, the data file); a problem there,
or in the data rows, is a one-line ``error: ...`` with exit code 2 (see ``mallowspo.cli``).
``--resume_from_checkpoint last`` resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from dataclasses import asdict
from importlib.resources import files
from pathlib import Path

import torch
import yaml

from mallowspo.cli.errors import UserError, user_errors
from mallowspo.cli.fields_help import fields_help
from mallowspo.cli.run_config import argument_parser, parse_run_config, setup_logging
from mallowspo.training.checkpoints import is_complete_checkpoint, resolve_checkpoint
from mallowspo.training.config import accelerator_available
from mallowspo.training.data.binarize import prepare_training_data
from mallowspo.training.loading import check_model_source, check_tokenizer_fits, load_causal_lm, load_tokenizer
from mallowspo.training.outputs import check_output_dir
from mallowspo.training.trainer import MallowsPOTrainer

ACCEPTS_OVERRIDES = True

ACCELERATE_CONFIG_NAMES = ("ddp", "fsdp", "zero3")

logger = logging.getLogger("mallowspo.train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (parser.description or "") + ". Any config field can be given as --key value."
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = fields_help()
    parser.add_argument("--config", help="recipe YAML file; without it, the built-in default run")
    parser.add_argument(
        "--accelerate_config",
        help=f"re-launch through `accelerate launch` with this config: one of {ACCELERATE_CONFIG_NAMES} or a path",
    )
    parser.add_argument("--num_processes", type=int, help="with --accelerate_config: the number of processes")
    parser.add_argument(
        "--show_fields", action="store_true", help="list every --key in transformers' argparse form and exit"
    )


# ---------------------------------------------------------------------------------------
# Launching through accelerate
# ---------------------------------------------------------------------------------------


def resolve_accelerate_config(name_or_path: str) -> Path:
    """A shipped config (ddp, fsdp, zero3) or an existing file."""
    if name_or_path in ACCELERATE_CONFIG_NAMES:
        return Path(str(files("mallowspo.cli") / "accelerate_configs" / f"{name_or_path}.yaml"))
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"accelerate config {name_or_path!r}: not one of {ACCELERATE_CONFIG_NAMES} nor a file")
    return path


# Distributed modes whose accelerate plugin needs GPUs (or another accelerator).
ACCELERATOR_ONLY_MODES = ("FSDP", "DEEPSPEED")


def check_launchable(config: Path) -> None:
    """Raise ValueError before launching a mode that cannot run on this machine: accelerate's FSDP
    and DeepSpeed plugins refuse a machine without GPUs (each process would fail in its setup)."""
    mode = str((yaml.safe_load(config.read_text()) or {}).get("distributed_type", "")).upper()
    if mode in ACCELERATOR_ONLY_MODES and not accelerator_available():
        raise ValueError(
            f"accelerate config {config.name} uses {mode}, which needs GPUs, and this machine has none; for data "
            "parallelism on CPU use --accelerate_config ddp (gloo), or launch on a GPU machine"
        )


def accelerate_command(args: argparse.Namespace) -> list[str]:
    """`accelerate launch --config_file F [--num_processes N] -m mallowspo.cli train ...` (same interpreter)."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(resolve_accelerate_config(args.accelerate_config)),
    ]
    if args.num_processes:
        command += ["--num_processes", str(args.num_processes)]
    command += ["-m", "mallowspo.cli", "train"]
    if args.config:
        command += ["--config", args.config]
    return command + list(args.overrides)


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def resume_argument(value: str | None) -> str | bool | None:
    """``--resume_from_checkpoint``: a checkpoint path, or true/last for the newest one in output_dir."""
    if value is None:
        return None
    return True if str(value).lower() in ("true", "last") else value


def build_trainer(model_args, script_args, training_args):
    """Check, load and validate everything a run needs, cheapest first, so that a typo fails
    in seconds: the output directory, the checkpoint to resume from, the model path, the
    data file, the tokenizer and the data rows; then the model and the trainer (reference pass).

    Returns the trainer and the checkpoint directory to resume from (or None).
    """
    if training_args.should_save:
        check_output_dir(training_args.output_dir)  # free space is checked by the trainer, once the model is known
    checkpoint = resume_argument(training_args.resume_from_checkpoint)
    if checkpoint is not None:
        checkpoint = resolve_checkpoint(checkpoint, training_args.output_dir)
    check_model_source(model_args.model_name_or_path)
    train_dataset, eval_dataset = script_args.load_splits(training_args.seed)
    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.trust_remote_code)
    # Validate and tokenize the rows (pairs or lists) before the model loads (the trainer takes tokenized data as is).
    settings, reports = (training_args.to_data_config(), training_args.to_list_config()), {}
    train_dataset, reports["train"] = prepare_training_data(train_dataset, tokenizer, *settings, "train")
    if eval_dataset is not None:
        eval_dataset, reports["eval"] = prepare_training_data(eval_dataset, tokenizer, *settings, "eval")
    reports = {name: report for name, report in reports.items() if report is not None}  # None: tokenized data
    model = load_causal_lm(
        model_args.model_name_or_path,
        model_args.dtype,
        model_args.trust_remote_code,
        model_args.attn_implementation,
        **model_args.init_kwargs(training_args.model_init_kwargs),
    )
    check_tokenizer_fits(model, tokenizer, model_args.model_name_or_path)
    trainer = MallowsPOTrainer(
        model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=model_args.peft_config(),
        run_metadata={"model": asdict(model_args), "data": asdict(script_args)},
        validation_reports=reports,
    )
    if script_args.ignore_bias_buffers:  # TRL's: DDP would fail on boolean buffers it cannot broadcast
        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    trainer.check_run_owner(checkpoint)  # another run's results or checkpoint: refused before training
    return trainer, checkpoint


def fit(trainer, checkpoint: str | None = None):
    """Train (resuming from ``checkpoint``), evaluate when there is eval data, save. Returns the trainer."""
    training_args = trainer.args
    trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.eval_dataset is not None and not evaluated_at_last_step(trainer):
        trainer.evaluate()
    trainer.save_model()
    if training_args.should_save:
        logger.info("saved the model, config, model card and dispersion.jsonl to %s", training_args.output_dir)
        logger.info("last logged metrics: %s", format_metrics(trainer.last_logged_metrics()))
    return trainer


def evaluated_at_last_step(trainer) -> bool:
    """Whether the Trainer's own schedule already evaluated at the final step (then fit() does not again)."""
    step = trainer.state.global_step
    return any("eval_loss" in entry and entry.get("step") == step for entry in trainer.state.log_history)


def train(model_args, script_args, training_args):
    """Load model, tokenizer and data; train; save. Returns the trainer."""
    return fit(*build_trainer(model_args, script_args, training_args))


SUMMARY_METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/kendall_tau",
    "eval_loss",
    "eval_rewards/accuracies",
    "eval_rewards/kendall_tau",
    "mallows/neg_log_phi_mean",
    "mallows/neg_log_phi_min",
    "mallows/neg_log_phi_max",
    "train_runtime",
)


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in SUMMARY_METRICS if k in metrics)


def run(args: argparse.Namespace) -> int:
    if args.show_fields:
        argument_parser().print_help()
        return 0
    if args.accelerate_config:
        with user_errors():
            check_launchable(resolve_accelerate_config(args.accelerate_config))
        return subprocess.call(accelerate_command(args))
    if args.num_processes:
        raise UserError("--num_processes goes with --accelerate_config (or use `accelerate launch` directly)")
    training_args = None
    try:
        with user_errors():  # settings, paths, data: the user's; errors in training keep their traceback
            model_args, script_args, training_args = parse_run_config(args.config, args.overrides)
            setup_logging(training_args.should_log)
            trainer, checkpoint = build_trainer(model_args, script_args, training_args)
        fit(trainer, checkpoint)
    except KeyboardInterrupt as interrupt:
        interrupt.hint = resume_hint(training_args.output_dir if training_args is not None else None)
        raise
    return 0


def resume_hint(output_dir: str | None) -> str:
    """What a user can do after stopping a run: resume from a complete checkpoint, or start over."""
    if output_dir is not None and any(is_complete_checkpoint(p) for p in Path(output_dir).glob("checkpoint-*")):
        return "a training run resumes from its last checkpoint: --resume_from_checkpoint last"
    return "no checkpoint was saved yet: run the command again to start over"
