"""The bandit of the paper's §5.2 (App. C.1): five arms with random rewards, the 16
observed preference pairs, the exact expected reward and KL of a policy, the pair
incidence matrix and the softmax of logits."""

from __future__ import annotations

import numpy as np
import torch

# ----------------------------------------------------------------------------------------
# The bandit (App. C.1). Arms are numbered 1..5 in the paper, 0..4 here.
# ----------------------------------------------------------------------------------------

ARM_VALUES = ((20.0, 11.0), (30.0, 3.0), (18.0, 15.0), (15.0, 10.0), (1.0, 4.0))
ARM_PROBS = ((0.5, 0.5), (0.5, 0.5), (0.5, 0.5), (0.99, 0.01), (0.99, 0.01))
N_ARMS = len(ARM_VALUES)
# (winner, loser), 1-based as printed in the paper, in the paper's order.
PAIRS = (
    (3, 5), (2, 5), (2, 5), (1, 2), (3, 5), (1, 5), (1, 4), (1, 5),
    (4, 5), (2, 4), (2, 1), (2, 5), (1, 3), (3, 5), (3, 4), (4, 2),
)  # fmt: skip
N_PAIRS = len(PAIRS)


def arm_expected_rewards() -> np.ndarray:
    """E[R_i] of the five arms, (5,): 15.5, 16.5, 16.5, 14.95, 1.03."""
    return np.array([sum(v * p for v, p in zip(vals, probs)) for vals, probs in zip(ARM_VALUES, ARM_PROBS)])


def expected_reward(probs: np.ndarray) -> np.ndarray:
    """Exact expected reward sum_i pi_i E[R_i] of policies given as probabilities on the last axis."""
    return np.asarray(probs, dtype=np.float64) @ arm_expected_rewards()


def kl_divergence(probs: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
    """Exact KL(pi || ref) in nats on the last axis, 0 log 0 = 0; ref defaults to uniform."""
    p = np.asarray(probs, dtype=np.float64)
    q = np.full(p.shape[-1], 1.0 / p.shape[-1]) if ref is None else np.asarray(ref, dtype=np.float64)
    safe_p = np.where(p > 0, p, 1.0)
    return np.where(p > 0, p * (np.log(safe_p) - np.log(q)), 0.0).sum(axis=-1)


def pair_indices() -> tuple[torch.Tensor, torch.Tensor]:
    """0-based (winners, losers), each (16,)."""
    w = torch.tensor([a - 1 for a, _ in PAIRS])
    l = torch.tensor([b - 1 for _, b in PAIRS])
    return w, l


def incidence_matrix() -> np.ndarray:
    """(16, 5) D with D[k, w_k] = 1, D[k, l_k] = -1, so theta @ D.T = theta_w - theta_l per pair."""
    d = np.zeros((N_PAIRS, N_ARMS))
    for k, (w, l) in enumerate(PAIRS):
        d[k, w - 1], d[k, l - 1] = 1.0, -1.0
    return d


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
