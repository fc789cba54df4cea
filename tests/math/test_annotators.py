"""-log phi(x) from annotators (mallowspo.annotators) against independent oracles: brute-force
Mallows likelihoods over all permutations, numerical integrals of the posterior, grid searches,
and simulations from the Kendall model (mallows.sample_kendall)."""

from __future__ import annotations

import itertools
import math

import mpmath
import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from mallowspo import annotators
from mallowspo.annotators import (
    BetaPrior,
    fit_ranking_prior,
    fit_vote_prior,
    neg_log_phi_from_rankings,
    neg_log_phi_from_votes,
    votes_from_preferences,
)
from mallowspo.mallows import sample_kendall

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # no silent overflow / 0-by-0


# ----------------------------------------------------------------------------- oracles


def brute_kendall(a, b) -> int:
    n = len(a)
    return sum(1 for i in range(n) for j in range(i + 1, n) if (a[i] < a[j]) != (b[i] < b[j]))


def brute_ranking_likelihood(rankings: np.ndarray):
    """L -> P(r_1..r_M | phi = e^-L) = (1/K!) sum over every center c of prod_m phi^d(r_m, c) / Z(phi),
    with the distances and Z enumerated over all K! permutations."""
    M, K = rankings.shape
    perms = list(itertools.permutations(range(K)))
    total_distance = np.array([sum(brute_kendall(r, c) for r in rankings) for c in perms])
    own_distance = np.array([brute_kendall(p, range(K)) for p in perms])
    return lambda L: np.exp(-L * total_distance).mean() / np.exp(-L * own_distance).sum() ** M


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def beta_density_of_logit(L: float, a: float, b: float) -> float:
    """Density of L = logit Q, Q ~ Beta(a, b): q^(a-1) (1-q)^(b-1) / B(a, b) times dq/dL = q (1 - q)."""
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return math.exp(a * log_sigmoid(L) + b * log_sigmoid(-L) - log_beta)


def folded_prior_density(L: float, a: float, b: float) -> float:
    """Density of L = |logit Q| at L >= 0: the density of logit Q at L plus its mirror image at -L."""
    return beta_density_of_logit(L, a, b) + beta_density_of_logit(-L, a, b)


def binom_pmf(k: int, M: int, L: float) -> float:
    """Binom(k; M, q) at q = sigmoid(L)."""
    return math.comb(M, k) * math.exp(k * log_sigmoid(L) + (M - k) * log_sigmoid(-L))


def integral(f, lower: float) -> float:
    """int_lower^inf f for lower = 0 or -inf, in pieces, so that quad finds the narrow peaks of these tests."""
    pieces = [(0.0, 40.0, [0.5, 1, 2, 4, 6, 8, 10, 12, 15, 20]), (40.0, np.inf, None)]
    if lower < 0:
        pieces.append((-np.inf, 0.0, None))
    return sum(
        integrate.quad(f, lo, hi, points=pts, limit=400, epsabs=1e-13, epsrel=1e-11)[0] for lo, hi, pts in pieces
    )


def posterior_mean_by_quad(likelihood, prior_density, lower=0.0) -> float:
    num = integral(lambda L: L * prior_density(L) * likelihood(L), lower)
    return num / integral(lambda L: prior_density(L) * likelihood(L), lower)


def quantized(neg_log_phis: np.ndarray) -> np.ndarray:
    """True -log phi on a 0.02 grid, so that prompts sharing a value are drawn in one sample_kendall call."""
    return np.round(np.asarray(neg_log_phis) / 0.02) * 0.02


def simulate_rankings(neg_log_phis: np.ndarray, M: int, K: int, rng: np.random.Generator) -> np.ndarray:
    """(N, M, K) rankings from the Kendall model (mallows.sample_kendall), each prompt with its own
    random center: the identity-centred draws with the responses relabelled by a random permutation."""
    neg_log_phis = np.asarray(neg_log_phis)
    out = np.empty((len(neg_log_phis), M, K), dtype=np.int64)
    for L in np.unique(neg_log_phis):
        rows = np.flatnonzero(neg_log_phis == L)
        draws = sample_kendall(K, math.exp(-L), M * rows.size, seed=rng).reshape(rows.size, M, K)
        labels = rng.permuted(np.tile(np.arange(K), (rows.size, 1)), axis=1)
        out[rows] = np.take_along_axis(draws, labels[:, None, :], axis=2)
    return out


