"""Metrics of a list batch, per prompt (B,), under TRL's names (``training.metrics``), pooled the same way.

rewards/chosen, rewards/rejected   the mean implicit reward of the best / worst ranked responses
                                   (a tied group is averaged): TRL's chosen and rejected
rewards/margins, rewards/accuracies   their difference, and whether the best one's is higher
rewards/kendall_tau                Kendall's tau between the implicit-reward order and the observed
                                   order: the mean over the untied observed pairs (i above j) of
                                   sign(r_i - r_j), in [-1, 1] (0 when the policy is the reference)
logps/chosen, logps/rejected       the mean policy log-prob of the best / worst ranked responses
mallows/neg_log_phi, mallows/ref_entropy_mean   the dispersion, and the mean reference entropy
                                   over the prompt's responses
entropy, logits/chosen, logits/rejected, mean_token_accuracy, num_tokens   TRL's token metrics:
                                   the entropy over all responses' tokens, the logits and the
                                   accuracy over the best (chosen) / worst (rejected) responses' tokens
"""

from __future__ import annotations

import torch

from mallowspo.listwise import ListwiseLossOutput
from mallowspo.training.list_collate import scatter_responses
from mallowspo.training.metrics import TOKENS_SEEN, token_weighted
from mallowspo.training.scoring import CompletionScores, real_tokens


def extreme_ranks(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) bool: the present responses at the best (lowest) and at the worst (highest) rank."""
    mask, ranks = batch["list_mask"], batch["ranks"]
    big = torch.iinfo(ranks.dtype).max
    best = torch.where(mask, ranks, torch.full_like(ranks, big)).amin(dim=1, keepdim=True)
    worst = torch.where(mask, ranks, torch.full_like(ranks, -big)).amax(dim=1, keepdim=True)
    return mask & (ranks == best), mask & (ranks == worst)


def _mean_over(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """(B,) mean of (B, K) ``values`` over the entries ``where``."""
    return torch.where(where, values, torch.zeros_like(values)).sum(dim=1) / where.sum(dim=1).to(values.dtype)


def list_metrics(
    output: ListwiseLossOutput, logps: torch.Tensor, batch: dict, mallows: str
) -> dict[str, torch.Tensor]:
    """The per-prompt reward, ranking and dispersion metrics of one batch (module docstring)."""
    best, worst = extreme_ranks(batch)
    logps = logps.detach()
    per_example = {
        "rewards/chosen": output.best_rewards,
        "rewards/rejected": output.worst_rewards,
        "rewards/margins": output.best_rewards - output.worst_rewards,
        "rewards/accuracies": (output.best_rewards > output.worst_rewards).to(output.best_rewards.dtype),
        "rewards/kendall_tau": output.kendall_tau,
        "logps/chosen": _mean_over(logps, best),
        "logps/rejected": _mean_over(logps, worst),
    }
    if "neg_log_phi" in batch:
        per_example["mallows/neg_log_phi"] = batch["neg_log_phi"]
    if "ref_entropy" in batch and mallows != "none":
        per_example["mallows/ref_entropy_mean"] = _mean_over(batch["ref_entropy"], batch["list_mask"])
    return per_example


def list_token_metrics(scores: CompletionScores, batch: dict) -> dict[str, torch.Tensor]:
    """TRL's token metrics of one list batch as hidden per-prompt columns (``training.metrics.token_metrics``)."""
    mask = batch["list_mask"]
    best, worst = extreme_ranks(batch)

    def total(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        grid = scatter_responses(values.detach().to(scores.lengths.dtype), batch)
        return torch.where(where, grid, torch.zeros_like(grid)).sum(dim=1)

    return {
        **token_weighted("entropy", total(scores.mean_entropy * scores.lengths, mask), total(scores.lengths, mask)),
        **token_weighted("logits/chosen", total(scores.mean_logit_sums, best), total(scores.lengths, best)),
        **token_weighted("logits/rejected", total(scores.mean_logit_sums, worst), total(scores.lengths, worst)),
        **token_weighted("mean_token_accuracy", total(scores.top1_counts, best), total(scores.lengths, best)),
        TOKENS_SEEN: total(real_tokens(batch), mask),
    }
