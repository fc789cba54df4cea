"""The training step on a list batch: the S sequences in one forward, scored, laid out as (B, K)
and passed to ``mallowspo.listwise.listwise_loss`` with the run's loss_type, beta, Mallows variant
and dispersion; the metrics of ``training.list_metrics``. The trainer's ``compute_loss`` calls it
for a ``ListCollator`` batch.

Reference log-probs: the precomputed ``ref_logps`` (the reference pass), the online reference's
(``precompute_ref_log_probs: false``), or none (SimPO). ``listwise_top_k`` applies to the batch as
long as it leaves some stage out: a batch whose lists have at most top_k + 1 responses is scored
on its whole rankings (the same thing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mallowspo.listwise import ListwiseLossOutput, listwise_loss
from mallowspo.training.list_collate import scatter_responses
from mallowspo.training.list_metrics import list_metrics, list_token_metrics
from mallowspo.training.scoring import score_completions


def reference_logps(
    inputs: dict[str, Any], args: Any, score_reference: Callable[[dict], torch.Tensor]
) -> torch.Tensor | None:
    """(B, K) reference log-probs of a list batch; ``score_reference`` gives the online reference's
    per-sequence log-probs (S,)."""
    if args.reference_free:
        return None
    if args.precompute_ref_log_probs:
        return inputs["ref_logps"]
    return scatter_responses(score_reference(inputs), inputs)


def listwise_step(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    args: Any,
    score_reference: Callable[[dict], torch.Tensor],
    aux_loss_coef: float = 0.0,
) -> tuple[torch.Tensor, ListwiseLossOutput, dict[str, torch.Tensor]]:
    """The mean listwise loss of a batch (plus ``aux_loss_coef`` times an MoE router loss), the
    ``ListwiseLossOutput`` and the per-prompt metrics."""
    with_aux_loss = aux_loss_coef != 0
    policy = score_completions(model, inputs, with_entropy=True, with_token_metrics=True, with_aux_loss=with_aux_loss)
    logps = scatter_responses(policy.logps, inputs)
    lengths = scatter_responses(policy.lengths, inputs, fill=1.0)
    mask = inputs["list_mask"]
    top_k = args.listwise_top_k if args.objective == "plackett_luce" else None
    if top_k is not None and top_k >= mask.size(1) - 1:
        top_k = None
    output = listwise_loss(
        logps,
        reference_logps(inputs, args, score_reference),
        inputs["ranks"],
        objective=args.objective,
        mask=mask,
        top_k=top_k,
        lengths=lengths,
        loss_type=args.loss_type[0],
        beta=args.beta,
        mallows=args.mallows,
        neg_log_phi=inputs.get("neg_log_phi") if args.mallows != "none" else None,
        phi_smoothing=args.phi_smoothing,
        smoothing_eps=args.smoothing_eps,
        label_smoothing=args.label_smoothing,
        simpo_gamma=args.simpo_gamma,
        length_normalize=args.length_normalize,
        ipo_form=args.ipo_form,
    )
    loss = output.losses.mean()
    per_example = {**list_metrics(output, logps, inputs, args.mallows), **list_token_metrics(policy, inputs)}
    if with_aux_loss:
        loss = loss + aux_loss_coef * policy.aux_loss
        per_example["aux_loss"] = policy.aux_loss.detach().expand(mask.size(0))
    return loss, output, per_example
