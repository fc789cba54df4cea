"""The Mallows ranking model (paper §3.1, eq. 5), in numpy.

    P(mu | mu0, phi, d) = phi^{d(mu, mu0)} / Z(phi, d),        phi in [0, 1]

Conventions used throughout this module:

- A ranking of n items is a *rank vector* ``r`` of length n: ``r[i]`` is the rank of
  item i, 0 = best. Every function takes rank vectors on the last axis and broadcasts
  over leading axes.
- Unless a ``center`` is given, the central ranking mu0 is the identity: item i has
  central rank i.
- ``phi = 0`` puts all mass on mu0 and ``phi = 1`` is uniform over the n! rankings; both
  ends are allowed everywhere and give finite values (a log-probability of -inf for a
  ranking that has probability 0 is the one exception, and it is exact).
- Internally ``L = -log(phi)`` in [0, inf] is used, with expm1/log1p forms that stay
  accurate as phi -> 1 (L -> 0) and as phi -> 0 (L -> inf).

Two distances (paper §3.1): Kendall's tau (Mallows-phi, the number of discordant pairs)
and Spearman's rho (Mallows-theta, the sum of squared rank differences). The Kendall
model has a product-form normaliser, an exact sampler (the repeated insertion model) and
exact pairwise marginals (eq. 9), which are implemented here.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import brentq
from scipy.special import xlogy

from mallowspo.links import phi_link, theta_link

__all__ = [
    "KendallFit",
    "all_rankings",
    "borda_center",
    "first_place_probs",
    "fit_phi_kendall",
    "kendall_distance",
    "kendall_expected_distance",
    "kendall_log_normalizer",
    "kendall_normalizer",
    "log_prob_kendall",
    "pairwise_prob",
    "sample_kendall",
    "spearman_distance",
]

MAX_ENUMERATED_ITEMS = 8  # all_rankings(8) has 40320 rows; beyond that, enumeration is a mistake


# ----------------------------------------------------------------------------- checks


def _check_n(n: int) -> int:
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"the number of items n must be an integer >= 1, got {n!r}")
    return int(n)


def _check_phi(phi: ArrayLike) -> NDArray[np.float64]:
    phi = np.asarray(phi, dtype=np.float64)
    if np.any(np.isnan(phi)) or np.any(phi < 0.0) or np.any(phi > 1.0):
        raise ValueError(f"the dispersion phi must lie in [0, 1] (0 = point mass, 1 = uniform), got {phi}")
    return phi


def _neg_log_phi(phi: NDArray[np.float64]) -> NDArray[np.float64]:
    """L = -log(phi) in [0, inf]; phi = 0 gives inf without a warning, phi = 1 gives +0."""
    with np.errstate(divide="ignore"):
        return np.abs(-np.log(phi))  # abs turns -0.0 into +0.0


def _check_rank_vectors(r: ArrayLike, name: str) -> NDArray[np.int64]:
    r = np.asarray(r)
    if r.ndim < 1 or r.shape[-1] < 1:
        raise ValueError(f"{name} must have the items on its last axis, got shape {r.shape}")
    if not np.issubdtype(r.dtype, np.integer):
        if not np.all(np.isfinite(r)) or not np.all(r == np.round(r)):
            raise ValueError(f"{name} must hold integer ranks 0..n-1")
    return r.astype(np.int64, copy=False)


def _recip_expm1(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """1/expm1(x) = e^{-x}/(1 - e^{-x}) for x in (0, inf], written so large x never overflows."""
    return np.exp(-x) / -np.expm1(-x)


def _recip_expm1_tail(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """f(x) = 1/expm1(x) - 1/x + 1/2 for x in [0, inf], without cancellation.

    f is smooth with f(0) = 0, f(x) ~ x/12 near 0 and f(inf) = 1/2. It isolates the part of
    1/expm1(x) that survives the differences in eqs. 9 and in E[d], whose leading 1/x terms
    cancel exactly. Near 0 the Bernoulli series 1/expm1(x) = 1/x - 1/2 + x/12 - x^3/720 +
    x^5/30240 - x^7/1209600 + O(x^9) is used.
    """
    x = np.asarray(x, dtype=np.float64)
    small = x < 0.1
    xs = np.where(small, x, 0.0)
    x2 = xs * xs
    series = xs * (1 / 12 - x2 * (1 / 720 - x2 * (1 / 30240 - x2 / 1209600)))
    xl = np.where(small, 1.0, x)
    direct = _recip_expm1(xl) - 1.0 / xl + 0.5
    return np.where(small, series, direct)


def _log1mexp(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """log(1 - exp(-x)) for x in (0, inf], accurate at both ends (Maechler's log1mexp)."""
    x = np.asarray(x, dtype=np.float64)
    small = x <= math.log(2.0)
    return np.where(small, np.log(-np.expm1(-np.where(small, x, 1.0))), np.log1p(-np.exp(-np.where(small, 1.0, x))))


# ----------------------------------------------------------------------------- distances


def kendall_distance(a: ArrayLike, b: ArrayLike) -> NDArray[np.int64]:
    """Kendall's tau distance (§3.1, Mallows-phi): the number of discordant item pairs.

    A pair of items (i, j) is discordant when a and b order it differently, i.e.
    (a_i - a_j)(b_i - b_j) < 0; this equals the number of inversions of a o b^{-1}.
    Tied ranks make a pair neither concordant nor discordant.

    Args:
        a, b: rank vectors, shapes broadcastable to (..., n).
    Returns:
        (...) integer distances in [0, n(n-1)/2].
    """
    a = _check_rank_vectors(a, "a")
    b = _check_rank_vectors(b, "b")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"a and b rank different numbers of items: {a.shape[-1]} vs {b.shape[-1]}")
    da = np.sign(a[..., :, None] - a[..., None, :])  # (..., n, n)
    db = np.sign(b[..., :, None] - b[..., None, :])
    return (da * db < 0).sum(axis=(-2, -1)) // 2  # each pair is counted as (i, j) and (j, i)