def simulate_votes(neg_log_phis: np.ndarray, M: int, rng: np.random.Generator) -> np.ndarray:
    """Votes of M annotators on the pair of responses at central ranks 1 and 2 of 4, drawn from the
    Kendall model: each agrees with the center with probability 1/(1 + phi) (eq. 9 at s = 1)."""
    neg_log_phis = np.asarray(neg_log_phis)
    agree = np.empty(len(neg_log_phis), dtype=np.int64)
    for L in np.unique(neg_log_phis):
        rows = np.flatnonzero(neg_log_phis == L)
        r = sample_kendall(4, math.exp(-L), M * rows.size, seed=rng).reshape(rows.size, M, 4)
        agree[rows] = (r[..., 1] < r[..., 2]).sum(axis=1)
    return agree


# ----------------------------------------------------------------------------- votes: exact formulas


@pytest.mark.parametrize("a, b", [(0.5, 0.5), (2.0, 7.0), (6.0, 1.5), (40.0, 3.0)])
def test_vote_marginals_are_numerical_integrals_and_sum_to_one(a, b):
    prior = BetaPrior(a, b)
    for M in (1, 2, 3, 5):
        v = np.arange(M + 1.0)
        given = np.exp(annotators._vote_log_marginal(v, np.full_like(v, M), prior, "given"))
        for k in range(M + 1):
            direct = integral(lambda L, k=k, M=M: binom_pmf(k, M, L) * beta_density_of_logit(L, a, b), -np.inf)
            assert given[k] == pytest.approx(direct, rel=1e-7)
        assert given.sum() == pytest.approx(1.0, abs=1e-12)
        v = np.arange(math.ceil(M / 2), M + 1.0)
        majority = np.exp(annotators._vote_log_marginal(v, np.full_like(v, M), prior, "majority"))
        for k, p in zip(v.astype(int), majority):
            lik = lambda L, k=k, M=M: binom_pmf(k, M, L) + (binom_pmf(M - k, M, L) if 2 * k != M else 0.0)
            direct = integral(lambda L, lik=lik: lik(L) * folded_prior_density(L, a, b), 0.0)
            assert p == pytest.approx(direct, rel=1e-7)
        assert majority.sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("a, b", [(0.5, 0.5), (3.0, 1.0), (20.0, 20.0), (1e4, 0.5)])
def test_vote_posterior_means_are_numerical_integrals(a, b):
    for M in (1, 2, 3, 4, 5):
        given = neg_log_phi_from_votes(np.arange(M + 1), np.full(M + 1, M), prior=(a, b), consensus="given")
        for k in range(M + 1):
            lik = lambda L, k=k, M=M: binom_pmf(k, M, L)
            expected = posterior_mean_by_quad(lik, lambda L: beta_density_of_logit(L, a, b), -np.inf)
            assert given[k] == pytest.approx(expected, abs=1e-6)
        v = np.arange(math.ceil(M / 2), M + 1)
        majority = neg_log_phi_from_votes(v, np.full(v.size, M), prior=(a, b))
        for k, estimate in zip(v, majority):
            lik = lambda L, k=k, M=M: binom_pmf(k, M, L) + binom_pmf(M - k, M, L)
            expected = posterior_mean_by_quad(lik, lambda L: folded_prior_density(L, a, b))
            assert estimate == pytest.approx(expected, abs=1e-6)


