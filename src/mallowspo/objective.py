"""Weighted sums of objectives, TRL's ``loss_type`` list with ``loss_weights``.

    loss = sum_k w_k * mean_b loss_k(b)

Each preference term is a ``mallowspo.losses.preference_loss`` base objective, with the
Mallows modifier applied to it; ``"sft"`` is TRL's NLL term on the chosen responses: minus
the mean log-prob over all chosen completion tokens of the batch,

    sft = -sum_b log pi(yw_b | x_b) / sum_b |yw_b|,

the same value for every pair of the batch (TRL expands it so, and only its mean counts).
Weights default to 1 for every term (TRL's default). A term's length normalisation follows
its own default (``mallowspo.losses.default_length_normalize``) unless ``length_normalize``
is given, which then applies to every term.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mallowspo.losses import LOSS_TYPES, PreferenceLossOutput, check_loss_options, preference_loss

SFT = "sft"
OBJECTIVE_TERMS = LOSS_TYPES + (SFT,)


@dataclass
class ObjectiveOutput:
    """losses: (B,) per-pair weighted sum of the terms (its mean is the batch loss);
    terms: term name -> (B,) unweighted per-pair losses;
    preference: the first preference term's output (rewards and margins for the metrics)."""

    losses: torch.Tensor
    terms: dict[str, torch.Tensor]
    preference: PreferenceLossOutput


def preference_terms(loss_types: Sequence[str]) -> list[str]:
    """The terms of ``loss_types`` that are preference objectives (all but ``"sft"``)."""
    return [t for t in loss_types if t != SFT]


def check_objective(
    loss_types: Sequence[str], loss_weights: Sequence[float] | None, mallows: str, **loss_options
) -> None:
    """Raise ValueError naming the problem for an invalid list of terms, weights or options
    (``loss_options``: those of ``mallowspo.losses.check_loss_options`` but the loss type)."""
    if isinstance(loss_types, str) or not loss_types:
        raise ValueError(f"loss_type must be a non-empty list of objectives, got {loss_types!r}")
    unknown = [t for t in loss_types if t not in OBJECTIVE_TERMS]
    if unknown:
        raise ValueError(f"unknown loss_type {unknown[0]!r}; choose one of {OBJECTIVE_TERMS}")
    if len(set(loss_types)) != len(loss_types):
        raise ValueError(f"loss_type lists a term twice: {list(loss_types)}; give each term once, with its weight")
    if not preference_terms(loss_types):
        raise ValueError(
            "loss_type ['sft'] alone is supervised fine-tuning, with no preference to learn: add a preference term "
            "(e.g. loss_type: [sigmoid, sft])"
        )
    if loss_weights is not None:
        if len(loss_weights) != len(loss_types):
            raise ValueError(
                f"loss_weights has {len(loss_weights)} values for {len(loss_types)} loss types {list(loss_types)}; "
                "give one weight per term"
            )
        bad = [w for w in loss_weights if not (w >= 0 and w < float("inf"))]
        if bad:
            raise ValueError(f"loss_weights must be finite numbers >= 0, got {list(loss_weights)}")
    for loss_type in preference_terms(loss_types):
        check_loss_options(loss_type, mallows, **loss_options)


def sft_loss(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """TRL's ``"sft"`` term, (B,): -sum log pi(yw) / sum |yw| over the batch, for every pair."""
    tokens = chosen_lengths.sum().clamp(min=1).to(chosen_logps.dtype)
    return (-chosen_logps.sum() / tokens).expand(chosen_logps.shape)


def combined_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    loss_types: Sequence[str] = ("sigmoid",),
    loss_weights: Sequence[float] | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    **loss_options,
) -> ObjectiveOutput:
    """The weighted objective of the module docstring. ``loss_options`` are
    ``preference_loss``'s keywords (beta, mallows, neg_log_phi, ...), shared by every
    preference term."""
    weights = list(loss_weights) if loss_weights is not None else [1.0] * len(loss_types)
    terms: dict[str, torch.Tensor] = {}
    preference: PreferenceLossOutput | None = None
    for loss_type in loss_types:
        if loss_type == SFT:
            if chosen_lengths is None:
                raise ValueError("the sft term needs chosen_lengths (the chosen completions' token counts)")
            terms[SFT] = sft_loss(policy_chosen_logps, chosen_lengths)
            continue
        output = preference_loss(
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            loss_type=loss_type,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            **loss_options,
        )
        terms[loss_type] = output.losses
        preference = preference if preference is not None else output
    if preference is None:
        raise ValueError("loss_types needs at least one preference term besides 'sft'")
    losses = sum(w * terms[t].to(preference.losses.dtype) for t, w in zip(loss_types, weights))
    return ObjectiveOutput(losses=losses, terms=terms, preference=preference)