def spearman_distance(a: ArrayLike, b: ArrayLike) -> NDArray[np.int64]:
    """Spearman's rho distance (§3.1, Mallows-theta): sum_i (a_i - b_i)^2.

    This is the squared Euclidean distance between rank vectors, as the paper uses it
    (not the square root, and not Spearman's correlation coefficient).

    Args:
        a, b: rank vectors, shapes broadcastable to (..., n).
    Returns:
        (...) integer distances in [0, n(n^2-1)/3].
    """
    a = _check_rank_vectors(a, "a")
    b = _check_rank_vectors(b, "b")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"a and b rank different numbers of items: {a.shape[-1]} vs {b.shape[-1]}")
    diff = a.astype(np.int64) - b.astype(np.int64)
    return (diff * diff).sum(axis=-1)


# ----------------------------------------------------------------------------- normaliser, moments


def kendall_log_normalizer(n: int, phi: ArrayLike) -> NDArray[np.float64]:
    """log Z(phi) of the Kendall Mallows model (§3.1): Z = prod_{j=1..n} (1 - phi^j)/(1 - phi).

    Each factor is 1 + phi + ... + phi^{j-1} = (1 - e^{-jL})/(1 - e^{-L}) with
    L = -log(phi), evaluated in log space with log1mexp, so phi -> 1 gives log n! (phi = 1 exactly uses the limit j) and
    phi = 0 gives 0.

    Args:
        n: number of items, >= 1.
        phi: dispersion in [0, 1], any shape.
    Returns:
        log Z, same shape as phi.
    """
    n = _check_n(n)
    phi = _check_phi(phi)
    L = _neg_log_phi(phi)[..., None]  # (..., 1)
    j = np.arange(1, n + 1, dtype=np.float64)  # (n,)
    at_one = L == 0.0
    safe_L = np.where(at_one, 1.0, L)
    log_factor = _log1mexp(j * safe_L) - _log1mexp(safe_L)  # (..., n)
    log_factor = np.where(at_one, np.log(j), log_factor)
    return log_factor.sum(axis=-1)


