"""Training for the bandit experiment: the run constants and ``BanditConfig``, the
library loss (``bandit_losses``) and its autograd gradient, the closed-form step (link
log-derivatives psi), plain SGD on every method and beta at once (``train``,
``run_bandit``) and the check of the step against autograd through ``preference_loss``."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import expit

from mallowspo.experiments.bandit.problem import (
    N_ARMS,
    N_PAIRS,
    _softmax,
    expected_reward,
    incidence_matrix,
    kl_divergence,
    pair_indices,
)
from mallowspo.links import cubic_patch_coefficients, log_phi_link, log_phi_link_derivative, smoothing_eps
from mallowspo.losses import preference_loss

FRONTIER_BETAS = (0.05, 0.1, 0.5, 1.0)  # the four policies of Fig. 8b
DEFAULT_BETAS = tuple(float(b) for b in np.logspace(-2, 1, 16))  # 0.01 .. 10, includes 0.1 and 1

# Each method: the keyword arguments of preference_loss (loss_type is always "sigmoid").
METHODS: dict[str, dict] = {
    "dpo": {"mallows": "none"},
    "phi-sigmoid": {"mallows": "phi", "phi_smoothing": "sigmoid"},
    "phi-cubic-0.1": {"mallows": "phi", "phi_smoothing": "cubic", "smoothing_eps": 0.1},
    "phi-cubic-adaptive": {"mallows": "phi", "phi_smoothing": "cubic", "smoothing_eps": "adaptive"},
}
METHOD_LABELS = {
    "dpo": "DPO",
    "phi-sigmoid": "MallowsPO-phi (sigmoid)",
    "phi-cubic-0.1": "MallowsPO-phi (cubic, eps=0.1)",
    "phi-cubic-adaptive": "MallowsPO-phi (cubic, eps=-2 log phi)",
}


# ----------------------------------------------------------------------------------------
# The library loss (the reference) and its gradient in closed form (the training step).
# ----------------------------------------------------------------------------------------


def bandit_losses(logits: torch.Tensor, betas: torch.Tensor, method: str, neg_log_phi: float) -> torch.Tensor:
    """Mean ``preference_loss`` over the 16 pairs for each row of ``logits``.

    Args:
        logits: (nb, 5) policy logits, row b trained with beta ``betas[b]``.
        betas: (nb,) KL strengths.
        method: a key of ``METHODS``.
        neg_log_phi: -log phi of every pair (ignored by DPO).
    Returns:
        (nb,) the batch (mean) loss of each policy.

    preference_loss takes a scalar beta and depends on beta only through
    z = beta * Delta, so the log-probs of row b are multiplied by beta_b and the call
    uses beta = 1 (a test checks this against per-beta calls).
    """
    nb = logits.shape[0]
    w, l = pair_indices()
    scaled = torch.log_softmax(logits, dim=-1) * betas[:, None]  # beta * log pi
    ref = (betas * math.log(1.0 / N_ARMS))[:, None].expand(nb, N_PAIRS).reshape(-1)  # beta * log pi_ref
    out = preference_loss(
        scaled[:, w].reshape(-1),
        scaled[:, l].reshape(-1),
        ref,
        ref,
        loss_type="sigmoid",
        beta=1.0,
        neg_log_phi=torch.full((nb * N_PAIRS,), neg_log_phi, dtype=logits.dtype),
        **METHODS[method],
    )
    return out.losses.view(nb, N_PAIRS).mean(dim=1)


def library_gradient(logits: np.ndarray, betas: np.ndarray, method: str, neg_log_phi: float) -> np.ndarray:
    """Autograd of ``bandit_losses`` (i.e. of preference_loss) w.r.t. (nb, 5) logits, float64."""
    t = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    loss = bandit_losses(t, torch.tensor(betas, dtype=torch.float64), method, neg_log_phi).sum()
    (grad,) = torch.autograd.grad(loss, t)  # rows are independent policies
    return grad.numpy()


def link_log_derivative(method: str, neg_log_phi: float) -> Callable[[np.ndarray], np.ndarray]:
    """psi(z) = d log g(z) / dz of ``method``'s link, as a numpy function of z (any shape).

    psi is what the loss -log g(z) needs: d(-log g)/dz = -psi. The cubic patch
    coefficients and half-width come from ``mallowspo.links`` (computed once here).
    """
    kwargs = METHODS[method]
    L = float(neg_log_phi)
    if kwargs["mallows"] == "none":
        return lambda z: expit(-z)
    if kwargs["phi_smoothing"] == "sigmoid":
        return lambda z: L * expit(-L * z)
    if kwargs["phi_smoothing"] != "cubic":
        raise ValueError(f"no closed-form step for {method!r}")
    L_t = torch.tensor([L], dtype=torch.float64)
    eps_t = smoothing_eps(L_t, kwargs["smoothing_eps"])
    a3_t, a1_t, log_one_minus_G_t, D_t = cubic_patch_coefficients(eps_t, L_t)
    eps, a3, a1 = float(eps_t), float(a3_t), float(a1_t)
    one_minus_G, D = float(torch.exp(log_one_minus_G_t)), float(D_t)

    def patch_psi(z: np.ndarray) -> np.ndarray:
        """P'(z) / P(z) on [-eps, eps]; the lower half's P as the links module writes it (no cancellation)."""
        t = np.clip(-z, 0.0, None)
        lower = one_minus_G + (eps - t) * (D - a3 * (eps - t) * (t + 2.0 * eps))
        upper = (a3 * z * z + a1) * z + 0.5
        return (3.0 * a3 * z * z + a1) / np.where(z >= 0, upper, lower)

    def psi(z: np.ndarray) -> np.ndarray:
        inside = np.abs(z) <= eps
        out = np.empty_like(z)
        out[inside] = patch_psi(z[inside])
        if not inside.all():
            zo = torch.from_numpy(z[~inside])
            out[~inside] = torch.exp(log_phi_link_derivative(zo, L_t) - log_phi_link(zo, L_t)).numpy()
        return out

    return psi


def closed_form_gradient(
    logits: np.ndarray, betas: np.ndarray, psi: Callable[[np.ndarray], np.ndarray], incidence: np.ndarray
) -> np.ndarray:
    """d/dlogits of the mean loss over the pairs, for (..., nb, 5) logits and (nb,) betas.

    grad = -(beta / 16) sum_k psi(z_k) (e_{w_k} - e_{l_k}), z_k = beta (theta_{w_k} - theta_{l_k}).
    """
    z = betas[:, None] * (logits @ incidence.T)
    return -(betas[:, None] / incidence.shape[0]) * (psi(z) @ incidence)


def dpo_gradient_closed_form(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """The DPO gradient written out by hand (an independent cross-check), one policy (5,):

    dL/dlogit_j = -(beta/16) sum_k sigmoid(-beta Delta_k) (1[w_k = j] - 1[l_k = j]).
    """
    w, l = pair_indices()
    weight = torch.sigmoid(-beta * (logits[w] - logits[l])) * beta / N_PAIRS
    grad = torch.zeros_like(logits)
    grad.index_add_(0, w, -weight)
    grad.index_add_(0, l, weight)
    return grad


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BanditConfig:
    epochs: int = 500_000
    betas: tuple[float, ...] = DEFAULT_BETAS
    lr: float = 5e-3
    phi: float = 0.05
    seed: int = 0
    record_every: int = 100
    tail: int = 30  # epochs averaged for the frontier over beta
    check_every: int = 10_000  # epochs between comparisons with autograd through preference_loss
    methods: tuple[str, ...] = tuple(METHODS)

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not 0.0 < self.phi < 1.0:
            raise ValueError(f"phi must lie in (0, 1), got {self.phi}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if min(self.record_every, self.tail, self.check_every) < 1:
            raise ValueError("record_every, tail and check_every must be >= 1")
        if any(not b > 0 for b in self.betas):
            raise ValueError(f"betas must be > 0, got {self.betas}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown or no method(s) {unknown}; choose from {list(METHODS)}")
        # The beta grid always holds the four frontier betas; sorted, duplicates removed.
        grid = sorted(set(round(float(b), 12) for b in (*self.betas, *FRONTIER_BETAS)))
        object.__setattr__(self, "betas", tuple(grid))

    @property
    def neg_log_phi(self) -> float:
        return -math.log(self.phi)


@dataclass
class MethodRun:
    """What training recorded for one method; arrays over records r and betas b."""

    method: str
    epochs_recorded: np.ndarray  # (R,) epoch of each record (0 = initial policy)
    probs: np.ndarray  # (R, nb, 5) arm probabilities
    tail_reward: np.ndarray  # (nb,) reward averaged over the last `tail` epochs
    tail_kl: np.ndarray  # (nb,)
    final_probs: np.ndarray  # (nb, 5)
    library_check_max_rel_diff: float  # max |closed form - autograd(preference_loss)| / max |autograd|
    library_checks: int
    nonfinite_steps: int = 0  # steps whose gradient had a NaN/inf entry (the step is then skipped)


def _check_against_library(logits: np.ndarray, betas: np.ndarray, method: str, L: float, grad: np.ndarray) -> float:
    ref = library_gradient(logits, betas, method, L)
    scale = np.abs(ref).max(axis=-1, keepdims=True)  # per policy
    return float((np.abs(grad - ref) / np.maximum(scale, 1e-300)).max())


def train(cfg: BanditConfig, progress: bool = True) -> dict[str, MethodRun]:
    """Plain SGD on every method and beta at once; see the docstring of ``mallowspo.experiments.bandit``."""
    torch.manual_seed(cfg.seed)  # nothing is random; kept so that a seed is recorded
    np.random.seed(cfg.seed)
    methods, L = cfg.methods, cfg.neg_log_phi
    betas = np.array(cfg.betas)
    nm, nb = len(methods), len(betas)
    D = incidence_matrix()
    psis = [link_log_derivative(m, L) for m in methods]
    logits = np.zeros((nm, nb, N_ARMS))
    grad = np.empty_like(logits)

    n_records = cfg.epochs // cfg.record_every + 1
    probs_rec = np.empty((n_records, nm, nb, N_ARMS))
    epochs_rec = np.zeros(n_records, dtype=np.int64)
    probs_rec[0] = _softmax(logits)
    r = 1
    tail_start = max(cfg.epochs - cfg.tail + 1, 1)
    tail_reward, tail_kl = np.zeros((nm, nb)), np.zeros((nm, nb))
    check_diff, checks, nonfinite = np.zeros(nm), 0, np.zeros(nm, dtype=np.int64)

    start = time.perf_counter()
    report_every = max(cfg.epochs // 10, 1)
    for epoch in range(1, cfg.epochs + 1):
        for i, psi in enumerate(psis):
            grad[i] = closed_form_gradient(logits[i], betas, psi, D)
        if epoch % cfg.check_every == 0 or epoch == 1 or epoch == cfg.epochs:
            checks += 1
            for i, m in enumerate(methods):
                check_diff[i] = max(check_diff[i], _check_against_library(logits[i], betas, m, L, grad[i]))
        finite = np.isfinite(grad).all(axis=(1, 2))
        if not finite.all():
            nonfinite += ~finite
            grad[~finite] = 0.0
        logits -= cfg.lr * grad
        if epoch % cfg.record_every == 0:
            probs_rec[r], epochs_rec[r] = _softmax(logits), epoch
            r += 1
        if epoch >= tail_start:
            p = _softmax(logits)
            tail_reward += expected_reward(p)
            tail_kl += kl_divergence(p)
        if progress and cfg.epochs >= 10_000 and epoch % report_every == 0:
            el = time.perf_counter() - start
            print(
                f"  epoch {epoch}/{cfg.epochs}  {el:.0f}s elapsed, ~{el / epoch * (cfg.epochs - epoch):.0f}s left",
                file=sys.stderr,
                flush=True,
            )
    n_tail = cfg.epochs - tail_start + 1
    final = _softmax(logits)
    return {
        m: MethodRun(
            method=m,
            epochs_recorded=epochs_rec[:r],
            probs=probs_rec[:r, i],
            tail_reward=tail_reward[i] / n_tail,
            tail_kl=tail_kl[i] / n_tail,
            final_probs=final[i],
            library_check_max_rel_diff=float(check_diff[i]),
            library_checks=checks,
            nonfinite_steps=int(nonfinite[i]),
        )
        for i, m in enumerate(methods)
    }


def run_bandit(cfg: BanditConfig, progress: bool = True) -> dict[str, MethodRun]:
    """Train every method of ``cfg``; returns {method: run}."""
    return train(cfg, progress)
