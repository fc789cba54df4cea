"""Scoring a batch: the summed completion log-probs (and mean entropies) of each sequence of a
``PreferenceCollator`` batch, through the completion head (``mallowspo.training.head``).

The training step, the per-step reference and the reference pass all score with this."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mallowspo.dispersion import mean_completion_entropy


@dataclass
class CompletionScores:
    """Per-sequence scores of a concatenated batch, each (2B,): chosen rows first.

    logps: summed log-probs of the completion tokens (carries gradient if the model does).
    mean_entropy: mean next-token entropy over the completion positions (no gradient).
    lengths: number of completion tokens.
    """

    logps: torch.Tensor
    mean_entropy: torch.Tensor
    lengths: torch.Tensor


def score_completions(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], with_entropy: bool = False
) -> CompletionScores:
    """Run ``model`` (patched by ``mallowspo.training.head.add_completion_head``) on a ``PreferenceCollator`` batch.

    Position t of the head's outputs scores token t + 1, so the completion mask is shifted
    by one. Prompt tokens get the label -100 and are not projected through the LM head
    (except by TRL's head on devices without Triton, which ``add_completion_head`` avoids).
    The mean entropy is zero unless ``with_entropy``.
    """
    completion_mask = batch["completion_mask"]
    labels = batch["input_ids"].masked_fill(completion_mask == 0, -100)
    outputs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=labels,
        completion_head=True,
        with_entropy=with_entropy,
        use_cache=False,
    )
    mask = completion_mask[:, 1:]
    length = mask.size(1)  # prompt-learning PEFT prepends virtual tokens: keep the last positions
    log_probs = outputs.log_probs[:, -length:]
    log_probs = log_probs.to(torch.promote_types(log_probs.dtype, torch.float32))  # sum half precision in float32
    mask = mask.to(log_probs.dtype)
    mean_entropy = (
        mean_completion_entropy(outputs.entropy[:, -length:].detach(), mask)
        if outputs.entropy is not None
        else torch.zeros_like(log_probs[:, 0]).detach()
    )
    return CompletionScores(logps=(log_probs * mask).sum(-1), mean_entropy=mean_entropy, lengths=mask.sum(-1))


def output_vocab_size(model: torch.nn.Module) -> int:
    """V of eq. 11: the number of outputs of the LM head (the support of the entropy)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None and head.weight.dim() == 2:
        if head.weight.shape[0] > 0:  # ZeRO-3 shards parameters to empty tensors
            return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)