def kendall_normalizer(n: int, phi: ArrayLike) -> NDArray[np.float64]:
    """Z(phi) = prod_{j=1..n} (1 - phi^j)/(1 - phi) (§3.1); n! at phi = 1, 1 at phi = 0.

    Returns exp(``kendall_log_normalizer``), same shape as phi; overflows to inf only
    when n! itself does (n > 170).
    """
    return np.exp(kendall_log_normalizer(n, phi))


def kendall_expected_distance(n: int, phi: ArrayLike) -> NDArray[np.float64]:
    """E[d_Kendall(mu, mu0)] under the Kendall Mallows model (§3.1, eq. 5).

    Closed form: n phi/(1-phi) - sum_{j=1..n} j phi^j/(1-phi^j). It is the sum over the
    insertion steps of E[V_j], V_j in {0..j-1} with P(V_j = v) ∝ phi^v, where
    E[V_j] = 1/expm1(L) - j/expm1(jL). Near phi = 1 (jL <= 1/2) the 1/L parts of the two
    terms cancel, so there it is computed as (j-1)/2 + f(L) - j f(jL) with
    f = ``_recip_expm1_tail``; elsewhere directly. Accurate to ~1e-13 relative for all
    phi: it tends to n(n-1)/4 as phi -> 1 and to (n-1) phi as phi -> 0 (0 at phi = 0).
    Increasing in phi.

    Args:
        n: number of items, >= 1.
        phi: dispersion in [0, 1], any shape.
    Returns:
        expected distance, same shape as phi.
    """
    n = _check_n(n)
    phi = _check_phi(phi)
    L = _neg_log_phi(phi)[..., None]
    j = np.arange(1, n + 1, dtype=np.float64)
    near_uniform = j * L <= 0.5
    Ls = np.where(near_uniform, L, 1.0)
    series_form = (j - 1) / 2 + _recip_expm1_tail(Ls) - j * _recip_expm1_tail(j * Ls)
    Lt = np.where(near_uniform, 1.0, L)
    tail_form = _recip_expm1(Lt) - j * _recip_expm1(j * Lt)  # phi/(1-phi) - j phi^j/(1-phi^j)
    per_step = np.where(near_uniform, series_form, tail_form)
    return np.maximum(per_step, 0.0).sum(axis=-1)


# ----------------------------------------------------------------------------- enumeration, density


def all_rankings(n: int) -> NDArray[np.int64]:
    """Every ranking of n items as rank vectors, shape (n!, n), in lexicographic order.

    Row 0 is the identity (the default central ranking). For brute-force checks only:
    n must be <= 8.
    """
    n = _check_n(n)
    if n > MAX_ENUMERATED_ITEMS:
        raise ValueError(f"all_rankings enumerates n! rankings; n must be <= {MAX_ENUMERATED_ITEMS}, got {n}")
    return np.array(list(itertools.permutations(range(n))), dtype=np.int64).reshape(-1, n)


def log_prob_kendall(rankings: ArrayLike, phi: float, center: ArrayLike | None = None) -> NDArray[np.float64]:
    """log P(mu | mu0, phi) of the Kendall Mallows model (eq. 5): d log(phi) - log Z(phi).

    Args:
        rankings: rank vectors, shape (..., n).
        phi: dispersion in [0, 1] (scalar).
        center: central ranking mu0 as a rank vector (n,); the identity when None.
    Returns:
        (...) log-probabilities. At phi = 0 the central ranking has log-probability 0
        and every other ranking -inf (probability exactly 0).
    """
    rankings = _check_rank_vectors(rankings, "rankings")
    n = rankings.shape[-1]
    phi = float(_check_phi(phi))
    center = np.arange(n) if center is None else _check_rank_vectors(center, "center")
    d = kendall_distance(rankings, center)
    return xlogy(d, phi) - kendall_log_normalizer(n, phi)


def first_place_probs(n: int, phi: float) -> NDArray[np.float64]:
    """P(item i is ranked first) under the Kendall Mallows model with identity center.

    The first-place marginal is a truncated geometric: phi^i (1 - phi)/(1 - phi^n),
    i = 0..n-1 (uniform at phi = 1, a point mass on item 0 at phi = 0). Reversing every
    ranking maps the model to itself with the reversed center, so the last-place
    marginal is the mirror image: P(item n-1-i ranked last) = the same value. (A standard
    consequence of the insertion construction; checked by enumeration in the tests.)

    Returns:
        (n,) probabilities.
    """
    n = _check_n(n)
    phi = float(_check_phi(phi))
    weights = np.power(phi, np.arange(n, dtype=np.float64))  # 0.0 ** 0 == 1
    return weights / weights.sum()


