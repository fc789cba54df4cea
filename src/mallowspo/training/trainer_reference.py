"""The reference side of ``MallowsPOTrainer`` (a mixin): where the reference model lives, the
context under which the policy serves as its own reference (a PEFT adapter disabled), the cached
reference pass over every split with its dispersion -log phi(x) (train first, its phi* passed on),
and the reference log-probs of a batch (precomputed, computed now, or none when reference-free).

It uses the trainer's ``args``, ``accelerator``, ``model``, ``ref_model``, ``data_collator``,
``processing_class``, ``_data_config``, ``reference_results``, ``phi_star`` and ``dispersion_prior``.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import datasets
import torch
from transformers import PreTrainedModel
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.models.utils import disable_gradient_checkpointing

from mallowspo.training.collate import split_pairs
from mallowspo.training.list_reference import attach_reference_pass
from mallowspo.training.models import is_peft_model
from mallowspo.training.reference import with_dispersion
from mallowspo.training.scoring import score_completions

logger = logging.getLogger("mallowspo.training.trainer")


class ReferenceMixin:
    """The reference model, the reference pass and the reference log-probs of ``MallowsPOTrainer``."""

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
        """Run (or reuse) the reference pass on every split and attach its columns and ``neg_log_phi``.

        The train split goes first: the phi* fitted there is passed to every evaluation split
        (without train data, the first evaluation split fits it)."""
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
            dataset, result = attach_reference_pass(  # pairs or lists (training.list_reference)
                model,
                dataset,
                self.data_collator,
                self.accelerator,
                batch_size=batch_size,
                weights=weights,
                tokenizer=self.processing_class,
                data_settings=self._data_config,
                reference_context=self._reference_context,
                name=name,
            )
            self.reference_results[name] = result
        if self.args.mallows == "none":  # the loss has no dispersion: none is attached, logged or written
            return dataset
        dataset, estimate = with_dispersion(
            dataset, self.args.dispersion_settings(), self.phi_star, name, self.dispersion_prior
        )
        self.dispersion_prior = self.dispersion_prior or estimate.prior
        if estimate.phi_star is not None and self.phi_star is None:
            self.phi_star = estimate.phi_star
            fitted = "train mean 1" if self.args.dispersion_normalization == "mean" else "fixed"
            logger.info("dispersion: phi* = %.4g (%s, from split %s)", estimate.phi_star, fitted, name)
        return dataset

    # ---- loss and metrics -------------------------------------------------------------

    def _reference_logps(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Reference log-probs of the batch: precomputed, computed now, or None (reference-free)."""
        if self.args.reference_free:
            return None, None
        if self.args.precompute_ref_log_probs:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        return split_pairs(self._reference_scores(inputs))

    def _reference_scores(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sequence reference log-probs of the batch, computed now (the online reference)."""
        model = self.ref_model if self.ref_model is not None else self.model
        checkpointing = (  # a no-grad forward through checkpointed layers only warns: switch it off meanwhile
            disable_gradient_checkpointing(
                self.accelerator.unwrap_model(self.model), self.args.activation_checkpointing_kwargs
            )
            if self.args.activation_checkpointing and self.ref_model is None
            else nullcontext()
        )
        with torch.no_grad(), self._reference_context(), checkpointing:
            scores = score_completions(model, inputs)
        return scores.logps.float()
