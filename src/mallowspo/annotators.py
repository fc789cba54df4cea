"""-log phi(x) measured from annotators (notes §8: the project's extension, not in the paper).

Under the Kendall Mallows model (eq. 5) two responses adjacent in the central ranking are
ordered as the center orders them with probability q = g_phi(1) = 1/(1 + phi) (eq. 9 at
s = 1), so

    L(x) = -log phi(x) = logit q(x),        phi in [0, 1]  <=>  q in [1/2, 1]  <=>  L >= 0.

Votes: v of M annotators take the consensus order of a pair, v ~ Binom(M, q). Rankings: M
rankings of K responses drawn from the model, summarised by their Kendall distances to each
possible center. With M = 2-5 annotators the raw MLE is often infinite (a unanimous vote), so
the estimate is a posterior mean of L under a prior fitted to the whole dataset by its marginal
likelihood (empirical Bayes):

    Q ~ Beta(a, b)                       consensus given: q = Q, the chance of agreeing with a label
    q = max(Q, 1 - Q)   (folded Beta)    center estimated from the same votes or rankings

The folded form is what removes the selection bias of an estimated center: with the majority of
the same votes as consensus, v >= M/2 always, and treating v as Binom(M, q) would give random
annotators (phi = 1) an L > 0. Summing the likelihood over both orders (votes) or all K! centers
(rankings) instead gives random annotators L near 0, and a single annotator (M = 1) no
information at all: its estimate is the dataset's level. Closed forms are used where they exist
(beta-binomial marginals, digamma means); the rest is a fixed quadrature over L.

This module holds the votes; the prior and its fit are ``annotator_prior``, the rankings
``annotator_rankings`` (re-exported here), and reading dataset columns ``annotator_columns``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy.special import betaln, digamma, gammaln, log_expit

from mallowspo.annotator_prior import (
    SHAPE_BOUNDS,
    BetaPrior,
    _check_prior,
    _fit_beta,
    _grid,
    _integers,
    _like_input,
    _to_numpy,
    _warn_uninformative,
)
from mallowspo.annotator_rankings import fit_ranking_prior, kemeny_distance, neg_log_phi_from_rankings

__all__ = [
    "MULTIPREF_LABELS",
    "SHAPE_BOUNDS",
    "BetaPrior",
    "fit_ranking_prior",
    "fit_vote_prior",
    "kemeny_distance",
    "neg_log_phi_from_rankings",
    "neg_log_phi_from_votes",
    "preference_sign",
    "votes_from_preferences",
]

CONSENSUS = ("majority", "given")
# MultiPref's five-point labels, on HelpSteer2-Preference's sign convention (negative: the first
# response, A or response_1, is better; 0 a tie).
MULTIPREF_LABELS = {
    "A-is-clearly-better": -2,
    "A-is-slightly-better": -1,
    "Tie": 0,
    "B-is-slightly-better": 1,
    "B-is-clearly-better": 2,
}


def _check_votes(agree: np.ndarray, total: np.ndarray, consensus: str) -> tuple[NDArray, NDArray]:
    if consensus not in CONSENSUS:
        raise ValueError(f"consensus must be one of {CONSENSUS}, got {consensus!r}")
    if agree.ndim != 1 or agree.size == 0:
        raise ValueError(f"agree must be a non-empty 1-D array of counts (N,), got shape {agree.shape}")
    if total.shape != agree.shape:
        raise ValueError(f"agree and total must have the same shape, got {agree.shape} and {total.shape}")
    v, M = _integers(agree, "agree"), _integers(total, "total")
    checks = (
        (M < 1, lambda i: f"total[{i}] = {M[i]}: each row needs at least one vote (drop rows without votes)"),
        (v < 0, lambda i: f"agree[{i}] = {v[i]} is negative"),
        (v > M, lambda i: f"agree[{i}] = {v[i]} exceeds total[{i}] = {M[i]}"),
    )
    if consensus == "majority":
        minority = lambda i: (
            f"agree[{i}] = {v[i]} of total[{i}] = {M[i]} is a minority: with consensus='majority' agree counts "
            "the votes for the majority order (>= total/2); for votes counted against a label use consensus='given'"
        )
        checks += ((2 * v < M, minority),)
    for bad, message in checks:
        if bad.any():
            raise ValueError(message(int(np.argmax(bad))))
    return v, M


# ----------------------------------------------------------------------------- votes


def _vote_log_marginal(v: NDArray, M: NDArray, prior: BetaPrior, consensus: str) -> NDArray[np.float64]:
    """log P(v | M) with q integrated over the prior.

    given:    C(M, v) B(a + v, b + M - v) / B(a, b)                                  (beta-binomial)
    majority: C(M, v) [B(a + v, b + M - v) + B(a + M - v, b + v)] / B(a, b), one term at v = M/2,
              the folded likelihood Binom(v; M, q) + Binom(M - v; M, q) on the folded prior.
    """
    a, b = prior
    log_b = betaln(a + v, b + M - v)
    if consensus == "majority":
        log_b = np.where(2 * v == M, log_b, np.logaddexp(log_b, betaln(a + M - v, b + v)))
    return gammaln(M + 1.0) - gammaln(v + 1.0) - gammaln(M - v + 1.0) + log_b - betaln(a, b)


def _mean_abs_logit(alpha: NDArray, beta: NDArray) -> NDArray[np.float64]:
    """E|logit Q| for Q ~ Beta(alpha, beta): psi(alpha) - psi(beta) + 2 E[max(-logit Q, 0)], where
    E[max(-logit Q, 0)] = int_0^inf L sigma(-L)^alpha sigma(L)^beta dL / B(alpha, beta) (quadrature)."""
    L, log_w = _grid()
    alpha, beta = alpha[..., None], beta[..., None]
    log_density = alpha * log_expit(-L) + beta * log_expit(L) - betaln(alpha, beta)
    below_half = (np.exp(log_w + log_density) * L).sum(-1)
    return digamma(alpha[..., 0]) - digamma(beta[..., 0]) + 2.0 * below_half


def _vote_posterior_mean(v: NDArray, M: NDArray, prior: BetaPrior, consensus: str) -> NDArray[np.float64]:
    """E[L | v, M], L = logit q.

    given:    psi(a + v) - psi(b + M - v), the posterior Beta(a + v, b + M - v); negative when most
              annotators disagree with the label.
    majority: the posterior over Q is a mixture of Beta(a + v, b + M - v) and Beta(a + M - v, b + v)
              with weights B(.)/B(a, b), and L = |logit Q|: sum_k w_k E_k|logit Q| / sum_k w_k (>= 0).
    """
    a, b = prior
    if consensus == "given":
        return digamma(a + v) - digamma(b + M - v)
    log_w1, log_w2 = betaln(a + v, b + M - v), betaln(a + M - v, b + v)
    w1 = 1.0 / (1.0 + np.exp(log_w2 - log_w1))
    return w1 * _mean_abs_logit(a + v, b + M - v) + (1.0 - w1) * _mean_abs_logit(a + M - v, b + v)


def fit_vote_prior(agree: ArrayLike, total: ArrayLike, *, consensus: str = "majority") -> BetaPrior:
    """The empirical-Bayes prior of ``neg_log_phi_from_votes``: the Beta(a, b) maximising
    sum_n log P(v_n | M_n) (``_vote_log_marginal``). Fit it on a train split and pass it as
    ``prior`` for the others. Arguments as in ``neg_log_phi_from_votes``."""
    v, M = _check_votes(_to_numpy(agree)[0], _to_numpy(total)[0], consensus)
    if consensus == "majority" and (M < 2).all():
        return _warn_uninformative("votes")
    patterns, counts = np.unique(np.stack([v, M], axis=1), axis=0, return_counts=True)
    pv, pM = patterns[:, 0].astype(np.float64), patterns[:, 1].astype(np.float64)
    nll = lambda p: -(counts * _vote_log_marginal(pv, pM, p, consensus)).sum()
    return _fit_beta(nll, folded=consensus != "given")


def neg_log_phi_from_votes(
    agree: ArrayLike | torch.Tensor,
    total: ArrayLike | torch.Tensor,
    *,
    prior: str | tuple[float, float] | None = "empirical_bayes",
    consensus: str = "majority",
) -> NDArray[np.float64] | torch.Tensor:
    """-log phi(x) per pair from annotator votes: L = logit q, q = 1/(1 + phi) (eq. 9 at s = 1).

    Args:
        agree: (N,) integer counts v: annotators who take the consensus order.
        total: (N,) integer counts M >= 1 of annotators who voted on the pair (ties left out).
        prior: "empirical_bayes" (fit a Beta(a, b) to these rows, ``fit_vote_prior``), an explicit
            (a, b) with shapes in SHAPE_BOUNDS, or None for the raw MLE logit(v/M) (+-inf when unanimous).
        consensus: what ``agree`` counts.
            "majority": votes for the majority order of the same votes (v >= M/2), e.g. the dataset's
                chosen when chosen was decided by these votes (HelpSteer2-Preference, MultiPref). The
                likelihood is folded, Binom(v; M, q) + Binom(M - v; M, q), so L >= 0 and random
                annotators get L near 0; one vote is no evidence (its estimate is the prior mean).
            "given": votes for an order fixed independently of the votes (a label from elsewhere):
                v ~ Binom(M, q) and L = psi(a + v) - psi(b + M - v) is signed. L < 0 means most
                annotators prefer the other response (the label is probably against the center);
                the dispersion path's clamp turns it into its floor, the smallest weight.
    Returns:
        (N,) posterior means E[L | v, M], finite when a prior is set: numpy float64 for numpy or list
        input, a float64 tensor on agree's device for tensor input.
    """
    (agree_np, device), (total_np, _) = _to_numpy(agree), _to_numpy(total)
    v, M = _check_votes(agree_np, total_np, consensus)
    if prior is None:
        with np.errstate(divide="ignore"):
            return _like_input(np.log(v) - np.log(M - v), device)
    if isinstance(prior, str) and prior == "empirical_bayes":
        prior = fit_vote_prior(v, M, consensus=consensus)
    prior = _check_prior(prior)
    patterns, inverse = np.unique(np.stack([v, M], axis=1), axis=0, return_inverse=True)
    means = _vote_posterior_mean(patterns[:, 0] * 1.0, patterns[:, 1] * 1.0, prior, consensus)
    return _like_input(means[inverse.reshape(-1)], device)


PREFERENCE_KEYS = ("score", "strength", "overall_pref")  # where a dict preference holds its value


def preference_sign(value: object, where: str) -> int:
    """-1 (the first response is better), 0 (a tie) or +1 (the second is better) of one preference:
    a number (its sign), a MultiPref label (``MULTIPREF_LABELS``), or a dict holding either under
    "score" (HelpSteer3's individual_preference), "strength" (HelpSteer2-Preference's
    all_preferences_unprocessed and three_most_similar_preferences) or "overall_pref" (MultiPref).
    ``where`` names the value in errors."""
    if isinstance(value, dict):
        key = next((k for k in PREFERENCE_KEYS if k in value), None)
        if key is None:
            keys = " or ".join(repr(k) for k in PREFERENCE_KEYS)
            raise ValueError(f"{where}: a dict preference needs a {keys} key, got {sorted(value)}")
        value = value[key]
    if isinstance(value, str):
        if value not in MULTIPREF_LABELS:
            raise ValueError(f"{where}: unknown preference label {value!r}; expected one of {list(MULTIPREF_LABELS)}")
        value = MULTIPREF_LABELS[value]
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{where}: a preference must be a number or a MultiPref label, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{where}: preference {value} is not finite")
    return int(np.sign(value))


def votes_from_preferences(
    preferences: Sequence[Sequence[object]], *, overall: Sequence[object] | None = None
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(agree, total) for ``neg_log_phi_from_votes`` from per-annotator preferences.

    Each annotator's preference is a number whose sign is the vote (HelpSteer2-Preference's
    individual score in -3..3: negative = response 1 better), a MultiPref label
    (``MULTIPREF_LABELS``: "A-is-..." = first response better), or a dict holding one of them under
    one of ``PREFERENCE_KEYS`` (``preference_sign``). Only the sign counts: "slightly" and "much
    better" are one vote each.
    A tie (0, "Tie") is not a vote for either order and is left out of ``total``; a row where every
    annotator tied gets total = 0, which ``neg_log_phi_from_votes`` refuses: drop it or give it
    another dispersion source.

    Args:
        preferences: N rows, each the preferences of that pair's annotators (any number).
        overall: None, or the dataset's overall preference per row in the same forms (e.g.
            HelpSteer2-Preference's overall_preference); it must not be a tie.
    Returns:
        (agree, total), (N,) int64 each. Without ``overall``: agree = votes for the majority order,
        for consensus="majority". With it: agree = votes for the overall's side, for
        consensus="given" when the overall label did not come from these votes, and for "majority"
        when it did (every agree is then >= total/2 unless the overall used strengths).
    """
    signs = [
        [preference_sign(p, f"preferences[{n}][{m}]") for m, p in enumerate(row)] for n, row in enumerate(preferences)
    ]
    first = np.array([s.count(-1) for s in signs], dtype=np.int64)
    second = np.array([s.count(1) for s in signs], dtype=np.int64)
    if overall is None:
        return np.maximum(first, second), first + second
    if len(overall) != len(signs):
        raise ValueError(f"overall has {len(overall)} rows, preferences {len(signs)}")
    side = np.array([preference_sign(p, f"overall[{n}]") for n, p in enumerate(overall)], dtype=np.int64)
    if (side == 0).any():
        raise ValueError(f"overall[{int(np.argmax(side == 0))}] is a tie: there is no chosen side to agree with")
    return np.where(side < 0, first, second), first + second