# ----------------------------------------------------------------------------- sampling


def sample_kendall(n: int, phi: float, size: int, seed: int | np.random.Generator | None = None) -> NDArray[np.int64]:
    """Exact draws from the Kendall Mallows model by the repeated insertion model (§3.1).

    The central ranking is the identity (item i has central rank i). Items are inserted
    in central order: item j (0-based) goes to position j - v of the current list of j
    items, where v in {0..j} is the number of already inserted (centrally better) items
    it jumps over, drawn with P(v) ∝ phi^v. The v's are the inversions it creates, so the
    Kendall distance to the identity is sum_j v_j and P(ranking) ∝ phi^d, as eq. 5 says.
    phi = 1 gives uniform permutations, phi = 0 the identity.

    Vectorised over draws: one loop over the n insertion steps, none over ``size``.

    Args:
        n: number of items, >= 1.
        phi: dispersion in [0, 1].
        size: number of draws, >= 0.
        seed: seed or numpy Generator.
    Returns:
        (size, n) int64 rank vectors: out[k, i] is the rank (0 = best) of item i in draw k.
    """
    n = _check_n(n)
    phi = float(_check_phi(phi))
    if isinstance(size, bool) or int(size) != size or size < 0:
        raise ValueError(f"size must be an integer >= 0, got {size!r}")
    size = int(size)
    rng = np.random.default_rng(seed)
    ranks = np.zeros((size, n), dtype=np.int64)
    for j in range(1, n):  # item 0 starts alone at rank 0
        weights = np.power(phi, np.arange(j + 1, dtype=np.float64))  # 0.0 ** 0 == 1
        v = rng.choice(j + 1, size=size, p=weights / weights.sum())
        position = j - v  # (size,)
        ranks[:, :j] += ranks[:, :j] >= position[:, None]
        ranks[:, j] = position
    return ranks


# ----------------------------------------------------------------------------- pairwise marginals (eqs. 8, 9)


def pairwise_prob(gap: ArrayLike, phi: ArrayLike, model: str = "kendall") -> NDArray[np.float64]:
    """P(an item is ranked above the item ``gap`` central positions below it), eqs. 8-9.

    ``gap`` is s = mu0(y2) - mu0(y1) in the paper's notation (positive when y1 is
    centrally better); it may be real-valued (as in the losses) or integer.

    model="kendall" (Mallows-phi, Cor. 3, eq. 9):
        g(s) = h(s) for s > 0, 1/2 at s = 0, 1 - h(-s) for s < 0, with
        h(s) = (s+1)/(1 - phi^{s+1}) - s/(1 - phi^s).
        For integer s this is the exact marginal of the Kendall Mallows model for any
        n >= s + 1 and any pair at central distance s. g(1) = 1/(1+phi). Note that g jumps
        at 0: the limit g(0+) = 1/(1-phi) + 1/log(phi) is not 1/2 (paper's sgn form).
    model="spearman" (Mallows-theta, Cor. 2, eq. 8):
        g(s) = sigmoid(-2 log(phi) s); exact for n = 2 only, the paper's definition else.

    Both are finite for phi in [0, 1] inclusive: phi = 1 gives 1/2 everywhere, phi = 0 a
    step (1 for s > 0, 0 for s < 0, 1/2 at s = 0).

    Args:
        gap: central-rank gap s, any shape.
        phi: dispersion in [0, 1], broadcastable with gap.
        model: "kendall" or "spearman".
    Returns:
        probabilities in [0, 1], the broadcast shape of gap and phi.
    """
    gap = np.asarray(gap, dtype=np.float64)
    if np.any(~np.isfinite(gap)):
        raise ValueError("gap must be finite")
    if model not in ("kendall", "spearman"):
        raise ValueError(f"model must be 'kendall' or 'spearman', got {model!r}")
    phi = _check_phi(phi)
    gap, phi = np.broadcast_arrays(gap, phi)
    # One implementation of eqs. 8-9 serves the losses and the ranking model: the torch
    # links in mallowspo.links, evaluated here in float64.
    link = phi_link if model == "kendall" else theta_link
    return link(torch.tensor(gap), torch.tensor(phi)).numpy()


