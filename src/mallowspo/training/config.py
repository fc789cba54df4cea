"""Configuration of a MallowsPO run.

- ``MallowsPOConfig``: the trainer's arguments, a ``transformers.TrainingArguments``
  subclass. Fields that mean the same as in TRL's ``DPOConfig`` carry TRL's names
  (``beta``, ``loss_type``, ``label_smoothing``, ``max_length``,
  ``precompute_ref_log_probs``, ``precompute_ref_batch_size``, ``disable_dropout``).
  The rest of TRL's ``DPOConfig`` keys come from ``training.trl_keys``.

A plain dataclass that ``transformers.HfArgumentParser`` reads from YAML and ``--key value``
pairs; it validates itself in ``__post_init__``. The command line's model and data selection
are ``training.arguments``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments
from transformers.utils import is_torch_bf16_gpu_available

from mallowspo.dispersion import DEFAULT_CLAMP, DISPERSION_SOURCES, DispersionSource
from mallowspo.losses import IPO_FORMS, MALLOWS_VARIANTS, is_reference_free
from mallowspo.objective import OBJECTIVE_TERMS, check_objective, preference_terms
from mallowspo.training.config_checks import check_optimisation, ignored_settings
from mallowspo.training.data import PreferenceDataConfig
from mallowspo.training.list_config import ListwiseKeys, check_listwise_settings
from mallowspo.training.packing import check_padding_free_settings
from mallowspo.training.trl_keys import TRLDPOKeys, check_trl_keys, check_trl_loss_type

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
class MallowsPOConfig(ListwiseKeys, TRLDPOKeys, TrainingArguments):
    r"""Arguments of ``MallowsPOTrainer``: ``TrainingArguments`` plus the MallowsPO fields, and
    the rest of TRL's ``DPOConfig`` keys (``training.trl_keys``).

    Objective (``mallowspo.losses``, ``mallowspo.objective``): ``loss_type`` is the base method
    (``sigmoid`` = DPO, ``robust``, ``ipo``, ``hinge``, ``simpo``), or TRL's list of terms with
    ``loss_weights`` (``"sft"``: NLL on the chosen responses); ``mallows`` adds the per-prompt dispersion
    -log phi(x): ``none`` (the base method), ``theta`` (beta -> beta * -log phi(x), eq. 8,
    Prop. 4) or ``phi`` (the Kendall link g_phi, eq. 9, with ``phi_smoothing``). ``objective``
    (``training.list_config``) is pairwise, or plackett_luce / all_pairs over ranked lists of K responses.

    Dispersion -log phi(x) per example (``dispersion_source``):
      ``entropy``  -phi* log Hbar(x) from the reference model's entropy (eqs. 10-11), with
                   phi* from ``dispersion_normalization`` ("mean": dataset mean 1, or a fixed
                   number such as the authors' 0.29), bounded by ``dispersion_clamp``;
      ``annotators`` measured from the data's annotators (``mallowspo.annotator_columns``): the
                   posterior mean of -log phi(x) from the votes in ``dispersion_votes_column``, the
                   counts in ``dispersion_chosen_votes_column`` / ``dispersion_rejected_votes_column``,
                   the strengths in ``dispersion_strengths_column`` or the rankings in
                   ``dispersion_rankings_column``, or those of a known layout (``dispersion_format``),
                   counted as ``dispersion_consensus`` says; normalised and clamped as the entropy is;
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

    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision. Default (TRL's): on where the GPU supports it and fp16 is off; off on "
            "CPU (set it, with use_cpu, for bf16 on CPU)."
        },
    )

    # ---- objective ----
    beta: float = field(default=0.1, metadata={"help": "Inverse KL strength beta (> 0)."})
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={
            "help": f"Objective, one of {OBJECTIVE_TERMS[:-1]} (sigmoid = DPO), or a list of terms summed with "
            "loss_weights (TRL's), 'sft' included (NLL of the chosen responses)."
        },
    )
    loss_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per loss_type term (TRL's); default 1 each."}
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
        metadata={
            "help": "Divide log-ratios by completion length; default: true for simpo and ipo (TRL's IPO), false "
            "otherwise."
        },
    )
    ipo_form: str = field(
        default="scaled_margin",
        metadata={
            "help": f"MallowsIPO (ipo with mallows theta), one of {IPO_FORMS}: scaled_margin = the authors' "
            "(L(x) Delta - 1/(2 beta))^2; scaled_beta = (Delta - 1/(2 beta L(x)))^2."
        },
    )

    # ---- dispersion ----
    dispersion_source: str = field(
        default="entropy", metadata={"help": f"Where -log phi(x) comes from, one of {DISPERSION_SOURCES}."}
    )
    dispersion_normalization: str = field(
        default="mean",
        metadata={
            "help": "phi* of the entropy or annotator estimate: 'mean' (train-set mean of -log phi is 1) or a fixed "
            "number (1 keeps the annotators' measured -log phi)."
        },
    )
    dispersion_clamp: list[float] | None = field(
        default_factory=lambda: list(DEFAULT_CLAMP),
        metadata={"help": "Bounds (min max) on the entropy or annotator estimate of -log phi(x); null for none."},
    )
    dispersion_constant: float = field(
        default=1.0, metadata={"help": "-log phi(x) for every example when dispersion_source='constant' (> 0)."}
    )
    dispersion_column: str | None = field(
        default=None, metadata={"help": "Dataset column holding -log phi(x) when dispersion_source='column'."}
    )
    dispersion_votes_column: str | None = field(
        default=None,
        metadata={
            "help": "dispersion_source='annotators': column of per-annotator votes, a list per pair: 1 = prefers "
            "chosen, 0 = prefers rejected, null or 0.5 = a tie."
        },
    )
    dispersion_chosen_votes_column: str | None = field(
        default=None,
        metadata={"help": "dispersion_source='annotators': column counting the annotators who preferred chosen."},
    )
    dispersion_rejected_votes_column: str | None = field(
        default=None,
        metadata={"help": "dispersion_source='annotators': column counting the annotators who preferred rejected."},
    )
    dispersion_strengths_column: str | None = field(
        default=None,
        metadata={
            "help": "dispersion_source='annotators': column of per-annotator signed strengths, a list per pair "
            "(HelpSteer2-Preference's -3..3, MultiPref labels); only the sign is a vote."
        },
    )
    dispersion_rankings_column: str | None = field(
        default=None,
        metadata={
            "help": "dispersion_source='annotators': column of per-annotator rankings, an (M x K) list per prompt: "
            "[m][k] = the rank (0 = best) annotator m gives response k."
        },
    )
    dispersion_consensus: str = field(
        default="majority",
        metadata={
            "help": "What the votes are counted for: majority (the majority order; chosen was decided by these "
            "votes) or given (chosen, a label fixed without these votes: signed estimate)."
        },
    )
    dispersion_format: str | None = field(
        default=None,
        metadata={
            "help": "Raw layout of an annotated dataset, mapped to pairs plus a votes column: multipref "
            "(allenai/multipref) or helpsteer2 (nvidia/HelpSteer2's preference data); null for TRL's formats."
        },
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

    # ---- data (built into a mallowspo.training.data.PreferenceDataConfig, which validates them and
    # holds their one set of defaults) ----
    max_length: int | None = field(
        default=PreferenceDataConfig.max_length,
        metadata={
            "help": "Maximum prompt + completion tokens (TRL's meaning); a longer sequence is cut as "
            "truncation_mode says. null for no limit."
        },
    )
    max_prompt_length: int | None = field(
        default=PreferenceDataConfig.max_prompt_length,
        metadata={
            "help": "Prompt budget in tokens (mallowspo's own; TRL 1.16 has none). A longer prompt is never cut: it "
            "is an error (strict_validation) or a counted skip. null (default): no budget of its own, a prompt must "
            "only leave room for a completion within max_length (keep_start)."
        },
    )
    max_completion_length: int | None = field(
        default=PreferenceDataConfig.max_completion_length,
        metadata={
            "help": "Maximum completion tokens (mallowspo's own): completions keep their start. null for no limit "
            "beyond max_length."
        },
    )
    truncation_mode: str = field(
        default=PreferenceDataConfig.truncation_mode,
        metadata={
            "help": "Which end of a sequence over max_length is kept (TRL's names). keep_start (default): "
            "completions lose their end; a prompt is never cut, one that fills max_length is an error or a "
            "counted skip. keep_end: prompts lose their start (one cut for both completions). Cut rows are "
            "counted in the data report."
        },
    )
    strict_validation: bool = field(
        default=PreferenceDataConfig.strict,
        metadata={"help": "Fail on invalid preference rows (true) or drop them with a report (false)."},
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Concatenate a batch's sequences into one row with restarting position_ids, computing no "
            "padding token (TRL's name); needs attn_implementation sdpa, eager, flex_attention or flash_attention_2/3/4 "
            "and a model that keeps packed sequences apart (checked: training.packing)."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):  # TRL's single-name form
            self.loss_type = [self.loss_type]
        if self.bf16 is None:  # TRL's default where it can run; TRL refuses to start on a CPU-only machine instead
            self.bf16 = not self.fp16 and not self.use_cpu and bf16_accelerator_available()
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
        check_trl_keys(self)
        check_padding_free_settings(self)
        if not math.isfinite(self.simpo_gamma):
            raise ValueError(f"simpo_gamma must be a finite number, got {self.simpo_gamma}")
        for name in self.loss_type:
            check_trl_loss_type(name)
        check_objective(
            self.loss_type,
            self.loss_weights,
            self.mallows,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            phi_smoothing=self.phi_smoothing,
            smoothing_eps=self.smoothing_eps,
            ipo_form=self.ipo_form,
        )
        check_listwise_settings(self)  # objective (pairwise or over ranked lists), binarize, the list layout
        self.dispersion_settings()
        if (self.dispersion_source == "column") != (self.dispersion_column is not None):
            raise ValueError(
                "dispersion_column and dispersion_source='column' go together: set both to read -log phi(x) "
                f"from a dataset column (got dispersion_source={self.dispersion_source!r}, "
                f"dispersion_column={self.dispersion_column!r})"
            )
        self.to_data_config()  # validates the data settings (max_length against max_prompt_length among them)
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1:
            raise ValueError(f"precompute_ref_batch_size must be >= 1 or null, got {self.precompute_ref_batch_size}")
        for warning in ignored_settings(self):
            logger.warning(warning)
        if self.label_smoothing and "sigmoid" in self.loss_type:
            logger.warning(
                "label_smoothing=%g with sigmoid is conservative DPO (cDPO) here, as in TRL before 1.0; trl 1.16's "
                "DPOTrainer reads label_smoothing only for robust (and exo_pair), so the same recipe trains "
                "differently there",
                self.label_smoothing,
            )

    # ---- derived settings ----
    @property
    def reference_free(self) -> bool:
        """Whether the objective uses no reference log-probs (every preference term is SimPO)."""
        return all(is_reference_free(t) for t in preference_terms(self.loss_type))

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
            votes_column=self.dispersion_votes_column,
            chosen_votes_column=self.dispersion_chosen_votes_column,
            rejected_votes_column=self.dispersion_rejected_votes_column,
            strengths_column=self.dispersion_strengths_column,
            rankings_column=self.dispersion_rankings_column,
            format=self.dispersion_format,
            consensus=self.dispersion_consensus,
        )

    def to_data_config(self) -> PreferenceDataConfig:
        """The ``mallowspo.training.data.PreferenceDataConfig`` these arguments describe."""
        return PreferenceDataConfig(
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
            max_completion_length=self.max_completion_length,
            truncation_mode=self.truncation_mode,
            strict=self.strict_validation,
            dispersion_column=self.dispersion_column,
            annotation_columns=self.dispersion_settings().annotation_columns if self.mallows != "none" else (),
            annotation_format=self.dispersion_format,
        )


def accelerator_available() -> bool:
    """Whether this machine has a CUDA GPU or an Intel XPU."""
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or (xpu is not None and xpu.is_available())


def bf16_accelerator_available() -> bool:
    """Whether a GPU (or XPU) that computes in bf16 is here."""
    return accelerator_available() and is_torch_bf16_gpu_available()


def launched_without_accelerators() -> bool:
    """Whether this process is one of several (``WORLD_SIZE`` > 1, set by ``accelerate launch`` /
    torchrun) on a machine with no GPU or other accelerator."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not accelerator_available()
