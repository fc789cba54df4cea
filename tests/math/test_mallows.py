"""Independent checks of mallowspo.mallows: brute force over all permutations, exact
distributions, high-precision references and properties, not restatements of the code."""

from __future__ import annotations

import itertools
import math

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from mallowspo.mallows import (
    KendallFit,
    all_rankings,
    first_place_probs,
    fit_phi_kendall,
    kendall_distance,
    kendall_expected_distance,
    kendall_log_normalizer,
    kendall_normalizer,
    log_prob_kendall,
    pairwise_prob,
    sample_kendall,
    spearman_distance,
)

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # no silent overflow / 0-by-0

PHIS = [0.0, 0.05, 0.3, 0.5, 0.8, 0.97, 1.0]


def brute_kendall(a, b) -> int:
    n = len(a)
    return sum(1 for i in range(n) for j in range(i + 1, n) if (a[i] < a[j]) != (b[i] < b[j]))


def brute_spearman(a, b) -> int:
    return sum((x - y) ** 2 for x, y in zip(a, b))


def exact_probs(n: int, phi: float, distance=kendall_distance) -> tuple[np.ndarray, np.ndarray]:
    """All rankings of n items and their Mallows probabilities phi^d / sum phi^d (0^0 = 1)."""
    perms = all_rankings(n)
    d = distance(perms, np.arange(n))
    weights = np.array([phi ** int(k) for k in d])
    return perms, weights / weights.sum()


# ----------------------------------------------------------------------------- distances


def test_all_rankings_are_every_permutation_once():
    for n in range(1, 7):
        perms = all_rankings(n)
        assert perms.shape == (math.factorial(n), n)
        assert len({tuple(p) for p in perms}) == math.factorial(n)
        assert np.all(np.sort(perms, axis=1) == np.arange(n))
        assert np.array_equal(perms[0], np.arange(n))
    with pytest.raises(ValueError, match="n must be <= 8"):
        all_rankings(9)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_distances_match_pair_loops_on_all_pairs_of_permutations(n):
    perms = all_rankings(n)
    kd = kendall_distance(perms[:, None, :], perms[None, :, :])  # (n!, n!) by broadcasting
    sd = spearman_distance(perms[:, None, :], perms[None, :, :])
    for i, j in itertools.product(range(len(perms)), repeat=2):
        assert kd[i, j] == brute_kendall(perms[i], perms[j])
        assert sd[i, j] == brute_spearman(perms[i], perms[j])


def test_kendall_distance_extremes_and_shapes():
    n = 6
    ident, rev = np.arange(n), np.arange(n)[::-1]
    assert kendall_distance(ident, rev) == n * (n - 1) // 2
    assert spearman_distance(ident, rev) == n * (n * n - 1) // 3
    batch = np.stack([ident, rev, ident])
    assert kendall_distance(batch, ident).tolist() == [0, 15, 0]
    assert kendall_distance(batch.reshape(3, 1, n), batch).shape == (3, 3)
    with pytest.raises(ValueError, match="different numbers of items"):
        kendall_distance(np.arange(3), np.arange(4))


permutation_triples = st.integers(2, 7).flatmap(
    lambda n: st.tuples(*(st.permutations(list(range(n))) for _ in range(3)))
)


@given(permutation_triples)
@settings(max_examples=150, deadline=None)
def test_distances_are_metrics(triple):
    a, b, c = (np.array(p) for p in triple)
    for dist in (kendall_distance, spearman_distance):
        assert dist(a, a) == 0
        assert dist(a, b) == dist(b, a)
        assert (dist(a, b) == 0) == np.array_equal(a, b)
    # Kendall is a metric; Spearman's rho (squared) is not, its square root is.
    assert kendall_distance(a, c) <= kendall_distance(a, b) + kendall_distance(b, c)
    assert (
        math.sqrt(spearman_distance(a, c))
        <= math.sqrt(spearman_distance(a, b)) + math.sqrt(spearman_distance(b, c)) + 1e-12
    )


@given(permutation_triples)
@settings(max_examples=100, deadline=None)
def test_kendall_distance_is_right_invariant(triple):
    # Relabelling the items the same way in both rankings does not change d.
    a, b, sigma = (np.array(p) for p in triple)
    assert kendall_distance(a[sigma], b[sigma]) == kendall_distance(a, b)


# ----------------------------------------------------------------------------- normaliser, moments


