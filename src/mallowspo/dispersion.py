"""The entropy-based dispersion estimator (paper §3.3, eqs. 10, 11, 17).

No model of phi(x) is trained. The reference model's predictive entropy on the two
responses is a proxy for the dispersion of preferences on the prompt:

    Hbar(x)     = 1/2 [ Hw / (|yw| log V) + Hl / (|yl| log V) ]          (eq. 11, per-token mean)
    -log phi(x) ~= -phi* log Hbar(x)                                       (eq. 10)

Hbar lies in [0, 1]: 0 when the reference model is certain of every token, 1 at the
uniform distribution. phi* is chosen so that the dataset mean of the estimate is 1
("as in DPO"), or fixed (the authors' code uses 0.29 for Llama3-8B-Instruct).

All functions here run under ``torch.no_grad``: the estimate is a constant of the frozen
reference model and the example, and carries no gradient.
"""

from __future__ import annotations

import math

import torch

DEFAULT_MIN_HBAR = 1e-6  # bounds -log Hbar by 13.8 when the reference is certain
AUTHORS_PHI_STAR = 0.29  # the constant in the authors' code (Llama3-8B-Instruct, UltraFeedback)


@torch.no_grad()
def mean_completion_entropy(token_entropy: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean of per-token entropies over completion tokens (nats).

    Args:
        token_entropy: (B, T) entropy of the next-token distribution at each position.
        completion_mask: (B, T) 1 where the position predicts a completion token.
    Returns:
        (B,) mean entropy per completion token; 0 for a sequence with no completion token.
    """
    mask = completion_mask.to(token_entropy.dtype)
    return (token_entropy * mask).sum(-1) / mask.sum(-1).clamp(min=1)


@torch.no_grad()
def normalized_entropy(
    chosen_mean_entropy: torch.Tensor, rejected_mean_entropy: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """Hbar(x), eq. 11: the mean of the two per-token mean entropies divided by log V, in [0, 1]."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    hbar = 0.5 * (chosen_mean_entropy + rejected_mean_entropy) / math.log(vocab_size)
    return hbar.clamp(0.0, 1.0)


@torch.no_grad()
def neg_log_phi_from_entropy(
    hbar: torch.Tensor, phi_star: float = 1.0, min_hbar: float = DEFAULT_MIN_HBAR
) -> torch.Tensor:
    """Eq. 10: -log phi(x) ~= -phi* log Hbar(x), with Hbar floored at ``min_hbar`` so the
    estimate stays finite when the reference model is certain (Hbar = 0)."""
    if not 0 < min_hbar < 1:
        raise ValueError(f"min_hbar must lie in (0, 1), got {min_hbar}")
    return -phi_star * torch.log(hbar.clamp(min_hbar, 1.0))


@torch.no_grad()
def fit_phi_star(hbar: torch.Tensor, min_hbar: float = DEFAULT_MIN_HBAR) -> float:
    """phi* such that the mean of -phi* log Hbar over ``hbar`` is 1 (the paper's choice)."""
    mean_raw = float(neg_log_phi_from_entropy(hbar.double(), 1.0, min_hbar).mean())
    if not mean_raw > 1e-12:
        raise ValueError(
            "the reference model is at maximum entropy (Hbar = 1) on every example, so the mean-1 "
            "normalisation of the dispersion is undefined; use a fixed phi_star or a fixed dispersion"
        )
    return 1.0 / mean_raw


@torch.no_grad()
def estimate_neg_log_phi(
    hbar: torch.Tensor,
    phi_star: float | str = "mean",
    clamp: tuple[float, float] | None = None,
    min_hbar: float = DEFAULT_MIN_HBAR,
) -> tuple[torch.Tensor, float]:
    """The per-pair estimate of -log phi(x) for a whole dataset.

    Args:
        hbar: (N,) normalised mean entropies (``normalized_entropy``), one per pair.
        phi_star: "mean" to normalise the dataset mean to 1, or a fixed positive constant.
        clamp: optional (min, max) bounds applied after normalisation.
        min_hbar: floor on Hbar (bounds the estimate when the entropy is 0).
    Returns:
        (estimates (N,), phi_star used).
    """
    if isinstance(phi_star, str):
        if phi_star != "mean":
            raise ValueError(f"phi_star must be 'mean' or a positive number, got {phi_star!r}")
        phi_star = fit_phi_star(hbar, min_hbar)
    elif not phi_star > 0:
        raise ValueError(f"phi_star must be > 0, got {phi_star}")
    estimate = neg_log_phi_from_entropy(hbar, float(phi_star), min_hbar)
    if clamp is not None:
        low, high = clamp
        if not 0 <= low <= high:
            raise ValueError(f"dispersion clamp needs 0 <= min <= max, got ({low}, {high})")
        estimate = estimate.clamp(low, high)
    return estimate, float(phi_star)


@torch.no_grad()
def entropy_dispersion(
    chosen_token_entropy: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_token_entropy: torch.Tensor,
    rejected_mask: torch.Tensor,
    vocab_size: int,
    phi_star: float | str = "mean",
    clamp: tuple[float, float] | None = None,
    min_hbar: float = DEFAULT_MIN_HBAR,
) -> torch.Tensor:
    """Eqs. 10-11 end to end: per-token entropies with completion masks -> (B,) estimates.

    With ``phi_star="mean"`` the normalisation uses this batch as the dataset; the trainer
    instead computes Hbar for every example first and normalises once over the dataset.
    """
    hbar = normalized_entropy(
        mean_completion_entropy(chosen_token_entropy, chosen_mask),
        mean_completion_entropy(rejected_token_entropy, rejected_mask),
        vocab_size,
    )
    return estimate_neg_log_phi(hbar, phi_star, clamp, min_hbar)[0]
