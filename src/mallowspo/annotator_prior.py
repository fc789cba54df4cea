"""The prior shared by the annotator estimates of -log phi(x) (``annotators``: votes,
``annotator_rankings``: rankings), its empirical-Bayes fit, and the input checks both use.

L = -log phi = logit q, q = 1/(1 + phi) in [1/2, 1]. The prior is Beta(a, b) on Q, the chance
that an annotator agrees (q = Q when the consensus is given; q = max(Q, 1 - Q), a folded Beta,
when it is estimated from the same votes or rankings). Its shapes are fitted by the marginal
likelihood of the whole dataset (``_fit_beta``); posterior means of L need one fixed quadrature
over L (``_grid``).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import minimize
from scipy.special import betaln, expit, log_expit

__all__ = ["HYPER_SD", "SHAPE_BOUNDS", "BetaPrior"]

# Shapes of the prior. Below 1/2 a Beta puts more mass at q = 1 (phi = 0) than Jeffreys' prior, and
# the estimate for a unanimous vote is set by that tail, which a few votes cannot measure; above 1e4
# the prior is a point mass (sd of q < 0.005) and the quadrature grid below resolves no narrower one.
SHAPE_BOUNDS = (0.5, 1e4)
HYPER_SD = 10.0  # sd of the weak hyperprior on log(a + b), see _fit_beta


class BetaPrior(NamedTuple):
    """Beta(a, b) on Q, the chance that an annotator agrees (folded to q = max(Q, 1 - Q) when the
    consensus is estimated). A plain ``(a, b)`` tuple is accepted wherever a prior is."""

    a: float
    b: float


# ----------------------------------------------------------------------------- inputs


def _to_numpy(values: ArrayLike | torch.Tensor) -> tuple[np.ndarray, torch.device | None]:
    if torch.is_tensor(values):
        return values.detach().cpu().numpy(), values.device
    return np.asarray(values), None


def _like_input(values: NDArray[np.float64], device: torch.device | None) -> NDArray[np.float64] | torch.Tensor:
    """numpy float64 for numpy (or list) input; a float64 tensor on the input's device for a tensor."""
    return values if device is None else torch.as_tensor(values, dtype=torch.float64, device=device)


def _integers(values: np.ndarray, name: str) -> NDArray[np.int64]:
    """The values as int64: integer dtypes, or floats that are finite and whole."""
    if np.issubdtype(values.dtype, np.integer):
        return values.astype(np.int64)
    if not np.issubdtype(values.dtype, np.floating):
        raise ValueError(f"{name} must hold integers, got dtype {values.dtype}")
    for bad, what in ((~np.isfinite(values), "not finite"), (values != np.round(values), "not an integer")):
        if bad.any():
            i = tuple(int(k) for k in np.argwhere(bad)[0])
            raise ValueError(f"{name}[{', '.join(map(str, i))}] = {values[i]} is {what}")
    return values.astype(np.int64)


def _check_prior(prior: object) -> BetaPrior:
    try:
        a, b = (float(x) for x in (None if isinstance(prior, str) else prior))
    except (TypeError, ValueError):
        raise ValueError(f"prior must be 'empirical_bayes', None or a pair (a, b), got {prior!r}")
    low, high = SHAPE_BOUNDS
    if not (low <= a <= high and low <= b <= high):
        raise ValueError(f"prior shapes must lie in [{low}, {high:g}], got a={a}, b={b}")
    return BetaPrior(a, b)


# ----------------------------------------------------------------------------- the prior and its fit