# ----------------------------------------------------------------------------- estimation


@dataclass(frozen=True)
class KendallFit:
    """Result of ``fit_phi_kendall``. ``float(fit)`` is ``fit.phi``.

    Attributes:
        phi: maximum-likelihood dispersion in [0, 1].
        center: (n,) central ranking used (given, or the Borda estimate).
        mean_distance: mean Kendall distance of the rankings to ``center``.
        n_rankings: number of rankings fitted.
    """

    phi: float
    center: NDArray[np.int64]
    mean_distance: float
    n_rankings: int

    def __float__(self) -> float:
        return self.phi


def borda_center(rankings: ArrayLike) -> NDArray[np.int64]:
    """Borda estimate of the central ranking: items sorted by mean rank (ties by item
    index). Returns a rank vector (n,). Consistent for the Kendall Mallows model."""
    rankings = _check_rank_vectors(rankings, "rankings")
    mean_rank = rankings.reshape(-1, rankings.shape[-1]).mean(axis=0)
    order = np.argsort(mean_rank, kind="stable")  # best item first
    center = np.empty_like(order)
    center[order] = np.arange(order.size)
    return center.astype(np.int64)


def fit_phi_kendall(rankings: ArrayLike, center: ArrayLike | None = None) -> KendallFit:
    """Maximum-likelihood phi of the Kendall Mallows model (eq. 5) from observed rankings.

    For a fixed center the log-likelihood is m [dbar log(phi) - log Z(phi)], whose
    stationarity condition is E_phi[d] = dbar (the mean observed distance); E_phi[d] is
    increasing in phi, so the root is unique and found by ``scipy.optimize.brentq`` on
    L = -log(phi). dbar = 0 gives phi = 0; dbar >= n(n-1)/4 (the uniform model's mean)
    gives phi = 1, the boundary maximum.

    If ``center`` is None it is estimated by Borda (items sorted by their mean rank),
    which is then plugged in: this is the usual two-stage estimator, not the joint MLE
    over (center, phi); with a wrong center the distances and hence 1-phi are biased.

    Args:
        rankings: (m, n) rank vectors, m >= 1.
        center: (n,) central rank vector, or None for the Borda estimate.
    Returns:
        ``KendallFit`` (phi, center, mean_distance, n_rankings); ``float(fit)`` is phi.
    """
    rankings = _check_rank_vectors(rankings, "rankings")
    if rankings.ndim != 2 or rankings.shape[0] < 1:
        raise ValueError(f"rankings must have shape (m, n) with m >= 1, got {rankings.shape}")
    m, n = rankings.shape
    center = borda_center(rankings) if center is None else _check_rank_vectors(center, "center")
    if center.shape != (n,):
        raise ValueError(f"center must be a rank vector of shape ({n},), got {center.shape}")
    dbar = float(kendall_distance(rankings, center).mean())
    uniform_mean = n * (n - 1) / 4
    if dbar <= 0.0:
        phi = 0.0
    elif dbar >= uniform_mean:
        phi = 1.0
    else:

        def excess(L: float) -> float:
            return float(kendall_expected_distance(n, math.exp(-L))) - dbar

        lo, hi = 1e-12, 1.0
        if excess(lo) <= 0.0:  # dbar within rounding of the uniform mean
            phi = 1.0
        else:
            while excess(hi) > 0.0 and hi < 745.0:  # exp(-745) underflows to 0
                hi *= 2.0
            phi = 0.0 if excess(hi) > 0.0 else math.exp(-brentq(excess, lo, hi, xtol=1e-14, rtol=1e-12))
    return KendallFit(phi=phi, center=center.astype(np.int64), mean_distance=dbar, n_rankings=m)