def test_the_fitted_prior_maximises_the_marginal_likelihood_found_by_integration():
    rng = np.random.default_rng(3)
    M = 5
    agree = simulate_votes(quantized(np.abs(special.logit(rng.beta(5.0, 1.5, 400)))), M, rng)
    majority = np.maximum(agree, M - agree)
    prior = fit_vote_prior(majority, np.full(400, M))

    def log_marginal(a, b):
        total = 0.0
        for k, count in zip(*np.unique(majority, return_counts=True)):
            lik = lambda L, k=k: binom_pmf(k, M, L) + binom_pmf(M - k, M, L)
            total += count * math.log(integral(lambda L, lik=lik: lik(L) * folded_prior_density(L, a, b), 0.0))
        return total

    # 30% steps in a or b cost several nats where the data pin them; the weak hyperprior on a + b
    # (fit_vote_prior) moves the optimum by under 0.03 nats along the flat directions.
    best = log_marginal(*prior)
    for da, db in [(1.3, 1.0), (1 / 1.3, 1.0), (1.0, 1.3), (1.0, 1 / 1.3), (1.3, 1.3), (1 / 1.3, 1 / 1.3)]:
        a, b = np.clip([prior.a * da, prior.b * db], *annotators.SHAPE_BOUNDS)
        assert best >= log_marginal(a, b) - 0.05


# ----------------------------------------------------------------------------- votes: patterns


def test_unanimous_split_and_single_votes_are_finite_with_the_prior_and_the_mle_is_infinite():
    agree, total = np.array([5, 3, 4, 1, 2, 1]), np.array([5, 5, 4, 1, 2, 2])
    for consensus in ("majority", "given"):
        estimate = neg_log_phi_from_votes(agree, total, consensus=consensus)
        assert np.isfinite(estimate).all() and estimate.dtype == np.float64
        assert np.isfinite(neg_log_phi_from_votes(agree, total, prior=(0.5, 0.5), consensus=consensus)).all()
    mle = neg_log_phi_from_votes(agree, total, prior=None)
    assert mle[0] == mle[2] == mle[3] == math.inf
    assert mle[1] == pytest.approx(math.log(3 / 2)) and mle[5] == 0.0
    assert neg_log_phi_from_votes([0, 2], [3, 4], prior=None, consensus="given")[0] == -math.inf


def test_estimates_increase_with_agreement_at_a_fixed_total():
    rng = np.random.default_rng(4)
    for M in (2, 3, 4, 5):
        agree = simulate_votes(quantized(rng.uniform(0, 3, 300)), M, rng)
        total = np.full(300, M)
        for consensus, values, counts in (
            ("given", np.arange(M + 1), agree),
            ("majority", np.arange(math.ceil(M / 2), M + 1), np.maximum(agree, M - agree)),
        ):
            prior = fit_vote_prior(counts, total, consensus=consensus)
            for p in (prior, (0.5, 0.5), (30.0, 2.0)):
                estimate = neg_log_phi_from_votes(values, np.full(values.size, M), prior=p, consensus=consensus)
                assert (np.diff(estimate) > 0).all(), (M, consensus, p, estimate)


def test_given_consensus_is_signed():
    """Against a given label, a minority that agrees gives L < 0 (not clipped); with a symmetric prior
    v and M - v give opposite values."""
    signed = neg_log_phi_from_votes([0, 1, 2, 3], [3, 3, 3, 3], prior=(2.0, 2.0), consensus="given")
    np.testing.assert_allclose(signed, -signed[::-1], atol=1e-12)
    assert signed[0] < signed[1] < 0 < signed[2] < signed[3]


def test_random_annotators_are_estimated_near_zero():
    """phi = 1: every vote a coin flip. Counted against the majority of the same votes as if it were a
    label, v >= M/2 and the estimate is biased to ~0.8; the folded likelihood removes that."""
    rng = np.random.default_rng(5)
    N, M = 2000, 5
    agree = simulate_votes(np.zeros(N), M, rng)
    majority, total = np.maximum(agree, M - agree), np.full(N, M)
    folded = neg_log_phi_from_votes(majority, total)
    as_label = neg_log_phi_from_votes(majority, total, consensus="given")
    assert folded.min() >= 0 and folded.mean() < 0.25  # L >= 0 always; over 30 simulations mean 0.08, max 0.18
    assert as_label.mean() > 0.6  # the selection bias the folded form removes
    # Against a label fixed in advance the estimate is signed and centred: the mean of N draws whose sd is
    # below 1 is within 4 / sqrt(N) of 0.
    given = neg_log_phi_from_votes(agree, total, consensus="given")
    assert abs(given.mean()) < 4 / math.sqrt(N)
    rankings = simulate_rankings(np.zeros(400), 5, 4, rng)
    assert neg_log_phi_from_rankings(rankings).mean() < 0.15  # measured 0.05


