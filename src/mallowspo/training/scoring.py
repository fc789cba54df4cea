"""Scoring a batch: the summed completion log-probs (and mean entropies, TRL's token statistics
and an MoE model's router load-balancing loss, when asked for) of each sequence of a
``PreferenceCollator`` batch, through the completion head (``mallowspo.training.head``).

The training step, the per-step reference and the reference pass all score with this, in
either layout of ``training.collate`` (padded rows, or one padding-free row)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mallowspo.training.collate import is_packed
from mallowspo.training.head import is_moe


@dataclass
class CompletionScores:
    """Per-sequence scores of a concatenated batch, each (2B,): chosen rows first.

    logps: summed log-probs of the completion tokens (carries gradient if the model does).
    mean_entropy: mean next-token entropy over the completion positions (no gradient; zero unless asked for).
    lengths: number of completion tokens.
    mean_logit_sums: the sum over the completion positions of the mean logit over the vocabulary
        (no gradient; None unless token metrics are asked for).
    top1_counts: the number of completion positions whose label has the largest logit (ditto).
    aux_loss: the MoE router load-balancing loss of the whole batch, a scalar with gradient (None unless asked for).
    """

    logps: torch.Tensor
    mean_entropy: torch.Tensor
    lengths: torch.Tensor
    mean_logit_sums: torch.Tensor | None = None
    top1_counts: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def score_completions(
    model: torch.nn.Module,
    batch: dict[str, Any],
    with_entropy: bool = False,
    with_token_metrics: bool = False,
    with_aux_loss: bool = False,
) -> CompletionScores:
    """Run ``model`` (patched by ``mallowspo.training.head.add_completion_head``) on a ``PreferenceCollator`` batch.

    Position t of the head's outputs scores token t + 1, so the scored mask is shifted by
    one. Unscored tokens get the label -100 and are not projected through the LM head
    (except by TRL's head on devices without Triton, which ``add_completion_head`` avoids).
    In the padding-free layout the first token of each sequence is never scored: the
    position before it is the previous sequence's last token. The mean entropy is zero
    unless ``with_entropy``; ``with_token_metrics`` adds the mean-logit sums and top-1 counts,
    ``with_aux_loss`` (MoE models only) the router load-balancing loss.
    """
    scored = batch["completion_mask"].bool()
    if is_packed(batch):
        scored = scored & (batch["position_ids"] != 0)
    labels = batch["input_ids"].masked_fill(~scored, -100)
    outputs = model(
        input_ids=batch["input_ids"],
        labels=labels,
        completion_head=True,
        with_entropy=with_entropy,
        with_token_metrics=with_token_metrics,
        with_aux_loss=with_aux_loss,
        use_cache=False,
        **layout_inputs(batch),
    )
    mask = scored[:, 1:]
    length = mask.size(1)  # prompt-learning PEFT prepends virtual tokens: keep the last positions
    log_probs = outputs.log_probs[:, -length:]
    log_probs = log_probs.to(torch.promote_types(log_probs.dtype, torch.float32))  # sum half precision in float32
    mask = mask.to(log_probs.dtype)
    lengths = sum_per_sequence(mask, batch)
    entropy_sums = _completion_sums(outputs.entropy, mask, batch)
    return CompletionScores(
        logps=sum_per_sequence(log_probs * mask, batch),
        mean_entropy=entropy_sums / lengths.clamp(min=1) if entropy_sums is not None else torch.zeros_like(lengths),
        lengths=lengths,
        mean_logit_sums=_completion_sums(outputs.mean_logits, mask, batch),
        top1_counts=_completion_sums(outputs.is_top1, mask, batch),
        aux_loss=outputs.aux_loss,
    )


def _completion_sums(
    per_position: torch.Tensor | None, mask: torch.Tensor, batch: dict[str, Any]
) -> torch.Tensor | None:
    """A per-position statistic of the head (no gradient) summed over each sequence's scored
    positions ``mask`` (rows, T - 1), (2B,); None stays None."""
    if per_position is None:
        return None
    per_position = per_position[:, -mask.size(1) :].detach().to(mask.dtype)
    return sum_per_sequence(per_position * mask, batch)


def real_tokens(batch: dict[str, Any]) -> torch.Tensor:
    """The number of real (not padding) tokens of each sequence of ``batch``, (2B,): the attention
    mask's row sums when padded; the sequence lengths (``cu_seq_lens``) when padding-free."""
    if not is_packed(batch):
        return batch["attention_mask"].sum(-1)
    return batch["cu_seq_lens"].diff()


def layout_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The model inputs that say where the sequences of ``batch`` are: the padded rows' attention
    mask; or, padding-free, the position ids (from which transformers' sdpa, eager and flex
    masks keep the sequences apart) and the sequence offsets of flash attention's varlen kernels.
    No attention mask then: with one, transformers would not read the boundaries."""
    if not is_packed(batch):
        return {"attention_mask": batch["attention_mask"]}
    offsets, longest = batch["cu_seq_lens"], batch["max_length"]
    return {
        "position_ids": batch["position_ids"],
        "cu_seq_lens_q": offsets,
        "cu_seq_lens_k": offsets,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def sum_per_sequence(values: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """(rows, T - 1) values on the shifted grid of ``batch`` (position t: token t + 1) summed per
    sequence, (2B,): over each row when padded; over each sequence's tokens (``sequence_ids``,
    a segment sum) when padding-free."""
    if not is_packed(batch):
        return values.sum(-1)
    sequence_ids = batch["sequence_ids"][:, 1:].reshape(-1)  # the sequence of the token each position scores
    return values.new_zeros(batch["cu_seq_lens"].numel() - 1).index_add(0, sequence_ids, values.reshape(-1))


def output_vocab_size(model: torch.nn.Module) -> int:
    """V of eq. 11: the number of outputs of the LM head (the support of the entropy)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None and head.weight.dim() == 2:
        if head.weight.shape[0] > 0:  # ZeRO-3 shards parameters to empty tensors
            return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def router_aux_loss_coef(model: torch.nn.Module, coef: float | None) -> float:
    """The weight of an MoE model's router load-balancing loss in the training loss, as TRL's: ``coef``,
    or (None) the model config's own ``router_aux_loss_coef`` (0 without one); 0 for a dense model,
    where a ``coef`` > 0 is a ValueError."""
    if not is_moe(model.config):
        if coef:
            raise ValueError(
                f"router_aux_loss_coef is {coef}, but {type(model).__name__} is not a Mixture-of-Experts model "
                "that returns its router logits, so there is no load-balancing loss to weight; leave it unset or 0"
            )
        return 0.0
    own = getattr(model.config.get_text_config(), "router_aux_loss_coef", None) or 0.0
    return float(own if coef is None else coef)
