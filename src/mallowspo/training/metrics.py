"""Training and evaluation metrics: TRL's DPO names plus ``mallows/*``, pooled per example
over micro-batches, accumulation steps, processes and log steps.

TRL's token metrics (``entropy``, ``logits/chosen``, ``logits/rejected``, ``mean_token_accuracy``)
are token-weighted means. Each is carried per pair as two hidden columns, its sum over the
pair's tokens (``name::sum``) and their number (``name::tokens``), and divided only when read:
the logged value is the mean over every token since the last log, however the pairs were
split into micro-batches, processes and steps. ``num_tokens`` is a running total, set by the trainer.
"""

from __future__ import annotations

import torch

from mallowspo.losses import PreferenceLossOutput
from mallowspo.training.collate import split_pairs
from mallowspo.training.scoring import CompletionScores, real_tokens

HIDDEN = "::"  # a column whose name holds this is pooled but not logged as it is
SUM, TOKENS = f"{HIDDEN}sum", f"{HIDDEN}tokens"  # the numerator and denominator of a token-weighted metric
TOKENS_SEEN = f"num_tokens{HIDDEN}seen"  # the real (attention) tokens of each pair, summed into num_tokens


def pair_metrics(
    output: PreferenceLossOutput, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, inputs: dict, mallows: str
) -> dict[str, torch.Tensor]:
    """The per-pair metrics of one batch, each (B,), under TRL's names plus ``mallows/*``."""
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
    if "ref_chosen_entropy" in inputs and mallows != "none":
        per_example["mallows/ref_entropy_mean"] = 0.5 * (inputs["ref_chosen_entropy"] + inputs["ref_rejected_entropy"])
    return per_example


def token_weighted(name: str, sums: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two hidden per-pair columns of the token-weighted metric ``name``: per-pair sums over
    tokens and the numbers of those tokens, each (B,)."""
    return {f"{name}{SUM}": sums, f"{name}{TOKENS}": tokens}


def token_metrics(scores: CompletionScores, batch: dict) -> dict[str, torch.Tensor]:
    """TRL's token metrics of one batch as hidden per-pair columns, each (B,): the mean next-token
    ``entropy`` over the completion tokens of both responses, the mean over completion tokens of
    the mean logit over the vocabulary (``logits/chosen``, ``logits/rejected``), the share of the
    chosen completion tokens whose label has the largest logit (``mean_token_accuracy``), and the
    real tokens of the pair (``TOKENS_SEEN``). ``scores`` must come with the entropy and token metrics."""
    chosen_tokens, rejected_tokens = split_pairs(scores.lengths)
    chosen_entropy, rejected_entropy = split_pairs(scores.mean_entropy * scores.lengths)
    chosen_logits, rejected_logits = split_pairs(scores.mean_logit_sums)
    chosen_top1, _ = split_pairs(scores.top1_counts)
    chosen_seen, rejected_seen = split_pairs(real_tokens(batch))
    return {
        **token_weighted("entropy", chosen_entropy + rejected_entropy, chosen_tokens + rejected_tokens),
        **token_weighted("logits/chosen", chosen_logits, chosen_tokens),
        **token_weighted("logits/rejected", rejected_logits, rejected_tokens),
        **token_weighted("mean_token_accuracy", chosen_top1, chosen_tokens),
        TOKENS_SEEN: (chosen_seen + rejected_seen).to(chosen_tokens.dtype),
    }


class MetricAccumulator:
    """Per-example metrics pooled across micro-batches, accumulation steps, processes and
    log steps until read: each mean is over all examples seen since the last ``pop``, each
    token-weighted metric (``token_weighted``) over all their tokens; ``set`` values are read as they are."""

    WITH_EXTREMES = ("mallows/neg_log_phi",)

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sum: dict[str, float] = {}
        self._count: dict[str, int] = {}
        self._min: dict[str, float] = {}
        self._max: dict[str, float] = {}
        self._values: dict[str, float] = {}

    def update(self, names: list[str], values: torch.Tensor) -> dict[str, float] | None:
        """Add per-example ``values`` (N, M), already gathered from all processes: column i is
        metric ``names[i]``; columns past ``len(names)`` are only checked for finiteness.

        One device-to-host copy (sums, minima, maxima and a finiteness flag together), so a
        GPU step waits once. Returns the sum of each named column (what was added), or None,
        adding nothing, if any value is NaN or inf."""
        values = values.detach().float()
        if values.numel() == 0:
            return {name: 0.0 for name in names}
        k = len(names)
        finite = torch.isfinite(values).all().to(values.dtype).reshape(1)
        named = values[:, :k]
        stats = torch.cat([named.sum(0), named.amin(0), named.amax(0), finite]).double().cpu().tolist()
        if not stats[-1]:
            return None
        for i, name in enumerate(names):
            self._sum[name] = self._sum.get(name, 0.0) + stats[i]
            self._count[name] = self._count.get(name, 0) + values.size(0)
            self._min[name] = min(self._min.get(name, float("inf")), stats[k + i])
            self._max[name] = max(self._max.get(name, float("-inf")), stats[2 * k + i])
        return dict(zip(names, stats[:k]))

    def set(self, name: str, value: float) -> None:
        """Read ``value`` as metric ``name`` at the next pop (the latest set wins), e.g. a running total."""
        self._values[name] = value

    def pop(self) -> dict[str, float]:
        """The means (and ``_min``/``_max`` for ``WITH_EXTREMES``), the token-weighted means (0 without
        tokens, as TRL) and the set values since the last pop; then reset."""
        out: dict[str, float] = {}
        for name, total in self._sum.items():
            if name.endswith(SUM):
                metric = name[: -len(SUM)]
                tokens = self._sum[f"{metric}{TOKENS}"]
                out[metric] = total / tokens if tokens > 0 else 0.0
            elif HIDDEN in name:
                continue
            elif name in self.WITH_EXTREMES:
                mean = total / self._count[name]
                out[f"{name}_mean"], out[f"{name}_min"], out[f"{name}_max"] = mean, self._min[name], self._max[name]
            else:
                out[name] = total / self._count[name]
        out.update(self._values)
        self.reset()
        return out


def non_finite_message(names: list[str], stacked: torch.Tensor, step: int, training: bool) -> str:
    """Why training stops instead of logging NaN: which metrics, how many pairs, the usual causes."""
    bad = ~torch.isfinite(stacked)
    which = [name for i, name in enumerate(names) if bool(bad[:, i].any())]
    pairs = int(bad.any(dim=1).sum())
    phase = "training" if training else "evaluation"
    return (
        f"NaN or inf {', '.join(which)} at step {step} ({phase})"
        f" for {pairs} of {stacked.size(0)} pairs in the batch. Usual causes: float16 overflow (use bf16 or "
        "float32), a learning rate too high (the policy diverged), or NaN in the model weights. Checkpoints "
        "saved before this step are intact (--resume_from_checkpoint)."
    )