@pytest.mark.parametrize("n", range(1, 8))
def test_normalizer_equals_sum_over_all_permutations(n):
    perms = all_rankings(n)
    d = kendall_distance(perms, np.arange(n))
    for phi in PHIS:
        brute = sum(phi ** int(k) for k in d)
        assert kendall_normalizer(n, phi) == pytest.approx(brute, rel=1e-12)
        assert kendall_log_normalizer(n, phi) == pytest.approx(math.log(brute), rel=1e-12, abs=1e-14)
    assert kendall_normalizer(n, 1.0) == pytest.approx(math.factorial(n), rel=1e-12)


@pytest.mark.parametrize("n", range(1, 8))
def test_expected_distance_equals_enumeration(n):
    perms = all_rankings(n)
    d = kendall_distance(perms, np.arange(n))
    for phi in PHIS:
        w = np.array([phi ** int(k) for k in d])
        assert kendall_expected_distance(n, phi) == pytest.approx((w * d).sum() / w.sum(), rel=1e-11, abs=1e-14)


def test_normalizer_and_expectation_against_high_precision():
    mpmath.mp.dps = 50
    for n in (2, 10, 60):
        for phi in (1e-12, 1e-3, 0.4, 0.95, 1 - 1e-6, 1 - 1e-11):
            p = mpmath.mpf(phi)
            log_z = mpmath.log(mpmath.fprod((1 - p**j) / (1 - p) for j in range(1, n + 1)))
            mean_d = n * p / (1 - p) - mpmath.fsum(j * p**j / (1 - p**j) for j in range(1, n + 1))
            assert float(kendall_log_normalizer(n, phi)) == pytest.approx(float(log_z), rel=1e-11)
            assert float(kendall_expected_distance(n, phi)) == pytest.approx(float(mean_d), rel=1e-11)


def test_moments_vectorise_over_phi_and_stay_finite():
    phis = np.array([[0.0, 1e-300, 0.5], [1 - 1e-16, 1 - 1e-9, 1.0]])
    for f in (kendall_log_normalizer, kendall_normalizer, kendall_expected_distance):
        out = f(12, phis)
        assert out.shape == phis.shape and np.all(np.isfinite(out))
    assert np.all(np.diff(kendall_expected_distance(12, np.linspace(0, 1, 201))) > 0)
    assert kendall_expected_distance(12, 1.0) == pytest.approx(12 * 11 / 4)
    assert kendall_expected_distance(12, 0.0) == 0.0


@pytest.mark.parametrize("n", [1, 3, 5])
def test_log_prob_is_normalised_and_uses_the_center(n):
    perms = all_rankings(n)
    center = perms[-1]
    for phi in PHIS:
        lp = log_prob_kendall(perms, phi, center=center)
        assert np.exp(lp).sum() == pytest.approx(1.0, rel=1e-12)
        if phi < 1:
            assert lp.argmax() == len(perms) - 1
        assert not np.any(np.isnan(lp))
    assert np.isneginf(log_prob_kendall(perms[1:], 0.0)).all()


@pytest.mark.parametrize("n", range(1, 8))
def test_first_and_last_place_marginals_equal_enumeration(n):
    for phi in PHIS:
        perms, probs = exact_probs(n, phi)
        first = np.array([probs[perms[:, i] == 0].sum() for i in range(n)])
        last = np.array([probs[perms[:, i] == n - 1].sum() for i in range(n)])
        assert np.allclose(first_place_probs(n, phi), first, atol=1e-13)
        assert np.allclose(first_place_probs(n, phi)[::-1], last, atol=1e-13)


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("n", [3, 4])
@pytest.mark.parametrize("phi", [0.2, 0.6, 1.0])
def test_sampler_matches_exact_distribution(n, phi):
    draws = sample_kendall(n, phi, 200_000, seed=1234)
    perms, probs = exact_probs(n, phi)
    index = {tuple(p): k for k, p in enumerate(perms)}
    counts = np.bincount([index[tuple(r)] for r in draws], minlength=len(perms))
    assert counts.sum() == 200_000  # every draw is a permutation
    tv = 0.5 * np.abs(counts / counts.sum() - probs).sum()
    assert tv < 0.01
    assert chisquare(counts, probs * counts.sum()).pvalue > 1e-4