def test_votes_are_calibrated_when_the_prompts_follow_the_prior_family():
    """Posterior means are Bayes-calibrated: among the prompts given the same estimate, the mean true
    -log phi equals it. Truth: q = max(Q, 1 - Q), Q ~ Beta(6, 1.5); votes from the Kendall model."""
    rng = np.random.default_rng(6)
    N, M = 4000, 5
    truth = quantized(np.abs(special.logit(rng.beta(6.0, 1.5, N))))
    agree = simulate_votes(truth, M, rng)
    majority = np.maximum(agree, M - agree)
    estimate = neg_log_phi_from_votes(majority, np.full(N, M))
    # Over 30 such simulations the difference (mean truth - estimate) per pattern v = 3, 4, 5 has mean
    # below 0.01 and sd 0.04, 0.03, 0.09: the truth's standard error (~0.02) plus the fitted prior's,
    # largest for unanimous votes, whose estimate rests on the prior's tail. Allowed: 4 sd.
    for v, tolerance in zip((3, 4, 5), (0.17, 0.13, 0.36)):
        inside = majority == v
        assert abs(truth[inside].mean() - estimate[inside][0]) < tolerance, v
    # Against the truth, five votes take three values, so the rank correlation is moderate (measured 0.55).
    assert stats.spearmanr(estimate, truth)[0] > 0.45


# ----------------------------------------------------------------------------- rankings: exact formulas


def folded_ranking_cases():
    rng = np.random.default_rng(7)
    for K, M in [(3, 2), (3, 3), (4, 2), (4, 3)]:
        for phi in (0.2, 0.7):
            yield simulate_rankings(np.array([-math.log(phi)]), M, K, rng)[0]


@pytest.mark.parametrize("a, b", [(0.5, 0.5), (4.0, 0.8), (25.0, 25.0)])
def test_ranking_posterior_means_are_numerical_integrals_of_the_brute_force_likelihood(a, b):
    cases = list(folded_ranking_cases())
    for rankings in cases:
        lik = brute_ranking_likelihood(rankings)
        expected = posterior_mean_by_quad(lik, lambda L: folded_prior_density(L, a, b))
        assert neg_log_phi_from_rankings(rankings[None], prior=(a, b))[0] == pytest.approx(expected, abs=1e-5)


def test_ranking_mle_is_the_grid_maximum_over_center_and_phi():
    """prior=None: the joint MLE over (center, phi), found here by enumerating centers and a fine grid of L."""
    rng = np.random.default_rng(8)
    L_grid = np.linspace(0.0, 8.0, 8001)
    for K, M in [(3, 3), (4, 3), (4, 5)]:
        perms = list(itertools.permutations(range(K)))
        log_Z = np.log(np.exp(-np.outer(L_grid, [brute_kendall(p, range(K)) for p in perms])).sum(axis=1))
        for rankings in simulate_rankings(np.array([0.3, 1.0, 2.0, 5.0]), M, K, rng):
            d_min = min(sum(brute_kendall(r, c) for r in rankings) for c in perms)
            estimate = neg_log_phi_from_rankings(rankings[None], prior=None)[0]
            if d_min == 0:
                assert estimate == math.inf
                continue
            assert estimate == pytest.approx(L_grid[np.argmax(-L_grid * d_min - M * log_Z)], abs=2e-3)


