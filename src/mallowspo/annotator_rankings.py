"""-log phi(x) from M annotators' rankings of K responses (Kendall Mallows model; notes §8).

The center is unknown and estimated from the same rankings: the likelihood sums it over all K!
rankings, so it depends on the rankings only through the histogram of the total Kendall distances
D_c = sum_m d(r_m, c) over the centers c. The prior is the folded Beta(a, b) of ``annotator_prior``
(the votes' prior: with K = 2 a ranking is a vote and the two estimates are the same). Prompts may
have different numbers of annotators M or responses K: the rankings are then a list of (M_n, K_n)
arrays, grouped by shape, with one prior fitted over all groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy.special import logsumexp

from mallowspo.annotator_prior import (
    BetaPrior,
    _check_prior,
    _fit_beta,
    _grid,
    _integers,
    _like_input,
    _log_folded_prior,
    _to_numpy,
    _warn_uninformative,
)
from mallowspo.mallows import all_rankings, fit_phi_kendall, kendall_log_normalizer

__all__ = ["MAX_RANKED_ITEMS", "fit_ranking_prior", "kemeny_distance", "neg_log_phi_from_rankings"]

MAX_RANKED_ITEMS = 7  # the K! centers are enumerated: 5040 at K = 7


def _check_rankings(rankings: np.ndarray, prompt: int | None = None) -> NDArray[np.int64]:
    """Regular (N, M, K) rankings as int64; with ``prompt``, the (M, K) rankings of that prompt of a
    ragged input (errors then name it)."""
    name = "rankings" if prompt is None else f"rankings[{prompt}]"
    shape = "(N prompts, M annotators, K responses)" if prompt is None else "(M annotators, K responses)"
    if rankings.ndim != (3 if prompt is None else 2) or 0 in rankings.shape:
        raise ValueError(f"{name} must have shape {shape}, got {rankings.shape}")
    K = rankings.shape[-1]
    if not 2 <= K <= MAX_RANKED_ITEMS:
        raise ValueError(
            f"{name} must rank K = 2..{MAX_RANKED_ITEMS} responses (the K! centers are enumerated), got K = {K}"
        )
    r = _integers(rankings, name)
    bad = (np.sort(r, axis=-1) != np.arange(K)).any(axis=-1)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        n, m = index if prompt is None else (prompt, index[0])
        raise ValueError(
            f"{name}[{', '.join(map(str, index))}] = {r[index].tolist()} (prompt {n}, annotator {m}) is not a "
            f"permutation of 0..{K - 1}"
        )
    return r


def _ragged(rankings: object) -> list[np.ndarray] | None:
    """The prompts' (M_n, K_n) arrays when ``rankings`` is a sequence of differently shaped ones, else None."""
    if torch.is_tensor(rankings) or isinstance(rankings, np.ndarray) or not isinstance(rankings, Sequence):
        return None
    try:
        regular = np.asarray(rankings)
    except ValueError:  # numpy refuses sequences of different shapes
        regular = None
    if regular is not None and regular.dtype != object:
        return None
    return [np.asarray(row) for row in rankings]