def test_sampler_extremes_shapes_and_validation():
    assert np.array_equal(sample_kendall(6, 0.0, 5, seed=0), np.tile(np.arange(6), (5, 1)))
    assert sample_kendall(6, 0.5, 0, seed=0).shape == (0, 6)
    assert sample_kendall(1, 0.5, 3, seed=0).tolist() == [[0], [0], [0]]
    a = sample_kendall(8, 0.7, 50, seed=np.random.default_rng(3))
    b = sample_kendall(8, 0.7, 50, seed=3)
    assert np.array_equal(a, b) and a.dtype == np.int64
    for kwargs, message in [
        (dict(n=0, phi=0.5, size=1), "n must be an integer >= 1"),
        (dict(n=3, phi=1.5, size=1), "phi must lie in"),
        (dict(n=3, phi=float("nan"), size=1), "phi must lie in"),
        (dict(n=3, phi=0.5, size=-1), "size must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            sample_kendall(seed=0, **kwargs)


def test_sampler_mean_distance_for_larger_n():
    draws = sample_kendall(15, 0.8, 20_000, seed=7)
    d = kendall_distance(draws, np.arange(15))
    expected = kendall_expected_distance(15, 0.8)
    assert abs(d.mean() - expected) < 5 * d.std() / math.sqrt(len(d))


# ----------------------------------------------------------------------------- pairwise marginals


@pytest.mark.parametrize("n", range(2, 8))
def test_kendall_pairwise_prob_equals_brute_force_marginals(n):
    """Paper §6 statement 3: for every n and every pair (i, i+gap), the marginal is g_phi(gap)."""
    for phi in (0.1, 0.5, 0.9):
        perms, probs = exact_probs(n, phi)
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                marginal = probs[perms[:, i] < perms[:, j]].sum()  # item i ranked above item j
                assert pairwise_prob(j - i, phi) == pytest.approx(marginal, abs=1e-12)


def test_kendall_pairwise_prob_paper_values():
    phi = np.linspace(0.0, 1.0, 41)
    assert np.allclose(pairwise_prob(1, phi), 1 / (1 + phi), atol=1e-14)
    assert round(float(pairwise_prob(2, 0.5)), 6) == 0.761905
    assert float(pairwise_prob(2, 0.5)) == pytest.approx(16 / 21, rel=1e-14)
    assert pairwise_prob(0, phi).tolist() == [0.5] * len(phi)


def test_kendall_pairwise_prob_tail_against_high_precision():
    mpmath.mp.dps = 50
    for a in (0.01, 0.5, 1, 3, 40, 300):
        for phi in (1e-10, 1e-3, 0.3, 0.9, 0.999, 1 - 1e-7):
            s, p = mpmath.mpf(a), mpmath.mpf(phi)
            below = 1 - ((s + 1) / (1 - p ** (s + 1)) - s / (1 - p**s))
            assert float(pairwise_prob(-a, phi)) == pytest.approx(float(below), rel=1e-10)


@pytest.mark.parametrize("gap", [0.5, 1, 2, 5])
def test_pairwise_prob_decreases_to_one_half_as_phi_grows(gap):
    phi = np.linspace(0.0, 1.0, 401)
    for model in ("kendall", "spearman"):
        g = pairwise_prob(gap, phi, model=model)
        assert g[0] == 1.0 and g[-1] == 0.5
        assert np.all(np.diff(g) <= 0)
        below = pairwise_prob(-gap, phi, model=model)  # 1 - g, accurate where g rounds to 1
        assert np.all(np.diff(below) > 0)


def test_spearman_link_is_the_exact_two_item_theta_marginal():
    perms = all_rankings(2)
    for phi in PHIS:
        _, probs = exact_probs(2, phi, distance=spearman_distance)
        top_first = probs[perms[:, 0] < perms[:, 1]].sum()
        assert pairwise_prob(1, phi, model="spearman") == pytest.approx(top_first, abs=1e-14)
        assert pairwise_prob(-1, phi, model="spearman") == pytest.approx(1 - top_first, abs=1e-14)


def test_kendall_and_spearman_links_agree_only_at_gap_one():
    # eq. 9 at gap 1 is 1/(1+phi) and eq. 8 is 1/(1+phi^2): the same curve after phi -> sqrt(phi),
    # but eq. 9's tail is not logistic, so they part beyond gap 1.
    phi = 0.5
    assert pairwise_prob(1, phi) == pytest.approx(pairwise_prob(1, phi**0.5, model="spearman"), rel=1e-14)
    assert pairwise_prob(3, phi) != pytest.approx(pairwise_prob(3, phi**0.5, model="spearman"), rel=1e-3)


def test_pairwise_prob_validation():
    with pytest.raises(ValueError, match="phi must lie in"):
        pairwise_prob(1, -0.1)
    with pytest.raises(ValueError, match="model must be"):
        pairwise_prob(1, 0.5, model="kendal")
    with pytest.raises(ValueError, match="finite"):
        pairwise_prob(np.inf, 0.5)


gaps = st.floats(-1e4, 1e4, allow_nan=False)
phis = st.one_of(st.sampled_from([0.0, 1.0, 1e-300, 1 - 1e-16]), st.floats(0.0, 1.0))


@given(gaps, phis, st.sampled_from(["kendall", "spearman"]))
@settings(max_examples=300, deadline=None)
def test_pairwise_prob_is_a_symmetric_probability(gap, phi, model):
    p, q = pairwise_prob(gap, phi, model), pairwise_prob(-gap, phi, model)
    assert 0.0 <= p <= 1.0 and np.isfinite(p)
    assert p + q == pytest.approx(1.0, abs=1e-12)
    if gap > 0:
        assert p >= 0.5


@given(st.floats(0.0, 50.0), st.floats(0.0, 50.0), st.floats(1e-6, 1 - 1e-6))
@settings(max_examples=200, deadline=None)
def test_kendall_pairwise_prob_increases_with_the_gap(s, t, phi):
    lo, hi = sorted((s, t))
    assert pairwise_prob(lo, phi) <= pairwise_prob(hi, phi) + 1e-12


def test_kendall_pairwise_prob_jump_at_zero():
    # notes §2: g(0+) = 1/(1-phi) + 1/log(phi); 0.5573 at phi = 0.5.
    assert float(pairwise_prob(1e-9, 0.5)) == pytest.approx(1 / 0.5 + 1 / math.log(0.5), abs=1e-8)
    assert round(float(pairwise_prob(1e-9, 0.5)), 4) == 0.5573


def test_pairwise_prob_broadcasts():
    out = pairwise_prob(np.arange(-3, 4)[:, None], np.array([0.0, 0.5, 1.0]))
    assert out.shape == (7, 3)
    assert out[:, 0].tolist() == [0, 0, 0, 0.5, 1, 1, 1]
    assert np.all(out[:, 2] == 0.5)


# ----------------------------------------------------------------------------- estimation


@pytest.mark.parametrize("n", [5, 10])
@pytest.mark.parametrize("phi", [0.3, 0.6, 0.9])
def test_fit_phi_recovers_the_truth(n, phi):
    draws = sample_kendall(n, phi, 20_000, seed=11)
    fit = fit_phi_kendall(draws)
    assert isinstance(fit, KendallFit)
    assert np.array_equal(fit.center, np.arange(n))  # Borda finds the center
    assert fit.phi == pytest.approx(phi, rel=0.03)
    assert float(fit) == fit.phi and fit.n_rankings == 20_000


def test_fit_phi_with_a_given_center_relabels_items():
    n, phi = 7, 0.5
    perm = np.random.default_rng(0).permutation(n)
    draws = sample_kendall(n, phi, 20_000, seed=5)[:, perm]  # item k is old item perm[k]
    center = np.arange(n)[perm]
    assert fit_phi_kendall(draws, center=center).phi == pytest.approx(phi, rel=0.03)
    assert np.array_equal(fit_phi_kendall(draws).center, center)


def test_fit_phi_is_the_likelihood_maximiser():
    draws = sample_kendall(6, 0.4, 3000, seed=2)
    fit = fit_phi_kendall(draws, center=np.arange(6))
    grid = np.linspace(0.01, 0.99, 99)
    loglik = [log_prob_kendall(draws, p).sum() for p in grid]
    assert abs(grid[int(np.argmax(loglik))] - fit.phi) <= 0.01


def test_fit_phi_boundaries():
    n = 5
    assert fit_phi_kendall(np.tile(np.arange(n), (10, 1))).phi == 0.0
    # all rankings once: mean distance is exactly the uniform mean n(n-1)/4
    fit = fit_phi_kendall(all_rankings(n), center=np.arange(n))
    assert fit.phi == 1.0 and fit.mean_distance == pytest.approx(n * (n - 1) / 4)
    # more dispersed than uniform (half identity, half reversed) -> boundary phi = 1
    both = np.array([np.arange(n), np.arange(n)[::-1]] * 5)
    assert fit_phi_kendall(both, center=np.arange(n)).phi == 1.0
    # one deviation in many draws: tiny but positive phi
    few = np.tile(np.arange(n), (10_000, 1))
    few[0, :2] = [1, 0]
    assert 0 < fit_phi_kendall(few).phi < 1e-3
    with pytest.raises(ValueError, match="center must be"):
        fit_phi_kendall(few, center=np.arange(n + 1))