def mp_posterior_mean(total_distances, own_distances, M: int, a: float, b: float):
    """E[L | rankings] at 30 digits: the folded Beta prior times (1/K!) sum_c e^{-L D_c} / Z^M."""
    with mpmath.workdps(30):
        log_beta = mpmath.loggamma(a) + mpmath.loggamma(b) - mpmath.loggamma(a + b)

    def prior(L):
        up, down = -mpmath.log1p(mpmath.exp(-L)), -mpmath.log1p(mpmath.exp(L))
        return mpmath.exp(a * up + b * down - log_beta) + mpmath.exp(b * up + a * down - log_beta)

    def lik(L):
        centers = mpmath.fsum(mpmath.exp(-L * d) for d in total_distances)
        return centers / mpmath.fsum(mpmath.exp(-L * d) for d in own_distances) ** M

    pieces = [0, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 40, mpmath.inf]
    with mpmath.workdps(30):
        return mpmath.quad(lambda L: L * prior(L) * lik(L), pieces) / mpmath.quad(lambda L: prior(L) * lik(L), pieces)


def test_many_annotators_match_a_high_precision_integral():
    """M = 400: the marginal likelihood of a split panel is ~e^-720, below double precision's range
    once scaled, so the log-sum-exp path is taken; the reference is mpmath at 30 digits."""
    K, M, a, b = 3, 400, 2.0, 1.0
    split = np.array([[0, 1, 2]] * (M // 2) + [[2, 1, 0]] * (M // 2))
    near = np.array([[0, 1, 2]] * (M - 10) + [[1, 0, 2]] * 10)
    estimate = neg_log_phi_from_rankings(np.stack([split, near]), prior=(a, b))
    perms = list(itertools.permutations(range(K)))
    own = [brute_kendall(p, range(K)) for p in perms]
    for rankings, value in zip((split, near), estimate):
        total = [sum(brute_kendall(r, c) for r in rankings) for c in perms]
        assert value == pytest.approx(float(mp_posterior_mean(total, own, M, a, b)), rel=1e-6)


def test_two_responses_ranked_are_majority_votes():
    """With K = 2 a ranking is a vote and the sum over both centers is the folded likelihood."""
    rng = np.random.default_rng(9)
    M = 4
    rankings = simulate_rankings(quantized(rng.uniform(0, 3, 300)), M, 2, rng)
    first = (rankings[..., 0] == 0).sum(axis=1)
    agree, total = np.maximum(first, M - first), np.full(300, M)
    for prior in ((0.5, 0.5), (3.0, 1.0), (200.0, 100.0)):
        np.testing.assert_allclose(
            neg_log_phi_from_rankings(rankings, prior=prior),
            neg_log_phi_from_votes(agree, total, prior=prior),
            atol=1e-7,
        )
    rank_prior, vote_prior = fit_ranking_prior(rankings), fit_vote_prior(agree, total)
    np.testing.assert_allclose(rank_prior, vote_prior, rtol=1e-3)


def test_one_ranking_per_prompt_is_no_evidence_and_gives_the_dataset_level():
    rng = np.random.default_rng(10)
    rankings = simulate_rankings(quantized(rng.uniform(0, 3, 200)), 3, 4, rng)
    prior = fit_ranking_prior(rankings)
    single = neg_log_phi_from_rankings(rankings[:5, :1], prior=prior)
    expected = posterior_mean_by_quad(lambda L: 1.0, lambda L: folded_prior_density(L, *prior))
    np.testing.assert_allclose(single, expected, atol=1e-6)
    assert np.isfinite(neg_log_phi_from_rankings(rankings[:, :1], prior=(0.5, 0.5))).all()
    assert (neg_log_phi_from_rankings(rankings[:5, :1], prior=None) == math.inf).all()
    with pytest.warns(UserWarning, match="no prompt has two or more rankings"):
        level = neg_log_phi_from_rankings(rankings[:, :1])
    np.testing.assert_allclose(level, 2 * math.log(2), atol=1e-6)  # E|logit U|, U uniform
    with pytest.warns(UserWarning, match="no prompt has two or more votes"):
        np.testing.assert_allclose(neg_log_phi_from_votes([1, 1], [1, 1]), 2 * math.log(2), atol=1e-6)


def test_rankings_are_calibrated_when_the_prompts_follow_the_prior_family():
    """K = 4 responses, M = 5 annotators, -log phi = |logit Q|, Q ~ Beta(4, 1): phi from ~0 to 1."""
    rng = np.random.default_rng(11)
    N = 800
    truth = quantized(np.abs(special.logit(rng.beta(4.0, 1.0, N))))
    estimate = neg_log_phi_from_rankings(simulate_rankings(truth, 5, 4, rng))
    # Per estimate quartile (200 prompts) the mean truth is the mean estimate: over 20 simulations the
    # difference has mean below 0.011 and sd 0.024, 0.031, 0.066, 0.093 (truth and fitted prior). Allowed: 4 sd.
    quartile = np.digitize(estimate, np.quantile(estimate, [0.25, 0.5, 0.75]))
    for k, tolerance in enumerate((0.1, 0.125, 0.26, 0.37)):
        inside = quartile == k
        assert abs(truth[inside].mean() - estimate[inside].mean()) < tolerance, k


def test_rankings_track_the_truth():
    """-log phi uniform on [0, 3] (phi from 0.05 to 1), outside the prior family."""
    rng = np.random.default_rng(12)
    truth = quantized(rng.uniform(0.0, 3.0, 800))
    estimate = neg_log_phi_from_rankings(simulate_rankings(truth, 5, 4, rng))
    assert stats.spearmanr(estimate, truth)[0] > 0.78  # 0.845 +- 0.012 over 20 simulations
    by_truth = np.array([estimate[(truth >= lo) & (truth < lo + 0.75)].mean() for lo in np.arange(0.0, 3.0, 0.75)])
    assert (np.diff(by_truth) > 0.2).all()  # the smallest step over 20 simulations: 0.36
    # Posterior means shrink towards the dataset's level, and a Beta prior has a longer tail than this
    # truth: per true-phi bin (200 prompts, SE ~0.05) the mean estimate is off by up to 0.36 (20 simulations).
    assert np.abs(by_truth - np.arange(0.375, 3.0, 0.75)).max() < 0.5


# ----------------------------------------------------------------------------- kinds, helpers, errors


def test_tensor_in_tensor_out():
    agree, total = torch.tensor([3, 4, 5, 2]), torch.tensor([5, 5, 5, 4])
    out = neg_log_phi_from_votes(agree, total, prior=(2.0, 0.7))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), neg_log_phi_from_votes(agree.numpy(), total.numpy(), prior=(2.0, 0.7)))
    rankings = torch.tensor([[[0, 1, 2], [1, 0, 2]], [[2, 1, 0], [0, 1, 2]]])
    out = neg_log_phi_from_rankings(rankings, prior=(2.0, 0.7))
    assert isinstance(out, torch.Tensor) and out.shape == (2,)
    assert isinstance(neg_log_phi_from_rankings(rankings.numpy(), prior=(2.0, 0.7)), np.ndarray)
    assert isinstance(neg_log_phi_from_votes([3.0, 4.0], [5.0, 5.0]), np.ndarray)  # whole floats are counts


