"""Resuming: which checkpoint directory is complete, which one to resume from, and which run an
output directory and its checkpoints belong to (``mallowspo_run.json``).

Pickles in a checkpoint: the Trainer's ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``
(and ``scaler.pt`` with fp16). transformers (5.23) loads each with ``torch.load(weights_only=True)``,
so a file holding more than tensors and plain data raises ``pickle.UnpicklingError`` instead of
running; the trainer turns that into ``CheckpointError(refused_pickle_message(...))``. See
docs/troubleshooting.md, "Which files in an output directory are pickles"."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
# The Trainer also pickles its arguments (torch.save) into every save; loading that file back
# needs full pickle, which can run code from an untrusted checkpoint, and nothing reads it on
# resume. It is removed: the settings are saved as YAML (CONFIG_FILE) instead.
TRAINING_ARGS_PICKLE = "training_args.bin"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from safely; the message names it and what to do."""


def refused_pickle_message(checkpoint: str | Path, error: BaseException) -> str:
    """Why resuming stopped when a checkpoint file held more than tensors (torch.load with
    weights_only=True refuses to run its pickled code)."""
    return (
        f"checkpoint {checkpoint} holds a file with pickled objects other than tensors and plain data "
        f"({type(error).__name__}), which mallowspo refuses to load: it can run code. If the checkpoint is not "
        "yours, it may have been tampered with; resume from another checkpoint, or start over"
    )


def is_complete_checkpoint(path: str | Path) -> bool:
    """Whether a checkpoint directory was fully written: the Trainer writes trainer_state.json
    last, so a run killed while saving leaves a directory without a readable one."""
    state = Path(path) / STATE_FILE
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return False
    return True