@functools.cache
def _grid() -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Nodes L_i and log-weights with sum_i w_i f(L_i) ~= int_0^inf f(L) dL.

    Composite 8-point Gauss-Legendre in u = sqrt(phi) = e^{-L/2} on (0, 1), dL = 2 du / u: panels
    of width 1/128 (the narrowest prior, a = b = 1e4, has sd 0.014 in L at L = 0 and a peak at L
    has sd >= e^{L/2}/100, uniform in u), refined geometrically towards u = 0, where the
    integrand behaves as u^{2b-1} log(1/u) with b >= 1/2. 1136 nodes, L in [3e-4, 37].
    """
    edges = np.unique(np.concatenate([np.linspace(0.0, 1.0, 129), 2.0 ** -np.arange(8.0, 22.0)]))
    x, w = np.polynomial.legendre.leggauss(8)
    half = np.diff(edges)[:, None] / 2
    u = (edges[:-1, None] + half + half * x).ravel()
    return -2.0 * np.log(u), np.log((half * w).ravel()) + np.log(2.0 / u)


def _log_folded_prior(L: NDArray[np.float64], prior: BetaPrior) -> NDArray[np.float64]:
    """log density of L = logit q, q = max(Q, 1 - Q), Q ~ Beta(a, b), for L >= 0:

    p(L) = [sigma(L)^a sigma(-L)^b + sigma(L)^b sigma(-L)^a] / B(a, b)
    (Beta(a, b) in logit space is sigma(L)^a sigma(-L)^b / B(a, b); folding adds its mirror image).
    """
    a, b = prior
    up, down = log_expit(L), log_expit(-L)
    return np.logaddexp(a * up + b * down, b * up + a * down) - betaln(a, b)


def _shapes(theta: NDArray[np.float64], folded: bool) -> BetaPrior:
    """(a, b) = (m k, (1 - m) k) from theta = (t, log k), m = sigmoid(t) (folded: 1/2 + sigmoid(t)/2,
    as Beta(a, b) and Beta(b, a) fold to the same prior), clipped into SHAPE_BOUNDS."""
    m = 0.5 + 0.5 * expit(theta[0]) if folded else expit(theta[0])
    kappa = math.exp(theta[1])
    return BetaPrior(*np.clip([m * kappa, (1.0 - m) * kappa], *SHAPE_BOUNDS).tolist())


def _fit_beta(neg_log_marginal: Callable[[BetaPrior], float], folded: bool) -> BetaPrior:
    """argmax of the marginal likelihood over (a, b) in SHAPE_BOUNDS.

    The surface is a narrow valley along the concentration k = a + b at a fixed mean m = a/(a + b)
    (the votes measure the mean much better than the spread), with more than one local optimum,
    and a corner optimum at b = 1/2, so it is searched in (logit m, log k): for each of 7
    concentrations the best of 6 means, then Nelder-Mead from the best 3 of these 7 points.
    A weak hyperprior log k ~ N(log 2, 10^2) (under half a nat over the whole range, against a
    likelihood of N terms) decides the directions the data leave flat: with M = 3 and the majority
    convention only the share of unanimous votes is measured. ``neg_log_marginal`` is the sum over
    the rows.
    """
    objective = lambda theta: (
        neg_log_marginal(_shapes(theta, folded)) + (theta[1] - math.log(2.0)) ** 2 / (2 * HYPER_SD**2)
    )
    bounds = [(-12.0, 12.0), (math.log(2 * SHAPE_BOUNDS[0]), math.log(2 * SHAPE_BOUNDS[1]))]
    means = np.linspace(-4.0, 4.0, 6)
    rows = [[np.array([t, s]) for t in means] for s in np.linspace(*bounds[1], 7)]
    starts = sorted((min(row, key=objective) for row in rows), key=objective)[:3]
    options = {"xatol": 1e-4, "fatol": 1e-6}
    fits = [minimize(objective, start, method="Nelder-Mead", bounds=bounds, options=options) for start in starts]
    best = min(fits, key=lambda fit: fit.fun).x
    return _shapes(best, folded)


def _warn_uninformative(what: str) -> BetaPrior:
    warnings.warn(
        f"no prompt has two or more {what}: a single annotator says nothing about phi(x) when the "
        "consensus is estimated from the same data, so every estimate is the mean of the Beta(1, 1) "
        "prior (2 log 2 = 1.39); pass prior=(a, b) to set the level"
    )
    return BetaPrior(1.0, 1.0)