def test_votes_from_helpsteer_and_multipref_preferences():
    helpsteer = [[-3, -1, 2], [1, 2, 3, 0], [0, 0]]  # negative: response 1 better; 0 a tie (not a vote)
    agree, total = votes_from_preferences(helpsteer)
    assert agree.tolist() == [2, 3, 0] and total.tolist() == [3, 3, 0]
    agree, total = votes_from_preferences(helpsteer[:2], overall=[1, 2])  # response 2 chosen in both
    assert agree.tolist() == [1, 3] and total.tolist() == [3, 3]
    multipref = [
        [{"overall_pref": "A-is-clearly-better"}, {"overall_pref": "Tie"}, {"overall_pref": "B-is-slightly-better"}],
        ["A-is-slightly-better", "A-is-clearly-better"],
    ]
    agree, total = votes_from_preferences(multipref)
    assert agree.tolist() == [1, 2] and total.tolist() == [2, 2]
    agree, _ = votes_from_preferences([[{"score": -2, "reasoning": "..."}, {"score": 1}]], overall=[-1])
    assert agree.tolist() == [1]
    with pytest.raises(ValueError, match=r"preferences\[1\]\[0\]: unknown preference label 'A-better'"):
        votes_from_preferences([[1], ["A-better"]])
    with pytest.raises(ValueError, match=r"overall\[0\] is a tie"):
        votes_from_preferences([[1]], overall=[0])


