"""The checks of a ``MallowsPOConfig`` that look across its settings: optimisation settings that
would train nothing (``check_optimisation``), and settings the chosen mode ignores
(``ignored_settings``, one warning each)."""

from __future__ import annotations

import dataclasses
import math

from transformers import TrainingArguments

from mallowspo.dispersion import NORMALIZED_SOURCES


def check_optimisation(args: TrainingArguments) -> None:
    """Raise ValueError for optimisation settings that would train nothing, or crash deep in torch:
    a run must take at least one step with a positive, finite learning rate."""
    if not str(args.output_dir).strip():
        raise ValueError("output_dir is empty; give the directory the run writes to (--output_dir DIR)")
    if args.max_steps == 0 or args.max_steps < -1:
        raise ValueError(
            f"max_steps must be a positive number of steps, or -1 to train for num_train_epochs; got {args.max_steps}"
        )
    if args.max_steps == -1 and not (args.num_train_epochs > 0 and math.isfinite(args.num_train_epochs)):
        raise ValueError(
            f"num_train_epochs must be a finite number > 0 (or set max_steps), got {args.num_train_epochs}: "
            "the run would train nothing and save the base model as its result"
        )
    if not (args.learning_rate > 0 and math.isfinite(args.learning_rate)):
        raise ValueError(
            f"learning_rate must be a finite number > 0, got {args.learning_rate}: with 0 the run saves the base "
            "model as its result"
        )
    for name in ("gradient_accumulation_steps", "per_device_train_batch_size", "per_device_eval_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {args.warmup_steps}")


def ignored_settings(args: TrainingArguments) -> list[str]:
    """One warning per setting that differs from its default but that the chosen mode ignores."""
    defaults = {
        f.name: (f.default if f.default_factory is dataclasses.MISSING else f.default_factory())
        for f in dataclasses.fields(type(args))
        if f.name in _MODE_SETTINGS
    }
    changed = [name for name in _MODE_SETTINGS if _normalized(getattr(args, name)) != _normalized(defaults[name])]
    warnings = []
    for name in changed:
        reason = _ignored_because(args, name)
        if reason is not None:
            warnings.append(f"{name}={getattr(args, name)!r} is ignored: {reason}")
    return warnings


# The settings of the annotators dispersion source (its columns and consensus).
_ANNOTATOR_SETTINGS = (
    "dispersion_votes_column",
    "dispersion_chosen_votes_column",
    "dispersion_rejected_votes_column",
    "dispersion_strengths_column",
    "dispersion_rankings_column",
    "dispersion_consensus",
)
# Settings that only some modes read, and the setting that decides.
_MODE_SETTINGS = (
    "ipo_form",
    "label_smoothing",
    "phi_smoothing",
    "smoothing_eps",
    "simpo_gamma",
    "dispersion_source",
    "dispersion_normalization",
    "dispersion_clamp",
    "dispersion_constant",
    "dispersion_column",
    *_ANNOTATOR_SETTINGS,
)


def _normalized(value):
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return value


def _ignored_because(args: TrainingArguments, name: str) -> str | None:
    """Why the mode of ``args`` ignores setting ``name`` (None when it is used)."""
    if name.startswith("dispersion_"):
        if args.mallows == "none":
            return "mallows='none' uses no dispersion"
        if (
            name in ("dispersion_normalization", "dispersion_clamp")
            and args.dispersion_source not in NORMALIZED_SOURCES
        ):
            return (
                f"it applies to the entropy and annotator estimates, and dispersion_source={args.dispersion_source!r}"
            )
        if name == "dispersion_constant" and args.dispersion_source != "constant":
            return f"it applies to dispersion_source='constant', not {args.dispersion_source!r}"
        if name in _ANNOTATOR_SETTINGS and args.dispersion_source != "annotators":
            return f"it applies to dispersion_source='annotators', not {args.dispersion_source!r}"
        return None
    if name == "ipo_form" and not (args.mallows == "theta" and "ipo" in args.loss_type):
        return f"it is the form of MallowsIPO (ipo with mallows theta), and loss_type={args.loss_type!r}"
    if name == "label_smoothing" and not set(args.loss_type) & {"sigmoid", "robust", "simpo"}:
        return f"it smooths the likelihood losses (sigmoid, robust, simpo), and loss_type={args.loss_type!r}"
    if name in ("phi_smoothing", "smoothing_eps") and args.mallows != "phi":
        return f"it smooths the phi link, and mallows={args.mallows!r}"
    if name == "smoothing_eps" and args.phi_smoothing != "cubic":
        return f"it is the half-width of the cubic patch, and phi_smoothing={args.phi_smoothing!r}"
    if name == "simpo_gamma" and "simpo" not in args.loss_type:
        return f"it is SimPO's margin, and loss_type={args.loss_type!r}"
    return None