def _distance_histograms(rankings: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """For each prompt, how many of the K! centers c lie at each total distance D_c = sum_m d(r_m, c).

    With x_mp = 1 when annotator m ranks the first item of pair p above the second and y_cp the same
    for c, D_c = sum_p [cnt_p (1 - y_cp) + (M - cnt_p) y_cp], cnt_p = sum_m x_mp: linear in y_c.
    Returns (N, M P + 1) histograms (P = K(K-1)/2 pairs) and (N,) the index in ``all_rankings(K)``
    of a center with the least D (a Kemeny center).
    """
    N, M, K = rankings.shape
    i, j = np.triu_indices(K, k=1)
    centers = all_rankings(K)
    y = (centers[:, i] < centers[:, j]).astype(np.int64)  # (K!, P)
    count = (rankings[..., i] < rankings[..., j]).sum(axis=1)  # (N, P)
    bins = M * i.size + 1
    hist, best = np.empty((N, bins), dtype=np.int64), np.empty(N, dtype=np.int64)
    step = max(1, 2**22 // len(centers))
    for lo in range(0, N, step):
        c = count[lo : lo + step]
        D = c.sum(axis=1, keepdims=True) + (M - 2 * c) @ y.T  # (n, K!)
        rows = np.arange(len(c))[:, None] * bins
        hist[lo : lo + step] = np.bincount((rows + D).ravel(), minlength=len(c) * bins).reshape(len(c), bins)
        best[lo : lo + step] = D.argmin(axis=1)
    return hist, best


def _distance_terms(M: int, K: int, bins: int) -> NDArray[np.float64]:
    """(bins, G): log of e^{-L D} / (K! Z(e^{-L})^M) for D = 0..bins-1 at the grid's L."""
    L, _ = _grid()
    return -np.arange(bins)[:, None] * L - M * kendall_log_normalizer(K, np.exp(-L)) - math.lgamma(K + 1)


def _log_mixtures(hist: NDArray[np.int64], log_terms: NDArray[np.float64]) -> NDArray[np.float64]:
    """log sum_D h(D) exp(log_terms[D]) per row of ``hist``: a matrix-vector product after scaling,
    with a log-sum-exp for the rows (if any) whose sum underflows at that scale."""
    top = log_terms.max()
    total = hist @ np.exp(log_terms - top)
    out = top + np.log(np.maximum(total, 1e-300))
    weak = total < 1e-250
    if weak.any():
        with np.errstate(divide="ignore"):
            out[weak] = logsumexp(np.log(hist[weak]) + log_terms, axis=1)
    return out


def _ranking_log_weights(terms: NDArray[np.float64], prior: BetaPrior) -> NDArray[np.float64]:
    """(bins, G): log of w_i p(L_i) e^{-L_i D} / (K! Z^M), the integrand of every moment below."""
    L, log_w = _grid()
    return terms + log_w + _log_folded_prior(L, prior)


def _ranking_log_marginal(hist: NDArray, terms: NDArray, prior: BetaPrior) -> NDArray[np.float64]:
    """log int p(L) P(rankings | L) dL per prompt. P is linear in the histogram h of D_c, so this is
    log sum_D h(D) m_D with m_D = int p(L) e^{-L D} / (K! Z^M) dL: one (bins,) vector per prior."""
    return _log_mixtures(hist, logsumexp(_ranking_log_weights(terms, prior), axis=1))


def _ranking_posterior_mean(hist: NDArray, terms: NDArray, prior: BetaPrior) -> NDArray[np.float64]:
    """E[L | rankings] = sum_D h(D) n_D / sum_D h(D) m_D, n_D = int L p(L) e^{-L D} / (K! Z^M) dL."""
    log_weights = _ranking_log_weights(terms, prior)
    log_n = logsumexp(log_weights + np.log(_grid()[0]), axis=1)
    return np.exp(_log_mixtures(hist, log_n) - _log_mixtures(hist, logsumexp(log_weights, axis=1)))


class _RankingData(NamedTuple):
    """Checked rankings (N, M, K), their distinct distance histograms (U, M P + 1), for each pattern
    a prompt that has it (U,) and its count (U,), each prompt's pattern (N,) and Kemeny center (N,)."""

    rankings: NDArray[np.int64]
    patterns: NDArray[np.int64]
    first: NDArray[np.int64]
    counts: NDArray[np.int64]
    inverse: NDArray[np.int64]
    best: NDArray[np.int64]


def _ranking_data(r: NDArray[np.int64]) -> _RankingData:
    hist, best = _distance_histograms(r)
    patterns, first, inverse, counts = np.unique(
        hist, axis=0, return_index=True, return_inverse=True, return_counts=True
    )
    return _RankingData(r, patterns, first, counts, inverse.reshape(-1), best)


class _RankingGroup(NamedTuple):
    """The prompts of one shape (M, K): their positions in the input (n,) and their data."""

    prompts: NDArray[np.int64]
    data: _RankingData

    def terms(self) -> NDArray[np.float64]:
        _, M, K = self.data.rankings.shape
        return _distance_terms(M, K, self.data.patterns.shape[1])


def _ranking_groups(rankings: ArrayLike | torch.Tensor) -> tuple[list[_RankingGroup], int, torch.device | None]:
    """The checked rankings grouped by shape (one group for an (N, M, K) input), N, and the input's
    device (None for numpy or lists)."""
    rows = _ragged(rankings)
    if rows is None:
        values, device = _to_numpy(rankings)
        checked = _check_rankings(values)
        return [_RankingGroup(np.arange(len(checked)), _ranking_data(checked))], len(checked), device
    checked = [_check_rankings(row, prompt=n) for n, row in enumerate(rows)]
    shapes: dict[tuple[int, int], list[int]] = {}
    for n, r in enumerate(checked):
        shapes.setdefault(r.shape, []).append(n)
    groups = [
        _RankingGroup(np.array(prompts), _ranking_data(np.stack([checked[n] for n in prompts])))
        for prompts in shapes.values()
    ]
    return groups, len(checked), None


def _fit_ranking_prior(groups: list[_RankingGroup]) -> BetaPrior:
    """argmax over the prior of the summed marginal log-likelihood of every group."""
    if all(group.data.rankings.shape[1] < 2 for group in groups):
        return _warn_uninformative("rankings")
    fits = [(group.data, group.terms()) for group in groups]
    nll = lambda p: -sum((data.counts * _ranking_log_marginal(data.patterns, terms, p)).sum() for data, terms in fits)
    return _fit_beta(nll, folded=True)


def fit_ranking_prior(rankings: ArrayLike | torch.Tensor | Sequence[ArrayLike]) -> BetaPrior:
    """The empirical-Bayes prior of ``neg_log_phi_from_rankings``: the folded Beta(a, b) maximising
    sum_n log int p(L) P(rankings_n | L) dL. Fit it on a train split and pass it as ``prior`` for the
    others. Arguments as in ``neg_log_phi_from_rankings``."""
    return _fit_ranking_prior(_ranking_groups(rankings)[0])


def _joint_mle(data: _RankingData) -> NDArray[np.float64]:
    """(N,) |log phi| at the joint MLE over (center, phi): a Kemeny center, then ``fit_phi_kendall``."""
    centers = all_rankings(data.rankings.shape[2])
    phis = np.array([fit_phi_kendall(data.rankings[n], center=centers[data.best[n]]).phi for n in data.first])
    with np.errstate(divide="ignore"):
        return np.abs(-np.log(phis))[data.inverse]


def kemeny_distance(rankings: ArrayLike | torch.Tensor | Sequence[ArrayLike]) -> NDArray[np.int64]:
    """(N,) the least total Kendall distance min_c sum_m d(r_m, c) of each prompt's rankings to one
    center (a Kemeny center): 0 when all annotators agree, at most M K (K - 1) / 2. Of each
    annotator's K (K - 1) / 2 pair orders, M K (K - 1) / 2 - this many agree with that center.
    Arguments as in ``neg_log_phi_from_rankings``."""
    groups, size, _ = _ranking_groups(rankings)
    out = np.empty(size, dtype=np.int64)
    for group in groups:
        out[group.prompts] = (group.data.patterns > 0).argmax(axis=1)[group.data.inverse]
    return out


def neg_log_phi_from_rankings(
    rankings: ArrayLike | torch.Tensor | Sequence[ArrayLike],
    *,
    prior: str | tuple[float, float] | None = "empirical_bayes",
) -> NDArray[np.float64] | torch.Tensor:
    """-log phi(x) per prompt from M annotators' rankings of K responses (Kendall Mallows model).

    The center is unknown and estimated from the same rankings, so the likelihood sums it over all
    K! rankings, P(r_1..r_M | phi) = (1/K!) sum_c phi^{D_c} / Z(phi)^M, D_c = sum_m d_Kendall(r_m, c);
    the per-prompt histogram of D_c over c is the sufficient statistic. The prior is the folded
    Beta(a, b) on q = 1/(1 + phi) of the votes (with K = 2 the two estimates are the same).

    Args:
        rankings: (N, M, K) integers: rankings[n, m, k] is the rank (0 = best) that annotator m gives
            response k of prompt n; each (n, m) row a permutation of 0..K-1, 2 <= K <= 7. Or a
            sequence of N (M_n, K_n) arrays when prompts differ in M or K (grouped by shape; one
            prior for all).
        prior: "empirical_bayes" (``fit_ranking_prior`` on these prompts), an explicit (a, b), or
            None for the joint MLE over (center, phi): a Kemeny center (least total distance, by
            enumeration) and ``fit_phi_kendall`` there; inf when the rankings agree (always at M = 1).
    Returns:
        (N,) estimates of L >= 0, finite when a prior is set (M = 1 gives the prior's mean): numpy
        float64 for numpy or list input, a float64 tensor on the input's device for tensor input.
    """
    groups, size, device = _ranking_groups(rankings)
    out = np.empty(size, dtype=np.float64)
    if prior is None:
        for group in groups:
            out[group.prompts] = _joint_mle(group.data)
        return _like_input(out, device)
    if isinstance(prior, str) and prior == "empirical_bayes":
        prior = _fit_ranking_prior(groups)
    prior = _check_prior(prior)
    for group in groups:
        out[group.prompts] = _ranking_posterior_mean(group.data.patterns, group.terms(), prior)[group.data.inverse]
    return _like_input(out, device)
