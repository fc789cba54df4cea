"""MallowsPOTrainer: a ``transformers.Trainer`` that fine-tunes a causal LM with MallowsPO.

Life of a run:

1. Data: raw preference rows are validated and tokenized by ``mallowspo.data``
   (already tokenized datasets, with ``prompt_input_ids``, are used as they are).
2. Models: the policy (and a separate reference, if any) get the completion head
   (``mallowspo.head``), which returns per-token log-probs (and, for the reference pass,
   entropies) of completion tokens without full-batch logits. The reference is
   - ``ref_model`` when given;
   - with LoRA (``peft_config`` or a PEFT model): the policy with its adapter disabled;
   - for full fine-tuning: the initial policy. The reference pass runs before step 0 on
     the policy itself, so with ``precompute_ref_log_probs=True`` no copy is made; with
     ``False`` a frozen copy is kept for the per-step reference log-probs.
   Reference-free objectives (SimPO) still need entropies for the Mallows dispersion: the
   pass then uses ``ref_model`` if given, else the initial policy weights (before step 0).
3. The reference pass (``mallowspo.reference``): reference log-probs and entropies per
   pair, cached on disk; the dispersion -log phi(x) is derived per split (the entropy
   estimate's phi* is fitted on the train split and reused for evaluation).
4. Training: chosen and rejected in one concatenated forward; the loss is
   ``mallowspo.losses.preference_loss``. Metrics use TRL's names and are pooled per
   example over accumulation steps, processes and log steps.
5. Saving: ``save_model`` writes the HF model (or adapter) and tokenizer, the resolved
   config (``mallowspo_config.yaml``), a model card (``README.md``) and ``dispersion.jsonl``.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import shutil
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Trainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import disable_dropout_in_model, get_config_model_id

from mallowspo.collate import PreferenceCollator, split_pairs
from mallowspo.config import MallowsPOConfig
from mallowspo.dispersion import estimate_neg_log_phi
from mallowspo.head import add_completion_head
from mallowspo.losses import PreferenceLossOutput, preference_loss
from mallowspo.model_card import dispersion_summary, render_model_card, write_resolved_config
from mallowspo.reference import (
    ReferenceResult,
    load_or_compute_reference_columns,
    score_completions,
    weights_fingerprint,
    write_dispersion_jsonl,
)

logger = logging.getLogger(__name__)

CONFIG_FILE = "mallowspo_config.yaml"
REFERENCE_KINDS = {
    "ref_model": "the given ref_model",
    "copy": "a frozen copy of the initial model",
    "adapter": "the base model with the adapter disabled (no copy)",
    "policy": "the initial policy weights, scored before step 0 (no copy)",
}
DISPERSION_FILE = "dispersion.jsonl"
STATE_FILE = "trainer_state.json"
# The Trainer also pickles its arguments (torch.save) into every save; loading that file back
# needs full pickle, which can run code from an untrusted checkpoint, and nothing reads it on
# resume. It is removed: the settings are saved as YAML (CONFIG_FILE) instead.
TRAINING_ARGS_PICKLE = "training_args.bin"


# ---------------------------------------------------------------------------------------
# Loading helpers
# ---------------------------------------------------------------------------------------


def check_model_source(name_or_path: str) -> None:
    """Raise FileNotFoundError, naming the path, when ``name_or_path`` is meant as a local
    model directory (see ``mallowspo.data.looks_like_path``) that is not there or holds no model.
    Hub ids ('owner/name') pass; the hub is asked only when they are loaded."""
    from mallowspo.data import looks_like_path

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not any((path / marker).is_file() for marker in ("config.json", "adapter_config.json")):
            raise FileNotFoundError(
                f"Model directory {path} holds no config.json: it is not a saved model. Give a directory written "
                "by save_pretrained (config.json, model.safetensors, tokenizer files) or a Hugging Face hub id."
            )
    elif path.exists():
        raise FileNotFoundError(f"Model path {path} is a file; give the directory that holds the model (config.json).")
    elif looks_like_path(name_or_path) or (len(path.parts) > 1 and Path(path.parts[0]).is_dir()):
        # ('runs/model' where ./runs exists is a local path, not the hub id of an owner "runs")
        raise FileNotFoundError(
            f"Model not found: there is no directory at '{name_or_path}' (resolved to {path.resolve()}). Give a "
            "directory written by save_pretrained, or a Hugging Face hub id such as 'owner/name'."
        )


def load_causal_lm(
    name_or_path: str, dtype: str = "auto", trust_remote_code: bool = False, attn_implementation: str | None = None
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with the command line's options.

    Weights are read from safetensors files only (``use_safetensors=True``): pickle weight
    files (``pytorch_model.bin``) can run code when loaded. Remote code runs only with
    ``trust_remote_code=True``.
    """
    check_model_source(name_or_path)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as error:
        if not any(Path(name_or_path).expanduser().glob("*.bin")):
            raise
        raise OSError(
            f"{name_or_path} holds only pickle weights (*.bin), and mallowspo loads safetensors only (a pickle file "
            "can run code when loaded). If you trust the file, convert it once: AutoModelForCausalLM.from_pretrained"
            f"('{name_or_path}').save_pretrained('{name_or_path}-safetensors'), and train from the new directory."
        ) from error


