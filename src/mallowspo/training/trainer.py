"""MallowsPOTrainer: a ``transformers.Trainer`` that fine-tunes a causal LM with MallowsPO.

This module only wires the parts together; the life of a run:

1. Data (``training.data``): raw preference rows are validated and tokenized (already
   tokenized datasets, with ``prompt_input_ids``, are checked and used as they are); pairs or
   ranked lists, turned into what ``objective`` trains on (``training.data.binarize``).
2. Models (``training.models``): the policy (and a separate reference, if any) get the
   completion head (``training.head``); what serves as the reference is described there.
3. The reference pass (``training.reference``): reference log-probs and entropies per pair,
   cached on disk. Then the dispersion -log phi(x) per split, by the one dispersion path
   (``mallowspo.dispersion.dispersion_estimate``): the train split first, and its phi* is
   passed to the evaluation splits.
4. Training: chosen and rejected in one concatenated forward (``training.scoring``); the loss
   is ``mallowspo.losses.preference_loss``; metrics (``training.metrics``) use TRL's names and
   are pooled per example over accumulation steps, processes and log steps.
5. Saving (``training.outputs``): ``save_model`` writes the HF model (or adapter) and
   tokenizer, and the final save adds the resolved config, the model card and ``dispersion.jsonl``.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import AutoTokenizer, PreTrainedModel, Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.trainer.utils import get_config_model_id

from mallowspo.objective import ObjectiveOutput, combined_loss
from mallowspo.training.card import model_card_facts, write_model_card
from mallowspo.training.checkpoints import (
    STATE_FILE,
    TRAINING_ARGS_PICKLE,
    CheckpointError,
    check_run_owner,
    claim_output_dir,
    refused_pickle_message,
    resolve_checkpoint,
    run_identity,
    write_identity,
)
from mallowspo.training.collate import split_pairs
from mallowspo.training.config import MallowsPOConfig
from mallowspo.training.data import ValidationReport
from mallowspo.training.data.binarize import prepare_training_data
from mallowspo.training.list_collate import is_list_batch, list_collator
from mallowspo.training.list_loss import listwise_step
from mallowspo.training.list_reference import data_fingerprint
from mallowspo.training.loading import check_tokenizer_fits, ensure_pad_token, load_causal_lm
from mallowspo.training.metrics import TOKENS_SEEN, MetricAccumulator, non_finite_message, pair_metrics, token_metrics
from mallowspo.training.models import REFERENCE_KINDS, prepare_models
from mallowspo.training.outputs import (
    CONFIG_FILE,
    DISPERSION_FILE,
    check_output_dir,
    disk_full_save,
    output_bytes_needed,
    write_dispersion_jsonl,
    write_resolved_config,
)
from mallowspo.training.packing import preference_collator
from mallowspo.training.reference import ReferenceResult
from mallowspo.training.reference_cache import weights_fingerprint
from mallowspo.training.scoring import router_aux_loss_coef, score_completions
from mallowspo.training.trainer_reference import ReferenceMixin

logger = logging.getLogger(__name__)


class MallowsPOTrainer(ReferenceMixin, Trainer):
    """Fine-tune a causal LM with MallowsPO (see the module docstring for the life of a run).

    Args:
        model: a ``PreTrainedModel``, a PEFT model, or a local path / hub id to load.
        ref_model: an explicit frozen reference; None for the defaults (``training.models``).
        args: a ``MallowsPOConfig``.
        train_dataset, eval_dataset: preference data in TRL's formats, or ranked lists
            (``training.data.list_formats``), validated and tokenized with ``args.to_data_config()``
            and ``args.to_list_config()``; or already tokenized by
            ``mallowspo.training.data.prepare_preference_dataset`` (or ``prepare_list_dataset``).
        processing_class: the tokenizer; loaded from ``model``'s path when None.
        peft_config: a ``peft`` config (e.g. ``LoraConfig``) to train an adapter.
        data_collator: batches the tokenized rows; default: ``training.collate.PreferenceCollator``
            (``training.list_collate.ListCollator`` for a listwise objective; one it replaces must
            return the same keys).
        compute_metrics, callbacks, optimizers: as for ``transformers.Trainer`` (and TRL's ``DPOTrainer``).
        run_metadata: sections of settings outside ``args`` (e.g. the command line's
            ``model`` and ``data``), written into the resolved config and the model card.
        validation_reports: split -> ``ValidationReport`` of data tokenized beforehand.

    After construction: ``reference_results`` (split -> ``ReferenceResult``: the cache
    directory and whether it was reused), ``validation_reports`` (split -> report),
    ``phi_star`` (fitted or fixed phi* of the entropy estimate, or None), ``reference_kind`` (a key of
    ``training.models.REFERENCE_KINDS``) and ``run_identity`` (what a checkpoint of this run must match).
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
        data_collator: Any = None,
        compute_metrics: Any = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        run_metadata: dict[str, dict[str, Any]] | None = None,
        validation_reports: dict[str, ValidationReport] | None = None,
    ):
        args = args if args is not None else MallowsPOConfig(output_dir="mallowspo_output")
        if not isinstance(args, MallowsPOConfig):
            raise TypeError(f"args must be a MallowsPOConfig, got {type(args).__name__}")
        if isinstance(model, str):
            model = load_causal_lm(model, **(args.model_init_kwargs or {}))
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(get_config_model_id(model.config))
        ensure_pad_token(processing_class)
        check_tokenizer_fits(model, processing_class, get_config_model_id(model.config))
        self._router_aux_loss_coef = router_aux_loss_coef(model, args.router_aux_loss_coef)  # 0: no MoE loss

        self.run_metadata = dict(run_metadata or {})
        self.validation_reports = dict(validation_reports or {})
        self._data_config = args.to_data_config()
        self._list_config = args.to_list_config()  # pairs or lists: what the objective trains on
        train_dataset = self._tokenize(train_dataset, "train", processing_class)
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._tokenize(v, f"eval_{k}", processing_class) for k, v in eval_dataset.items()}
        else:
            eval_dataset = self._tokenize(eval_dataset, "eval", processing_class)

        self.run_identity = (
            run_identity(args.to_dict(), get_config_model_id(model.config), data_fingerprint(train_dataset))
            if train_dataset is not None
            else None
        )
        # Hashed before a LoRA adapter is added: a LoRA run shares the cache of its base model.
        weights = (
            weights_fingerprint(ref_model if ref_model is not None else model) if args.runs_reference_pass else ""
        )
        model, ref_model, self.reference_kind = prepare_models(model, ref_model, args, peft_config)
        if args.should_save:  # before the reference pass and training: fail now, not at the first save
            check_output_dir(args.output_dir, output_bytes_needed(model, args))
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator
            or (preference_collator if args.objective == "pairwise" else list_collator)(
                processing_class.pad_token_id,
                args.padding_free,
                model,
                ref_model,
                pad_to_multiple_of=args.pad_to_multiple_of,
            ),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        if args.n_gpu > 1:
            raise ValueError(
                "MallowsPOTrainer does not support nn.DataParallel (several GPUs in one process); "
                "launch with `accelerate launch` (or `mallowspo train --accelerate_config ddp`)"
            )
        self._metrics = {"train": MetricAccumulator(), "eval": MetricAccumulator()}
        self._train_tokens = 0  # real tokens trained on so far, all processes: TRL's num_tokens
        self.ref_model = self._place_reference(ref_model)
        logger.info("reference: %s", REFERENCE_KINDS[self.reference_kind])
        if args.reference_free and args.runs_reference_pass:
            logger.info(
                "%s is reference-free: the dispersion entropy comes from %s",
                args.loss_type,
                REFERENCE_KINDS[self.reference_kind],
            )
        self.reference_results: dict[str, ReferenceResult] = {}
        self.phi_star: float | None = None
        self.dispersion_prior: tuple[float, float] | None = None  # the annotators' Beta (a, b), fitted on train
        self._add_reference_columns_to_splits(weights)
        if args.precompute_ref_log_probs or args.reference_free:
            self.ref_model = None  # everything it gives is precomputed: do not keep it during training

    # ---- construction steps --------------------------------------------------------

    def _tokenize(self, dataset: datasets.Dataset | None, name: str, tokenizer: Any) -> datasets.Dataset | None:
        """Validate and tokenize raw rows (pairs or lists); tokenized data is checked and passes through. Then
        pairs or lists as the objective trains on them (``training.data.binarize``)."""
        if dataset is None:
            return None
        dataset, report = prepare_training_data(dataset, tokenizer, self._data_config, self._list_config, name)
        if report is not None:
            self.validation_reports[name] = report
        return dataset

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ObjectiveOutput]:
        """Mean loss of a ``PreferenceCollator`` batch (B pairs, one forward of 2B rows): the weighted
        terms of ``loss_type`` (``mallowspo.objective.combined_loss``), plus ``router_aux_loss_coef`` times
        an MoE model's router load-balancing loss (TRL's). A ``ListCollator`` batch (B lists) goes to
        ``training.list_loss.listwise_step``."""
        if is_list_batch(inputs):
            loss, output, per_example = listwise_step(
                model, inputs, self.args, self._reference_scores, self._router_aux_loss_coef
            )
            self._record_metrics(model, output, per_example)
            return (loss, output) if return_outputs else loss
        with_aux_loss = self._router_aux_loss_coef != 0
        policy = score_completions(
            model, inputs, with_entropy=True, with_token_metrics=True, with_aux_loss=with_aux_loss
        )
        chosen_logps, rejected_logps = split_pairs(policy.logps)
        chosen_lengths, rejected_lengths = split_pairs(policy.lengths)
        ref_chosen_logps, ref_rejected_logps = self._reference_logps(inputs)
        args = self.args
        output = combined_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            loss_types=args.loss_type,
            loss_weights=args.loss_weights,
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
            ipo_form=args.ipo_form,
        )
        loss = output.losses.mean()
        per_example = {
            **pair_metrics(output.preference, chosen_logps, rejected_logps, inputs, args.mallows),
            **token_metrics(policy, inputs),
        }
        if with_aux_loss:
            loss = loss + self._router_aux_loss_coef * policy.aux_loss
            per_example["aux_loss"] = policy.aux_loss.detach().expand(chosen_logps.size(0))
        self._record_metrics(model, output, per_example)
        return (loss, output) if return_outputs else loss

    def _record_metrics(
        self, model: torch.nn.Module, output: ObjectiveOutput, per_example: dict[str, torch.Tensor]
    ) -> None:
        """Gather this batch's per-example metrics from all processes (one collective) and pool them;
        count the real tokens of a training batch into ``num_tokens``; stop with FloatingPointError
        instead of logging NaN (the Trainer would step on it)."""
        names = list(per_example)
        columns = [per_example[n].detach().float() for n in names] + [output.losses.detach().float()]
        stacked = self.accelerator.gather_for_metrics(torch.stack(columns, dim=1))
        accumulator = self._metrics["train" if model.training else "eval"]
        sums = accumulator.update(names, stacked)  # every process sees the same gathered values; loss checked too
        if sums is None:
            raise FloatingPointError(
                non_finite_message(names + ["loss"], stacked, self.state.global_step, model.training)
            )
        if model.training:
            self._train_tokens += round(sums[TOKENS_SEEN])
        accumulator.set("num_tokens", self._train_tokens)  # evaluation logs the total so far, as TRL

    # ---- Trainer hooks ----------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``Trainer.train``, resuming only from complete checkpoints: ``True`` picks the newest
        complete ``checkpoint-N`` in ``output_dir`` (skipping one a killed run left half
        written), and a given path is checked before anything is loaded."""
        resuming = resume_from_checkpoint is not None and resume_from_checkpoint is not False
        if resuming:
            resume_from_checkpoint = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if self.run_identity is not None:
            self._claim_output_dir(resume_from_checkpoint if resuming else None)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        except pickle.UnpicklingError as error:  # torch.load(weights_only=True) refused a checkpoint file
            if not resuming:
                raise
            raise CheckpointError(refused_pickle_message(resume_from_checkpoint, error)) from error

    def check_run_owner(self, checkpoint: str | None = None) -> bool:
        """Raise ValueError when ``checkpoint`` (to resume from) or output_dir holds another run;
        changes nothing; True when output_dir must be cleared first (``training.checkpoints.check_run_owner``).
        `mallowspo train` calls it before training; ``train`` again."""
        if self.run_identity is None:
            return False
        return check_run_owner(self.args.output_dir, self.run_identity, checkpoint, self.args.overwrite_output_dir)

    def _claim_output_dir(self, checkpoint: str | None) -> None:
        """Check on every process (it only reads, so all stop alike), then clear (overwrite_output_dir)
        and mark output_dir as this run's (``mallowspo_run.json``, all a resume needs) on the main one."""
        clear = self.check_run_owner(checkpoint)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            claim_output_dir(self.args.output_dir, self.run_identity, clear)
        self.accelerator.wait_for_everyone()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the train metrics pooled since the last training log to each training log."""
        if "loss" in logs:
            logs.update(self._metrics["train"].pop())
        super().log(logs, start_time)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
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
        per-example dispersion file. No pickle file is left (see TRAINING_ARGS_PICKLE). A final
        save that fills the disk removes what it wrote and raises OSError(ENOSPC) naming the
        directory (a checkpoint: ``_save_checkpoint``)."""
        output_dir = Path(output_dir or self.args.output_dir)
        if _internal_call:  # a checkpoint (guarded by _save_checkpoint): the Trainer adds its own state files
            super().save_model(str(output_dir), _internal_call)
            if self.args.should_save:
                (output_dir / TRAINING_ARGS_PICKLE).unlink(missing_ok=True)
            return
        with disk_full_save(output_dir, "the final model", clean=self.args.should_save):
            super().save_model(str(output_dir), _internal_call)
            if not self.args.should_save:
                return
            (output_dir / TRAINING_ARGS_PICKLE).unlink(missing_ok=True)
            write_resolved_config(output_dir / CONFIG_FILE, self.resolved_config())
            self.state.save_to_json(str(output_dir / STATE_FILE))  # the log history, for scripts and plots
            if self.train_dataset is not None and "neg_log_phi" in self.train_dataset.column_names:
                write_dispersion_jsonl(output_dir / DISPERSION_FILE, self.train_dataset)
            write_model_card(output_dir, model_card_facts(self))

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """The Trainer's checkpoint; one that fills the disk is removed and raises OSError(ENOSPC) naming it."""
        checkpoint = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        clean = self.args.should_save
        with disk_full_save(checkpoint, "a checkpoint", whole_directory=True, clean=clean):
            if clean and self.run_identity is not None:  # before trainer_state.json, which marks it complete
                write_identity(checkpoint, self.run_identity)
            super()._save_checkpoint(model, trial)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Write the MallowsPO model card to ``output_dir/README.md`` (replaces the Trainer's draft)."""
        if self.args.should_save:
            write_model_card(self.args.output_dir, model_card_facts(self))

    def resolved_config(self) -> dict[str, dict[str, Any]]:
        """Every setting of the run: ``run_metadata`` sections (model, data, set by the CLI) plus training."""
        training = self.args.to_dict()
        training["phi_star"] = self.phi_star
        training["dispersion_prior"] = list(self.dispersion_prior) if self.dispersion_prior else None
        return {**self.run_metadata, "training": training}

    def last_logged_metrics(self) -> dict[str, float]:
        """The latest value of every logged metric (train, eval and run summary)."""
        merged: dict[str, float] = {}
        for entry in self.state.log_history:
            merged.update(entry)
        return merged