def resolve_checkpoint(checkpoint: str | bool, output_dir: str | Path) -> str:
    """The checkpoint directory to resume from.

    ``True``: the newest complete ``checkpoint-N`` in ``output_dir``; incomplete ones (left
    by a run killed while saving) are skipped with a warning. A path: checked to be a
    complete checkpoint. Raises FileNotFoundError or ValueError naming what is wrong.
    """
    if checkpoint is True:
        root = Path(output_dir)
        numbered = [p for p in root.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
        skipped = []
        for path in sorted(numbered, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
            if is_complete_checkpoint(path):
                if skipped:
                    logger.warning(
                        "skipping incomplete checkpoints (a run stopped while saving them): %s",
                        ", ".join(str(p) for p in skipped),
                    )
                return str(path)
            skipped.append(path)
        found = f" ({len(skipped)} incomplete: {', '.join(p.name for p in skipped)})" if skipped else ""
        raise FileNotFoundError(
            f"no complete checkpoint to resume from in {root}{found}; pass a checkpoint directory, or leave out "
            "--resume_from_checkpoint to start over"
        )
    path = Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint to resume from not found: there is no directory at {path}")
    if not is_complete_checkpoint(path):
        raise ValueError(
            f"{path} is not a complete checkpoint (no readable {STATE_FILE}): the run was probably stopped while "
            "saving it. Resume from an earlier checkpoint (--resume_from_checkpoint last skips incomplete ones)."
        )
    return str(path)


# ---------------------------------------------------------------------------------------
# Which run an output directory and its checkpoints belong to
# ---------------------------------------------------------------------------------------

RUN_FILE = "mallowspo_run.json"
# The settings that decide a run's trajectory: a checkpoint resumes only a run with the same
# ones (and the same model and train tokens). Logging, saving, evaluation and the step budget
# may change between a run and its resumption.
IDENTITY_KEYS = (
    "loss_type", "loss_weights", "ipo_form", "beta", "label_smoothing", "mallows", "phi_smoothing", "smoothing_eps",
    "simpo_gamma", "router_aux_loss_coef", "truncation_mode",
    "length_normalize", "dispersion_source", "dispersion_normalization", "dispersion_clamp", "dispersion_constant",
    "dispersion_column", "precompute_ref_log_probs", "max_length", "max_prompt_length", "max_completion_length",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay", "adam_beta1", "adam_beta2",
    "adam_epsilon", "max_grad_norm", "optim", "per_device_train_batch_size", "gradient_accumulation_steps", "seed",
    "bf16", "fp16",
)  # fmt: skip
# What a run leaves in its output directory (besides checkpoint-N directories).
RESULT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "mallowspo_config.yaml",
    "dispersion.jsonl", STATE_FILE,
)  # fmt: skip


def run_identity(settings: dict[str, Any], model: str, train_tokens: str) -> dict[str, Any]:
    """What makes a run this run: ``IDENTITY_KEYS`` of its settings, the model and the train tokens'
    hash, as JSON would store them (so that a stored identity compares equal)."""
    identity = {"model": model, "train_tokens": train_tokens, **{key: settings.get(key) for key in IDENTITY_KEYS}}
    return json.loads(json.dumps(identity, default=str))


def read_identity(directory: str | Path) -> dict[str, Any] | None:
    """The run identity stored in ``directory`` (an output directory or a checkpoint), or None."""
    try:
        return json.loads((Path(directory) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_identity(directory: str | Path, identity: dict[str, Any]) -> None:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / RUN_FILE).write_text(json.dumps(identity, indent=2, default=str))


def identity_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: stored -> current`` for each setting that differs."""
    keys = list(dict.fromkeys([*current, *stored]))
    return [f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in keys if stored.get(k) != current.get(k)]


def prior_results(output_dir: str | Path) -> list[str]:
    """The names of what an earlier run left in ``output_dir``: its files and checkpoints."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    names = [name for name in RESULT_FILES if (root / name).exists()]
    return names + sorted(p.name for p in root.glob("checkpoint-*") if p.is_dir())


def check_output_dir_owner(
    output_dir: str | Path, identity: dict[str, Any], *, resuming: bool, overwrite: bool
) -> bool:
    """Whether ``output_dir`` may take this run, without changing anything; True when it must be
    cleared first (``overwrite``). Raises ValueError when it holds another run's results (or this
    run's, and the run does not resume), naming the directory, what is there and the ways on."""
    results = prior_results(output_dir)
    if not results:
        return False
    if overwrite:
        return True
    stored = read_identity(output_dir)
    shown = ", ".join(results[:4]) + (f" and {len(results) - 4} more" if len(results) > 4 else "")
    if resuming:
        if stored is None:
            raise ValueError(
                f"output_dir {output_dir} holds {shown} but no {RUN_FILE}, so it cannot be checked to be this run's; "
                "start over with --overwrite_output_dir true, or choose another --output_dir"
            )
        differences = identity_differences(stored, identity)
        if differences:
            raise ValueError(
                f"output_dir {output_dir} holds another run (settings differ: {'; '.join(differences[:3])}), so its "
                "checkpoints cannot resume this one; resume with the same settings, start over with "
                "--overwrite_output_dir true, or choose another --output_dir"
            )
        return False
    raise ValueError(
        f"output_dir {output_dir} already holds a run's results ({shown}); resume it with --resume_from_checkpoint "
        "last, replace it with --overwrite_output_dir true (which clears the directory), or choose another --output_dir"
    )


def clear_output_dir(output_dir: str | Path) -> None:
    """Remove everything in ``output_dir`` (the directory stays)."""
    for entry in Path(output_dir).iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def check_checkpoint_owner(checkpoint: str | Path, identity: dict[str, Any]) -> None:
    """Raise ValueError unless ``checkpoint`` was saved by the run ``identity`` describes."""
    stored = read_identity(checkpoint)
    if stored is None:
        raise ValueError(
            f"checkpoint {checkpoint} has no {RUN_FILE}, so it cannot be checked to belong to this run; "
            "resume from a checkpoint this version of mallowspo saved, or start over"
        )
    differences = identity_differences(stored, identity)
    if differences:
        raise ValueError(
            f"checkpoint {checkpoint} belongs to another run (settings differ: {'; '.join(differences[:3])}); "
            "resume it with its own settings, or start over"
        )


def check_run_owner(
    output_dir: str | Path, identity: dict[str, Any], checkpoint: str | Path | None, overwrite: bool
) -> bool:
    """Both checks of a run about to train: the checkpoint it resumes from (if any) and its output_dir."""
    if checkpoint is not None:
        check_checkpoint_owner(checkpoint, identity)
    return check_output_dir_owner(output_dir, identity, resuming=checkpoint is not None, overwrite=overwrite)


def claim_output_dir(output_dir: str | Path, identity: dict[str, Any], clear: bool) -> None:
    """Clear ``output_dir`` of an earlier run's results when ``clear`` (overwrite_output_dir), then mark
    it as this run's."""
    if clear:
        logger.warning("overwrite_output_dir: clearing %s of an earlier run's results", output_dir)
        clear_output_dir(output_dir)
    write_identity(output_dir, identity)