# ---------------------------------------------------------------------------------------
# Output directory and checkpoints
# ---------------------------------------------------------------------------------------


def output_bytes_needed(model: torch.nn.Module, args: MallowsPOConfig) -> int:
    """A lower bound on the disk space the run writes to ``output_dir``: the saved weights
    (only the trainable ones for an adapter), twice with checkpoints (one checkpoint, then
    the final model). Optimizer states and logs come on top."""
    params = list(model.parameters())
    saved = [p for p in params if p.requires_grad] if is_peft_model(model) else params
    weights = sum(p.numel() * p.element_size() for p in saved)
    return weights * (1 if args.save_strategy == "no" else 2)


def check_output_dir(output_dir: str | Path, needed_bytes: int = 0) -> None:
    """Fail before any work when ``output_dir`` cannot be created or written, or when its disk
    has less than ``needed_bytes`` free. Raises NotADirectoryError, PermissionError or OSError
    with a message that names the directory and what to do."""
    path = Path(output_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise NotADirectoryError(
            f"output_dir {path} cannot be created: {blocker} is a file, not a directory. Choose another --output_dir."
        ) from None
    except OSError as error:
        message = f"output_dir {path} cannot be created ({error.strerror}); choose another --output_dir"
        raise OSError(error.errno, message) from None
    probe = path / f".mallowspo-write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"0")
    except OSError as error:
        message = f"output_dir {path} is not writable ({error.strerror}); fix its permissions or choose another "
        message += "--output_dir"
        raise PermissionError(error.errno, message) from None
    finally:
        probe.unlink(missing_ok=True)
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise OSError(
            errno.ENOSPC,
            f"not enough free disk space for output_dir {path}: {free / 2**20:.1f} MiB free, the run writes at least "
            f"{needed_bytes / 2**20:.1f} MiB (the saved model, and a checkpoint). Free some space or choose another "
            "--output_dir",
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
                    logger.warning("skipping incomplete checkpoints (a run stopped while saving them): %s",
                                   ", ".join(str(p) for p in skipped))
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


def ensure_pad_token(tokenizer: Any) -> None:
    """Use EOS as the pad token when the tokenizer has none (padding is masked out anyway)."""
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token first")
    tokenizer.pad_token = tokenizer.eos_token
    logger.warning("the tokenizer has no pad token: using its EOS token %r as the pad token", tokenizer.eos_token)


def is_peft_model(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def wrap_with_peft(model: PreTrainedModel, peft_config: Any, activation_checkpointing: bool) -> torch.nn.Module:
    """``peft.get_peft_model``, after the completion head was added to the base model."""
    from peft import get_peft_model

    if activation_checkpointing:
        model.enable_input_require_grads()  # LoRA with checkpointing needs grads on the embeddings' output
    return get_peft_model(model, peft_config)


# ---------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------


class MetricAccumulator:
    """Per-example metrics pooled across micro-batches, accumulation steps, processes and
    log steps until read: each mean is over all examples seen since the last ``pop``."""

    WITH_EXTREMES = ("mallows/neg_log_phi",)

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sum: dict[str, float] = {}
        self._count: dict[str, int] = {}
        self._min: dict[str, float] = {}
        self._max: dict[str, float] = {}

    def update(self, names: list[str], values: torch.Tensor) -> bool:
        """Add per-example ``values`` (N, M), already gathered from all processes: column i is
        metric ``names[i]``; columns past ``len(names)`` are only checked for finiteness.

        One device-to-host copy (sums, minima, maxima and a finiteness flag together), so a
        GPU step waits once. Returns False, and adds nothing, if any value is NaN or inf."""
        values = values.detach().float()
        if values.numel() == 0:
            return True
        k = len(names)
        finite = torch.isfinite(values).all().to(values.dtype).reshape(1)
        named = values[:, :k]
        stats = torch.cat([named.sum(0), named.amin(0), named.amax(0), finite]).double().cpu().tolist()
        if not stats[-1]:
            return False
        for i, name in enumerate(names):
            self._sum[name] = self._sum.get(name, 0.0) + stats[i]
            self._count[name] = self._count.get(name, 0) + values.size(0)
            self._min[name] = min(self._min.get(name, float("inf")), stats[k + i])
            self._max[name] = max(self._max.get(name, float("-inf")), stats[2 * k + i])
        return True

    def pop(self) -> dict[str, float]:
        """The means (and ``_min``/``_max`` for ``WITH_EXTREMES``) since the last pop; then reset."""
        out: dict[str, float] = {}
        for name, total in self._sum.items():
            mean = total / self._count[name]
            if name in self.WITH_EXTREMES:
                out[f"{name}_mean"], out[f"{name}_min"], out[f"{name}_max"] = mean, self._min[name], self._max[name]
            else:
                out[name] = mean
        self.reset()
        return out


# ---------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------


class MallowsPOTrainer(Trainer):
    """Fine-tune a causal LM with MallowsPO (see the module docstring for the life of a run).

    Args:
        model: a ``PreTrainedModel``, a PEFT model, or a local path / hub id to load.
        ref_model: an explicit frozen reference; None for the defaults described above.
        args: a ``MallowsPOConfig``.
        train_dataset, eval_dataset: preference data in TRL's formats (validated and
            tokenized with ``args.to_data_config()``), or already tokenized by
            ``mallowspo.data.prepare_preference_dataset``.
        processing_class: the tokenizer; loaded from ``model``'s path when None.
        peft_config: a ``peft`` config (e.g. ``LoraConfig``) to train an adapter.
        callbacks: extra ``TrainerCallback``s.

    After construction: ``reference_results`` (split -> ``ReferenceResult``: the cache
    directory and whether it was reused), ``validation_reports`` (split -> report),
    ``phi_star`` (fitted or fixed phi* of the entropy estimate, or None).
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; the Trainer divides by accumulation

    def __init__(
        self,
        model: PreTrainedModel | torch.nn.Module | str,
        ref_model: PreTrainedModel | None = None,
        args: MallowsPOConfig | None = None,
        train_dataset: datasets.Dataset | None = None,
        eval_dataset: datasets.Dataset | dict[str, datasets.Dataset] | None = None,
        processing_class: Any = None,
        peft_config: Any = None,
        callbacks: list | None = None,
    ):
        args = args if args is not None else MallowsPOConfig(output_dir="mallowspo_output")
        if not isinstance(args, MallowsPOConfig):
            raise TypeError(f"args must be a MallowsPOConfig, got {type(args).__name__}")
        if isinstance(model, str):
            model = load_causal_lm(model)
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(get_config_model_id(model.config))
        ensure_pad_token(processing_class)

        self.validation_reports: dict[str, Any] = {}
        self.reference_results: dict[str, ReferenceResult] = {}
        self.phi_star: float | None = None
        self.run_metadata: dict[str, dict[str, Any]] = {}
        self._data_config = args.to_data_config()

        train_dataset = self._tokenize(train_dataset, "train", processing_class)
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._tokenize(v, f"eval_{k}", processing_class) for k, v in eval_dataset.items()}
        else:
            eval_dataset = self._tokenize(eval_dataset, "eval", processing_class)

        # Hashed before a LoRA adapter is added: a LoRA run shares the cache of its base model.
        weights = weights_fingerprint(ref_model if ref_model is not None else model) if args.runs_reference_pass else ""
        model, ref_model = self._prepare_models(model, ref_model, args, peft_config)
        if args.should_save:  # before the reference pass and training: fail now, not at the first save
            check_output_dir(args.output_dir, output_bytes_needed(model, args))
        super().__init__(
            model=model,
            args=args,
            data_collator=PreferenceCollator(processing_class.pad_token_id),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
        )
        if args.n_gpu > 1:
            raise ValueError(
                "MallowsPOTrainer does not support nn.DataParallel (several GPUs in one process); "
                "launch with `accelerate launch` (or `mallowspo train --accelerate_config ddp`)"
            )
        self._metrics = {"train": MetricAccumulator(), "eval": MetricAccumulator()}
        self.ref_model = self._place_reference(ref_model)
        logger.info("reference: %s", REFERENCE_KINDS[self._reference_kind])
        if args.reference_free and args.runs_reference_pass:
            logger.info("%s is reference-free: the dispersion entropy comes from %s",
                        args.loss_type, REFERENCE_KINDS[self._reference_kind])
        self._add_reference_columns_to_splits(weights)
        if args.precompute_ref_log_probs or args.reference_free:
            self.ref_model = None  # everything it gives is precomputed: do not keep it during training
        if self.args.should_save and self.train_dataset is not None and "neg_log_phi" in self.train_dataset.column_names:
            write_dispersion_jsonl(Path(self.args.output_dir) / DISPERSION_FILE, self.train_dataset)

    # ---- construction steps --------------------------------------------------------

    def _tokenize(self, dataset: datasets.Dataset | None, name: str, tokenizer: Any) -> datasets.Dataset | None:
        """Validate and tokenize raw preference rows; tokenized data is checked and passes through."""
        from mallowspo.data import check_tokenized_dataset, prepare_preference_dataset

        if dataset is None:
            return None
        if "prompt_input_ids" in dataset.column_names:
            check_tokenized_dataset(dataset, name)
            return dataset

        dataset, report = prepare_preference_dataset(dataset, tokenizer, self._data_config, name=name)
        self.validation_reports[name] = report
        return dataset

    def _prepare_models(
        self, model: torch.nn.Module, ref_model: PreTrainedModel | None, args: MallowsPOConfig, peft_config: Any
    ) -> tuple[torch.nn.Module, PreTrainedModel | None]:
        """Copy the reference if one must be kept, add completion heads, disable dropout, wrap with PEFT."""
        peft = peft_config is not None or is_peft_model(model)
        if peft_config is not None and is_peft_model(model):
            raise ValueError("model is already a PEFT model: pass peft_config=None, or pass the base model")
        online_reference = not args.precompute_ref_log_probs and not args.reference_free
        self._reference_kind = "ref_model" if ref_model is not None else ("adapter" if peft else "policy")
        if ref_model is None and online_reference and not peft:
            # Full fine-tuning with per-step reference log-probs: keep a frozen copy of the
            # initial weights (made before the head is patched, so each model has its own).
            ref_model = copy.deepcopy(model)
            self._reference_kind = "copy"
        base = model.get_base_model() if is_peft_model(model) else model
        add_completion_head(base)
        if ref_model is not None:
            add_completion_head(ref_model)
            ref_model.eval().requires_grad_(False)
        if args.disable_dropout:
            disable_dropout_in_model(model)
            if ref_model is not None:
                disable_dropout_in_model(ref_model)
        if peft_config is not None:
            model = wrap_with_peft(model, peft_config, bool(args.activation_checkpointing))
        return model, ref_model

    def _place_reference(self, ref_model: PreTrainedModel | None) -> torch.nn.Module | None:
        """Put the separate reference on this process's device (sharded under DeepSpeed ZeRO-3 / FSDP)."""
        if ref_model is None:
            return None
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(ref_model, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(ref_model, self.accelerator)
        return ref_model.to(self.accelerator.device)

    # ---- the reference pass and the dispersion ---------------------------------------

    def _reference_context(self):
        """Context under which ``self.model`` acts as the reference: its adapter disabled (PEFT)."""
        if self.ref_model is None and is_peft_model(self.model):
            return self.accelerator.unwrap_model(self.model).disable_adapter()
        return nullcontext()

    def _pass_model(self) -> torch.nn.Module:
        """The model the reference pass runs: the separate reference, or the (not yet trained) policy."""
        if self.ref_model is not None:
            return self.ref_model
        if self.is_deepspeed_enabled:  # parameters are not placed/gathered before train(): use an inference engine
            return prepare_deepspeed(self.model, self.accelerator)
        return self.model

    def _add_reference_columns_to_splits(self, weights: str) -> None:
        """Run (or reuse) the reference pass on every split and attach its columns and ``neg_log_phi``."""
        model = self._pass_model() if self.args.runs_reference_pass else None
        if self.train_dataset is not None:
            self.train_dataset = self._add_reference_columns(self.train_dataset, "train", model, weights)
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {
                k: self._add_reference_columns(v, f"eval_{k}", model, weights) for k, v in self.eval_dataset.items()
            }
        elif self.eval_dataset is not None:
            self.eval_dataset = self._add_reference_columns(self.eval_dataset, "eval", model, weights)

    def _add_reference_columns(
        self, dataset: datasets.Dataset, name: str, model: torch.nn.Module | None, weights: str
    ) -> datasets.Dataset:
        """Attach the reference columns (cached pass, when ``model`` is given) and ``neg_log_phi`` to a split."""
        if model is not None:
            batch_size = self.args.precompute_ref_batch_size or (
                self.args.per_device_train_batch_size if name == "train" else self.args.per_device_eval_batch_size
            )
            result = load_or_compute_reference_columns(
                model, dataset, self.data_collator, self.accelerator,
                batch_size=batch_size, weights=weights, tokenizer=self.processing_class,
                data_settings=self._data_config, reference_context=self._reference_context, name=name,
            )
            self.reference_results[name] = result
            for column, values in result.columns.items():
                dataset = dataset.remove_columns(column) if column in dataset.column_names else dataset
                dataset = dataset.add_column(column, values.tolist())
        neg_log_phi = self._neg_log_phi(dataset, name)
        if neg_log_phi is not None:
            if "neg_log_phi" in dataset.column_names:
                dataset = dataset.remove_columns("neg_log_phi")
            dataset = dataset.add_column("neg_log_phi", neg_log_phi.tolist())
        return dataset

    def _neg_log_phi(self, dataset: datasets.Dataset, name: str) -> np.ndarray | None:
        """-log phi(x) per pair from the configured source; None when it cannot be known
        (with mallows='none' the loss has no dispersion, so none is attached, logged or written)."""
        if self.args.mallows == "none":
            return None
        source = self.args.dispersion_source
        if source == "constant":
            return np.full(len(dataset), self.args.dispersion_constant)
        if source == "column":
            return np.asarray(dataset["dispersion"], dtype=np.float64)
        if "hbar" not in dataset.column_names:
            return None
        hbar = torch.tensor(dataset["hbar"], dtype=torch.float64)
        normalization = self.args.dispersion_normalization
        phi_star = self.phi_star if (name != "train" and self.phi_star is not None) else normalization
        clamp = tuple(self.args.dispersion_clamp) if self.args.dispersion_clamp is not None else None
        estimates, fitted = estimate_neg_log_phi(hbar, phi_star=phi_star, clamp=clamp)
        if name == "train" or self.phi_star is None:
            self.phi_star = fitted
            logger.info("dispersion: phi* = %.4g (%s)", fitted, "train mean 1" if normalization == "mean" else "fixed")
        return estimates.numpy()

    # ---- loss and metrics -------------------------------------------------------------

    def _reference_logps(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Reference log-probs of the batch: precomputed, computed now, or None (reference-free)."""
        if self.args.reference_free:
            return None, None
        if self.args.precompute_ref_log_probs:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        model = self.ref_model if self.ref_model is not None else self.model
        checkpointing = (  # a no-grad forward through checkpointed layers only warns: switch it off meanwhile
            disable_gradient_checkpointing(self.accelerator.unwrap_model(self.model), self.args.activation_checkpointing_kwargs)
            if self.args.activation_checkpointing and self.ref_model is None
            else nullcontext()
        )
        with torch.no_grad(), self._reference_context(), checkpointing:
            scores = score_completions(model, inputs)
        return split_pairs(scores.logps.float())

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, PreferenceLossOutput]:
        """Mean preference loss of a ``PreferenceCollator`` batch (B pairs, one forward of 2B rows)."""
        policy = score_completions(model, inputs)
        chosen_logps, rejected_logps = split_pairs(policy.logps)
        chosen_lengths, rejected_lengths = split_pairs(policy.lengths)
        ref_chosen_logps, ref_rejected_logps = self._reference_logps(inputs)
        args = self.args
        output = preference_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            loss_type=args.loss_type,
            beta=args.beta,
            mallows=args.mallows,
            neg_log_phi=inputs.get("neg_log_phi") if args.mallows != "none" else None,
            phi_smoothing=args.phi_smoothing,
            smoothing_eps=args.smoothing_eps,
            label_smoothing=args.label_smoothing,
            simpo_gamma=args.simpo_gamma,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            length_normalize=args.length_normalize,
        )
        loss = output.losses.mean()
        self._record_metrics(model, output, chosen_logps, rejected_logps, inputs)
        return (loss, output) if return_outputs else loss

    def _record_metrics(
        self,
        model: torch.nn.Module,
        output: PreferenceLossOutput,
        chosen_logps: torch.Tensor,
        rejected_logps: torch.Tensor,
        inputs: dict[str, torch.Tensor],
    ) -> None:
        """Gather this batch's per-example metrics from all processes (one collective) and pool them."""
        per_example = {
            "rewards/chosen": output.chosen_rewards,
            "rewards/rejected": output.rejected_rewards,
            "rewards/margins": output.chosen_rewards - output.rejected_rewards,
            "rewards/accuracies": (output.chosen_rewards > output.rejected_rewards).to(output.chosen_rewards.dtype),
            "logps/chosen": chosen_logps.detach(),
            "logps/rejected": rejected_logps.detach(),
        }
        if "neg_log_phi" in inputs:
            per_example["mallows/neg_log_phi"] = inputs["neg_log_phi"]
        if "ref_chosen_entropy" in inputs and self.args.mallows != "none":
            per_example["mallows/ref_entropy_mean"] = 0.5 * (inputs["ref_chosen_entropy"] + inputs["ref_rejected_entropy"])
        names = list(per_example)
        columns = [per_example[n].detach().float() for n in names] + [output.losses.detach().float()]
        stacked = self.accelerator.gather_for_metrics(torch.stack(columns, dim=1))
        accumulator = self._metrics["train" if model.training else "eval"]
        if not accumulator.update(names, stacked):  # every process sees the same gathered values; loss checked too
            self._raise_non_finite(names + ["loss"], stacked, model.training)

    def _raise_non_finite(self, names: list[str], stacked: torch.Tensor, training: bool) -> None:
        """Stop with FloatingPointError instead of logging NaN (the Trainer would step on it)."""
        bad = ~torch.isfinite(stacked)
        which = [name for i, name in enumerate(names) if bool(bad[:, i].any())]
        pairs = int(bad.any(dim=1).sum())
        phase = "training" if training else "evaluation"
        raise FloatingPointError(
            f"NaN or inf {', '.join(which)} at step {self.state.global_step} ({phase})"
            f" for {pairs} of {stacked.size(0)} pairs in the batch. Usual causes: float16 overflow (use bf16 or "
            "float32), a learning rate too high (the policy diverged), or NaN in the model weights. Checkpoints "
            "saved before this step are intact (--resume_from_checkpoint)."
        )

    # ---- Trainer hooks ----------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``Trainer.train``, resuming only from complete checkpoints: ``True`` picks the newest
        complete ``checkpoint-N`` in ``output_dir`` (skipping one a killed run left half
        written), and a given path is checked before anything is loaded."""
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False:
            resume_from_checkpoint = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the train metrics pooled since the last training log to each training log."""
        if "loss" in logs:
            logs.update(self._metrics["train"].pop())
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        """The Trainer's loop, plus the pooled metrics of the evaluated examples under ``{prefix}_``."""
        self._metrics["eval"].reset()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self._metrics["eval"].pop().items()})
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation computes the preference loss (there are no labels and no logits to return)."""
        inputs = {k: v.to(self.args.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ---- outputs ----------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model (or adapter, as safetensors) and tokenizer; a final save (not a
        checkpoint) also writes the resolved config, the log history, the model card and the
        per-example dispersion file. No pickle file is left (see TRAINING_ARGS_PICKLE)."""
        super().save_model(output_dir, _internal_call)
        if not self.args.should_save:
            return
        output_dir = Path(output_dir or self.args.output_dir)
        (output_dir / TRAINING_ARGS_PICKLE).unlink(missing_ok=True)
        if _internal_call:  # a checkpoint: the Trainer adds its own state files
            return
        write_resolved_config(output_dir / CONFIG_FILE, self.resolved_config())
        self.state.save_to_json(str(output_dir / STATE_FILE))  # the log history, for scripts and plots
        if self.train_dataset is not None and "neg_log_phi" in self.train_dataset.column_names:
            write_dispersion_jsonl(output_dir / DISPERSION_FILE, self.train_dataset)
        (output_dir / "README.md").write_text(render_model_card(self.model_card_facts()))

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Write the MallowsPO model card to ``output_dir/README.md`` (replaces the Trainer's draft)."""
        if self.args.should_save:
            Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.args.output_dir) / "README.md").write_text(render_model_card(self.model_card_facts()))

    def resolved_config(self) -> dict[str, dict[str, Any]]:
        """Every setting of the run: ``run_metadata`` sections (model, data, set by the CLI) plus training."""
        training = self.args.to_dict()
        training["phi_star"] = self.phi_star
        return {**self.run_metadata, "training": training}

    def last_logged_metrics(self) -> dict[str, float]:
        """The latest value of every logged metric (train, eval and run summary)."""
        merged: dict[str, float] = {}
        for entry in self.state.log_history:
            merged.update(entry)
        return merged

    def model_card_facts(self) -> dict[str, Any]:
        """The facts ``render_model_card`` formats."""
        model_meta = self.run_metadata.get("model", {})
        data_meta = self.run_metadata.get("data", {})
        base = model_meta.get("model_name_or_path") or get_config_model_id(self.accelerator.unwrap_model(self.model).config)
        facts: dict[str, Any] = {
            "model_name": Path(self.args.output_dir).name,
            "base_model": base,
            "dataset": data_meta.get("dataset_name", "unknown"),
            "config": self.args.to_dict(),
            "data": {name: report.summary().splitlines()[0] for name, report in self.validation_reports.items()},
            "metrics": self.last_logged_metrics(),
        }
        if self.train_dataset is not None and "neg_log_phi" in self.train_dataset.column_names:
            facts["dispersion"] = {
                "source": self.args.dispersion_source,
                "normalization": self.args.dispersion_normalization,
                "phi_star": self.phi_star,
                "clamp": self.args.dispersion_clamp,
                "entropy_model": REFERENCE_KINDS[self._reference_kind],
                "summary": dispersion_summary(np.asarray(self.train_dataset["neg_log_phi"])),
            }
        return facts
