"""Configuration of a MallowsPO run.

- ``MallowsPOConfig``: the trainer's arguments, a ``transformers.TrainingArguments``
  subclass. Fields that mean the same as in TRL's ``DPOConfig`` carry TRL's names
  (``beta``, ``loss_type``, ``label_smoothing``, ``max_length``,
  ``precompute_ref_log_probs``, ``precompute_ref_batch_size``, ``disable_dropout``).
- ``ModelArguments`` and ``ScriptArguments``: the command line's model and data
  selection, like TRL's ``ModelConfig`` and ``ScriptArguments``.

All three are plain dataclasses that ``transformers.HfArgumentParser`` reads from YAML
and ``--key value`` pairs; each validates itself in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainingArguments

from mallowspo.dispersion import DEFAULT_CLAMP, DISPERSION_SOURCES, DispersionSource
from mallowspo.losses import LOSS_TYPES, MALLOWS_VARIANTS, check_loss_options, is_reference_free
from mallowspo.training.data import PreferenceDataConfig

logger = logging.getLogger(__name__)


def number_or_keyword(value: float | str, keyword: str, name: str) -> float | str:
    """``value`` as a float, or ``keyword`` itself; the command line passes numbers as strings."""
    if isinstance(value, str):
        if value == keyword:
            return keyword
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number or {keyword!r}, got {value!r}") from None
    return float(value)


@dataclass
class MallowsPOConfig(TrainingArguments):
    r"""Arguments of ``MallowsPOTrainer``: ``TrainingArguments`` plus the MallowsPO fields.

    Objective (``mallowspo.losses``): ``loss_type`` is the base method (``sigmoid`` = DPO,
    ``robust``, ``ipo``, ``hinge``, ``simpo``); ``mallows`` adds the per-prompt dispersion
    -log phi(x): ``none`` (the base method), ``theta`` (beta -> beta * -log phi(x), eq. 8,
    Prop. 4) or ``phi`` (the Kendall link g_phi, eq. 9, with ``phi_smoothing``).

    Dispersion -log phi(x) per example (``dispersion_source``):
      ``entropy``  -phi* log Hbar(x) from the reference model's entropy (eqs. 10-11), with
                   phi* from ``dispersion_normalization`` ("mean": dataset mean 1, or a fixed
                   number such as the authors' 0.29), bounded by ``dispersion_clamp``;
      ``constant`` ``dispersion_constant`` for every example (1.0 with ``theta`` is DPO);
      ``column``   the values of the dataset column ``dispersion_column``, used as given.
    """

    # ---- defaults changed from TrainingArguments (as TRL's DPOConfig does) ----
    learning_rate: float = field(default=1e-6, metadata={"help": "Initial learning rate (TRL's DPO default)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})
    remove_unused_columns: bool = field(
        default=False,
        metadata={
            "help": "Keep the dataset columns the trainer needs (reference log-probs, dispersion); leave False."
        },
    )

    # ---- objective ----
    beta: float = field(default=0.1, metadata={"help": "Inverse KL strength beta (> 0)."})
    loss_type: str = field(
        default="sigmoid", metadata={"help": f"Base objective, one of {LOSS_TYPES} (sigmoid = DPO)."}
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Label smoothing eps of cDPO (sigmoid, simpo) and robust DPO, in [0, 0.5)."}
    )
    mallows: str = field(
        default="phi",
        metadata={
            "help": f"Mallows variant, one of {MALLOWS_VARIANTS}: none (base method), theta (eq. 8), phi (eq. 9)."
        },
    )
    phi_smoothing: str = field(
        default="cubic",
        metadata={"help": "Smoothing of the phi link near 0: cubic (C1 patch), sigmoid, or none (exact eq. 9)."},
    )
    smoothing_eps: str = field(
        default="0.1",
        metadata={
            "help": "Half-width of the cubic patch: a number (default 0.1, the paper's) or 'adaptive' (= -2 log phi(x))."
        },
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target margin gamma (reward units)."})
    length_normalize: bool | None = field(
        default=None,
        metadata={"help": "Divide log-ratios by completion length; default: true for simpo, false otherwise."},
    )

    # ---- dispersion ----
    dispersion_source: str = field(
        default="entropy", metadata={"help": f"Where -log phi(x) comes from, one of {DISPERSION_SOURCES}."}
    )
    dispersion_normalization: str = field(
        default="mean",
        metadata={"help": "phi* of the entropy estimate: 'mean' (train-set mean of -log phi is 1) or a fixed number."},
    )
    dispersion_clamp: list[float] | None = field(
        default_factory=lambda: list(DEFAULT_CLAMP),
        metadata={"help": "Bounds (min max) on the entropy estimate of -log phi(x); null for none."},
    )
    dispersion_constant: float = field(
        default=1.0, metadata={"help": "-log phi(x) for every example when dispersion_source='constant' (> 0)."}
    )
    dispersion_column: str | None = field(
        default=None, metadata={"help": "Dataset column holding -log phi(x) when dispersion_source='column'."}
    )

    # ---- reference pass ----
    precompute_ref_log_probs: bool = field(
        default=True,
        metadata={
            "help": "Compute the reference log-probs once, in the reference pass (which runs anyway for the "
            "entropy), instead of at every step; then no reference copy stays in memory during training."
        },
    )
    precompute_ref_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size of the reference pass; default: the per-device batch size."}
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout in the policy and reference."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace the results of an earlier run in output_dir (the directory is cleared first); without "
            "it, such a directory is refused unless the same run resumes (--resume_from_checkpoint last)."
        },
    )

    # ---- data (built into a mallowspo.training.data.PreferenceDataConfig, which validates them) ----
    max_length: int | None = field(
        default=1024, metadata={"help": "Maximum prompt + completion tokens; null for no limit."}
    )
    max_prompt_length: int | None = field(
        default=512,
        metadata={
            "help": "Prompt budget in tokens; a longer prompt is never truncated silently: it is an error "
            "(strict_validation) or a counted skip. null for no limit."
        },
    )
    max_completion_length: int | None = field(
        default=None, metadata={"help": "Maximum completion tokens; null for no limit beyond max_length."}
    )
    strict_validation: bool = field(
        default=True,
        metadata={"help": "Fail on invalid preference rows (true) or drop them with a report (false)."},
    )

    def __post_init__(self) -> None:
        self.smoothing_eps = number_or_keyword(self.smoothing_eps, "adaptive", "smoothing_eps")
        self.dispersion_normalization = number_or_keyword(
            self.dispersion_normalization, "mean", "dispersion_normalization"
        )
        if self.dispersion_clamp is not None:
            if not isinstance(self.dispersion_clamp, (list, tuple)):
                raise ValueError(
                    f"dispersion_clamp needs two numbers (min max) or null, got {self.dispersion_clamp!r}"
                )
            self.dispersion_clamp = [float(v) for v in self.dispersion_clamp]
        self._validate()
        if launched_without_accelerators() and not self.use_cpu:
            # Without this, TrainingArguments sets up no process group on a CPU-only machine, and
            # each launched process trains a full copy on all the data (and all write one output_dir).
            logger.info("several processes and no accelerator: data parallelism on CPU (gloo); use_cpu=True")
            self.use_cpu = True
        super().__post_init__()

    def _validate(self) -> None:
        """Each group of options has one validator: the losses', the dispersion's, the data's and the
        optimisation's (``check_optimisation``)."""
        check_optimisation(self)
        if not math.isfinite(self.simpo_gamma):
            raise ValueError(f"simpo_gamma must be a finite number, got {self.simpo_gamma}")
        check_loss_options(
            self.loss_type, self.mallows, self.beta, self.label_smoothing, self.phi_smoothing, self.smoothing_eps
        )
        self.dispersion_settings()
        if (self.dispersion_source == "column") != (self.dispersion_column is not None):
            raise ValueError(
                "dispersion_column and dispersion_source='column' go together: set both to read -log phi(x) "
                f"from a dataset column (got dispersion_source={self.dispersion_source!r}, "
                f"dispersion_column={self.dispersion_column!r})"
            )
        self.to_data_config()
        if (
            self.max_length is not None
            and self.max_prompt_length is not None
            and self.max_length <= self.max_prompt_length
        ):
            raise ValueError(
                f"max_length ({self.max_length}) must exceed max_prompt_length ({self.max_prompt_length}) "
                "to leave room for the completion"
            )
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1:
            raise ValueError(f"precompute_ref_batch_size must be >= 1 or null, got {self.precompute_ref_batch_size}")
        for warning in ignored_settings(self):
            logger.warning(warning)

    # ---- derived settings ----
    @property
    def reference_free(self) -> bool:
        """Whether the objective uses no reference log-probs (SimPO)."""
        return is_reference_free(self.loss_type)

    @property
    def needs_entropy(self) -> bool:
        """Whether the dispersion is estimated from the reference entropy (so the reference pass must run)."""
        return self.mallows != "none" and self.dispersion_source == "entropy"

    @property
    def runs_reference_pass(self) -> bool:
        """Whether a reference pass runs before training: for the entropy, or to precompute log-probs.

        With ``mallows='none'`` and no precompute (or SimPO without Mallows), nothing is precomputed.
        """
        precompute_logps = self.precompute_ref_log_probs and not self.reference_free
        return self.needs_entropy or precompute_logps

    def dispersion_settings(self) -> DispersionSource:
        """The ``mallowspo.dispersion.DispersionSource`` these arguments describe."""
        return DispersionSource(
            source=self.dispersion_source,
            normalization=self.dispersion_normalization,
            clamp=tuple(self.dispersion_clamp) if self.dispersion_clamp is not None else None,
            constant=self.dispersion_constant,
        )

    def to_data_config(self) -> PreferenceDataConfig:
        """The ``mallowspo.training.data.PreferenceDataConfig`` these arguments describe."""
        return PreferenceDataConfig(
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
            max_completion_length=self.max_completion_length,
            strict=self.strict_validation,
            dispersion_column=self.dispersion_column,
        )


def accelerator_available() -> bool:
    """Whether this machine has a CUDA GPU or an Intel XPU."""
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or (xpu is not None and xpu.is_available())


def launched_without_accelerators() -> bool:
    """Whether this process is one of several (``WORLD_SIZE`` > 1, set by ``accelerate launch`` /
    torchrun) on a machine with no GPU or other accelerator."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not accelerator_available()


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


def ignored_settings(args: MallowsPOConfig) -> list[str]:
    """One warning per setting that differs from its default but that the chosen mode ignores."""
    defaults = {
        f.name: (f.default if f.default_factory is dataclasses.MISSING else f.default_factory())
        for f in dataclasses.fields(MallowsPOConfig)
        if f.name in _MODE_SETTINGS
    }
    changed = [name for name in _MODE_SETTINGS if _normalized(getattr(args, name)) != _normalized(defaults[name])]
    warnings = []
    for name in changed:
        reason = _ignored_because(args, name)
        if reason is not None:
            warnings.append(f"{name}={getattr(args, name)!r} is ignored: {reason}")
    return warnings


# Settings that only some modes read, and the setting that decides.
_MODE_SETTINGS = (
    "phi_smoothing",
    "smoothing_eps",
    "simpo_gamma",
    "dispersion_source",
    "dispersion_normalization",
    "dispersion_clamp",
    "dispersion_constant",
    "dispersion_column",
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


def _ignored_because(args: MallowsPOConfig, name: str) -> str | None:
    """Why the mode of ``args`` ignores setting ``name`` (None when it is used)."""
    if name.startswith("dispersion_"):
        if args.mallows == "none":
            return "mallows='none' uses no dispersion"
        if name in ("dispersion_normalization", "dispersion_clamp") and args.dispersion_source != "entropy":
            return f"it applies to the entropy estimate, and dispersion_source={args.dispersion_source!r}"
        if name == "dispersion_constant" and args.dispersion_source != "constant":
            return f"it applies to dispersion_source='constant', not {args.dispersion_source!r}"
        return None
    if name in ("phi_smoothing", "smoothing_eps") and args.mallows != "phi":
        return f"it smooths the phi link, and mallows={args.mallows!r}"
    if name == "smoothing_eps" and args.phi_smoothing != "cubic":
        return f"it is the half-width of the cubic patch, and phi_smoothing={args.phi_smoothing!r}"
    if name == "simpo_gamma" and args.loss_type != "simpo":
        return f"it is SimPO's margin, and loss_type={args.loss_type!r}"
    return None


@dataclass
class ModelArguments:
    """Which model to load and how (the command line's model section, like TRL's ``ModelConfig``)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local directory or Hugging Face hub id of a causal LM."}
    )
    dtype: str = field(
        default="auto", metadata={"help": "Weights dtype: auto, float32, bfloat16 or float16 (alias: torch_dtype)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, eager, flash_attention_2."})
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt (e.g. q_proj v_proj, or all-linear); default: peft's."}
    )

    def __post_init__(self) -> None:
        if not self.model_name_or_path:
            raise ValueError(
                "model_name_or_path is required: pass --model_name_or_path PATH_OR_HUB_ID or set it in the recipe"
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        lora_changed = (self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_target_modules) != (
            16,
            32,
            0.05,
            None,
        )
        if lora_changed and not self.use_peft:
            logger.warning("LoRA options are set but use_peft is false: training all weights, LoRA options ignored")
        if self.use_peft and importlib.util.find_spec("peft") is None:
            raise ValueError("use_peft needs the peft package: pip install 'mallowspo[peft]'")
        if self.use_peft and not (self.lora_r > 0 and self.lora_alpha > 0 and 0 <= self.lora_dropout < 1):
            raise ValueError("LoRA needs lora_r > 0, lora_alpha > 0 and 0 <= lora_dropout < 1")

    def peft_config(self):
        """A ``peft.LoraConfig`` for a causal LM, or None without ``use_peft``."""
        if not self.use_peft:
            return None
        from peft import LoraConfig

        return LoraConfig(
            task_type="CAUSAL_LM",
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.lora_target_modules,
        )


@dataclass
class ScriptArguments:
    """Which data to train on (the command line's data section, like TRL's ``ScriptArguments``)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Preference data: a local JSON/JSONL/Parquet file or directory, or a hub id (alias: dataset_path)."
        },
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(
        default=None,
        metadata={
            "help": "Split to evaluate on: of dataset_name (a directory or hub id; a single file has only 'train'), "
            "or of eval_dataset_name (default there: 'test'); none by default."
        },
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Separate evaluation data: a file (its one split), a directory or a hub id; none by default."
        },
    )

    def __post_init__(self) -> None:
        if not self.dataset_name:
            raise ValueError("dataset_name is required: pass --dataset_name PATH_OR_HUB_ID or set it in the recipe")

    @property
    def evaluates(self) -> bool:
        """Whether the run has evaluation data."""
        return self.eval_dataset_name is not None or self.dataset_test_split is not None

    def eval_source(self) -> tuple[str, str]:
        """(source, split) of the evaluation data: eval_dataset_name, else dataset_name's dataset_test_split."""
        if self.eval_dataset_name is None:
            return self.dataset_name, self.dataset_test_split
        if Path(self.eval_dataset_name).expanduser().is_file():
            return self.eval_dataset_name, "train"  # a file's one split
        return self.eval_dataset_name, self.dataset_test_split or "test"