@pytest.mark.parametrize(
    "agree, total, kwargs, message",
    [
        ([[1, 2]], [[2, 2]], {}, r"agree must be a non-empty 1-D array of counts \(N,\), got shape \(1, 2\)"),
        ([1, 2], [2, 2, 2], {}, r"agree and total must have the same shape, got \(2,\) and \(3,\)"),
        ([1, 1.5], [2, 2], {}, r"agree\[1\] = 1.5 is not an integer"),
        ([1, np.nan], [2, 2], {}, r"agree\[1\] = nan is not finite"),
        ([1, 1], [2, np.inf], {}, r"total\[1\] = inf is not finite"),
        (["1"], [2], {}, r"agree must hold integers, got dtype <U1"),
        ([1, 0, 0], [2, 3, 0], {}, r"total\[2\] = 0: each row needs at least one vote"),
        ([2, -1], [2, 3], {"consensus": "given"}, r"agree\[1\] = -1 is negative"),
        ([2, 4], [2, 3], {}, r"agree\[1\] = 4 exceeds total\[1\] = 3"),
        ([2, 1], [2, 3], {}, r"agree\[1\] = 1 of total\[1\] = 3 is a minority: .* use consensus='given'"),
        ([2], [2], {"consensus": "label"}, r"consensus must be one of \('majority', 'given'\), got 'label'"),
        ([2], [2], {"prior": "eb"}, r"prior must be 'empirical_bayes', None or a pair \(a, b\), got 'eb'"),
        ([2], [2], {"prior": (0.1, 2.0)}, r"prior shapes must lie in \[0.5, 10000\], got a=0.1, b=2.0"),
        ([2], [2], {"prior": (1.0, 2.0, 3.0)}, r"prior must be .* got \(1.0, 2.0, 3.0\)"),
    ],
)
def test_bad_votes_are_refused_in_one_line(agree, total, kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        neg_log_phi_from_votes(np.array(agree), np.array(total), **kwargs)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "rankings, message",
    [
        (np.zeros((2, 3), dtype=int), r"rankings must have shape \(N prompts, M annotators, K responses\)"),
        (np.zeros((2, 3, 1), dtype=int), r"rankings must rank K = 2..7 responses .* got K = 1"),
        (np.tile(np.arange(8), (1, 2, 1)), r"got K = 8"),
        (np.array([[[0, 1, 2]], [[0, 0, 2]]]), r"rankings\[1, 0\] = \[0, 0, 2\] \(prompt 1, annotator 0\) is not a"),
        (np.array([[[0, 1, 2], [1, 2, 3]]]), r"rankings\[0, 1\] = \[1, 2, 3\] .* not a permutation of 0..2"),
        (np.array([[[0.0, 1.0, np.nan]]]), r"rankings\[0, 0, 2\] = nan is not finite"),
    ],
)
def test_bad_rankings_are_refused_in_one_line(rankings, message):
    with pytest.raises(ValueError, match=message) as error:
        neg_log_phi_from_rankings(rankings)
    assert "\n" not in str(error.value)


def test_the_dispersion_module_re_exports_the_estimators():
    from mallowspo import dispersion

    assert dispersion.neg_log_phi_from_votes is neg_log_phi_from_votes
    assert dispersion.neg_log_phi_from_rankings is neg_log_phi_from_rankings
