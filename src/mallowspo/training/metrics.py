"""Training and evaluation metrics: TRL's DPO names plus ``mallows/*``, pooled per example
over micro-batches, accumulation steps, processes and log steps."""

from __future__ import annotations

import torch

from mallowspo.losses import PreferenceLossOutput


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
