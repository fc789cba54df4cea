"""Link functions against independent computations: brute-force Mallows marginals,
closed-form values from the paper, finite differences, and a NaN/inf sweep."""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mallowspo.links import (
    log_cubic_smoothed_phi_link,
    log_phi_link,
    log_smoothed_phi_link,
    phi_link,
    phi_link_derivative,
    theta_link,
)

f64 = torch.float64


def brute_force_marginal(n: int, phi: float, i: int, j: int) -> float:
    """P(item i ranked above item j) under the Kendall Mallows model, by enumeration."""
    total = above = 0.0
    for perm in itertools.permutations(range(n)):  # perm[k] = rank of item k
        inversions = sum(1 for a in range(n) for b in range(a + 1, n) if perm[a] > perm[b])
        weight = phi**inversions
        total += weight
        above += weight * (perm[i] < perm[j])
    return above / total


@pytest.mark.parametrize("n", range(2, 8))
@pytest.mark.parametrize("phi", [0.2, 0.7])
def test_phi_link_equals_brute_force_marginals(n, phi):
    # Statement 3: exact at integer gaps, for every n, depending only on the gap.
    for i in range(n):
        for j in range(i + 1, n):
            expected = brute_force_marginal(n, phi, i, j)
            got = float(phi_link(torch.tensor(float(j - i), dtype=f64), phi))
            assert got == pytest.approx(expected, abs=1e-12)
            assert float(phi_link(torch.tensor(float(i - j), dtype=f64), phi)) == pytest.approx(
                1 - expected, abs=1e-12
            )


def test_phi_link_closed_form_values():
    # Statement 4.
    for phi in [0.01, 0.3, 0.5, 0.9]:
        assert float(phi_link(torch.tensor(1.0, dtype=f64), phi)) == pytest.approx(1 / (1 + phi), rel=1e-12)
    assert float(phi_link(torch.tensor(2.0, dtype=f64), 0.5)) == pytest.approx(0.761905, abs=5e-7)
    g0_plus = float(phi_link(torch.tensor(1e-12, dtype=f64), 0.5))
    assert g0_plus == pytest.approx(1 / (1 - 0.5) + 1 / math.log(0.5), abs=1e-9)
    assert g0_plus == pytest.approx(0.5573, abs=5e-5)
    assert float(phi_link(torch.tensor(0.0, dtype=f64), 0.5)) == 0.5


def test_phi_link_decreases_towards_half_as_phi_grows():
    # Statement 5.
    phis = torch.linspace(0.01, 0.999, 200, dtype=f64)
    for s in [0.5, 1.0, 3.0, 10.0]:
        values = phi_link(torch.full_like(phis, s), phis)
        assert bool((values.diff() <= 0).all())
        resolvable = values[:-1] < 1 - 1e-12  # where g is not 1 to double precision
        assert bool((values.diff()[resolvable] < 0).all())
        assert float(values[-1]) == pytest.approx(0.5, abs=0.01 * s)
    assert float(phi_link(torch.tensor(7.0, dtype=f64), 1.0)) == 0.5


def test_phi_link_tends_to_one():
    # 1 - g(a) ~ a phi^a (1 - phi) for large a: 200 * 0.9^200 * 0.1 = 1.4e-8.
    assert 1 - float(phi_link(torch.tensor(200.0, dtype=f64), 0.9)) == pytest.approx(1.35e-8, rel=0.05)
    assert float(phi_link(torch.tensor(600.0, dtype=f64), 0.9)) == pytest.approx(1.0, abs=1e-20)


def test_phi_link_upper_tail_has_no_cancellation():
    # For small phi and large s, 1 - g(s) = g(-s) is tiny; compare with an mpmath-free
    # high-precision evaluation through Python's fractions-free float128 substitute:
    # the direct formula r(a) - r(a+1) with r(a) = a phi^a / (1 - phi^a) in log space.
    phi, a = 1e-3, 30.0
    L = -math.log(phi)
    log_r = lambda x: math.log(x) - x * L - math.log1p(-math.exp(-x * L))  # noqa: E731
    expected = log_r(a) + math.log1p(-math.exp(log_r(a + 1) - log_r(a)))
    got = float(log_phi_link(torch.tensor(-a, dtype=f64), torch.tensor(L, dtype=f64)))
    assert got == pytest.approx(expected, rel=1e-12)
    assert got < -200  # far beyond what 1 - g(s) could resolve


def test_phi_link_derivative_matches_finite_differences():
    # Statement 6 (eq. 12).
    h = 1e-6
    for phi in [0.05, 0.5, 0.95]:
        for s in [-7.0, -0.3, 0.2, 1.0, 4.5]:
            fd = (phi_link(torch.tensor(s + h, dtype=f64), phi) - phi_link(torch.tensor(s - h, dtype=f64), phi)) / (
                2 * h
            )
            assert float(phi_link_derivative(torch.tensor(s, dtype=f64), phi)) == pytest.approx(
                float(fd), rel=1e-6, abs=1e-9
            )


def test_phi_link_derivative_matches_autograd_near_zero():
    s = torch.tensor([1e-5, 1e-3, 0.05], dtype=f64, requires_grad=True)
    phi_link(s, 0.3).sum().backward()
    assert torch.allclose(s.grad, phi_link_derivative(s.detach(), 0.3), rtol=1e-7)


def test_theta_link_limits_and_symmetry():
    # Statement 2.
    s = torch.linspace(-5, 5, 41, dtype=f64)
    assert torch.allclose(theta_link(s, 1.0), torch.full_like(s, 0.5))
    assert torch.allclose(theta_link(s, 0.999999), torch.full_like(s, 0.5), atol=1e-4)
    step = theta_link(s, 1e-12)  # sigmoid(55 s): a step at the resolution of the grid
    far = s.abs() >= 0.5
    assert torch.allclose(step[far & (s > 0)], torch.ones_like(step[far & (s > 0)]), atol=1e-9)
    assert torch.allclose(step[far & (s < 0)], torch.zeros_like(step[far & (s < 0)]), atol=1e-9)
    for phi in [0.1, 0.6]:
        assert torch.allclose(theta_link(s, phi) + theta_link(-s, phi), torch.ones_like(s))


def test_theta_link_is_exact_mallows_for_two_items():
    # Eq. 8 is exact for n = 2 under the Spearman distance: d(swap) = 2, so
    # P(correct order) = 1 / (1 + phi^2) = sigmoid(-2 log phi).
    for phi in [0.1, 0.5, 0.9]:
        assert float(theta_link(torch.tensor(1.0, dtype=f64), phi)) == pytest.approx(1 / (1 + phi**2))


@pytest.mark.parametrize("eps", [0.1, 0.5, "adaptive"])
def test_cubic_smoothing_is_c1_and_monotone(eps):
    for L in [0.05, 1.0, 3.0, 9.0]:
        Lt = torch.tensor(L, dtype=f64)
        half = 2 * L if eps == "adaptive" else eps
        s = torch.linspace(-3 * half, 3 * half, 2001, dtype=f64, requires_grad=True)
        g = log_cubic_smoothed_phi_link(s, Lt, eps).exp()
        (grad,) = torch.autograd.grad(g.sum(), s)
        assert bool((grad > 0).all()), "smoothed link must be strictly increasing"
        # continuity of value and slope at the joins
        for edge in [half, -half]:
            inner = log_cubic_smoothed_phi_link(torch.tensor(edge * (1 - 1e-9), dtype=f64), Lt, eps).exp()
            exact = phi_link(torch.tensor(edge * (1 + 1e-9), dtype=f64), math.exp(-L))
            assert float(inner) == pytest.approx(float(exact), abs=1e-7)
        # equals the exact link outside the patch
        outside = s.detach().abs() > half * 1.001
        assert torch.allclose(g.detach()[outside], phi_link(s.detach()[outside], math.exp(-L)), atol=1e-12)
        # symmetric around 1/2
        assert torch.allclose(g.detach() + g.detach().flip(0), torch.ones_like(g), atol=1e-12)


def test_sigmoid_smoothing_matches_phi_link_at_one():
    for phi in [0.05, 0.5, 0.9]:
        L = torch.tensor(-math.log(phi), dtype=f64)
        approx = log_smoothed_phi_link(torch.tensor(1.0, dtype=f64), L, "sigmoid").exp()
        assert float(approx) == pytest.approx(1 / (1 + phi))


@pytest.mark.parametrize("smoothing,eps", [("none", 0.1), ("sigmoid", 0.1), ("cubic", 0.1), ("cubic", "adaptive")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_nan_or_inf_over_grid(smoothing, eps, dtype):
    s = torch.cat([torch.linspace(-50, 50, 401), torch.tensor([0.0, 1e-7, -1e-7, 1e4, -1e4])]).to(dtype)
    phis = torch.cat([torch.logspace(-4, 0, 60), torch.tensor([1.0, 0.999999])]).to(torch.float64)
    S, P = torch.meshgrid(s, phis.to(dtype), indexing="ij")
    S = S.clone().requires_grad_(True)
    L = -torch.log(P.to(torch.float64))
    out = log_smoothed_phi_link(S, L, smoothing, eps)
    assert bool(torch.isfinite(out).all())
    (grad,) = torch.autograd.grad(out.sum(), S)
    assert bool(torch.isfinite(grad).all())
    assert bool((out <= 0).all())
    s64 = torch.linspace(-50, 50, 401, dtype=f64)
    assert bool(torch.isfinite(phi_link_derivative(s64, 1e-4)).all())
    assert bool(torch.isfinite(phi_link_derivative(s64, 1.0)).all())


@pytest.mark.parametrize("a", [1e-9, 0.5, 3.0, 40.0, 700.0])
@pytest.mark.parametrize("L", [1e-15, 1e-9, 2e-5, 1e-3, 0.3, 9.0])
def test_log_tail_against_high_precision_reference(a, L):
    # Both evaluation branches (series near phi = 1, log-space formula elsewhere) against
    # eq. 9 evaluated in mpmath with enough digits: log(1 - h(a)) = log g(-a).
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50 + int(a * L / 2.3)  # 1 - h(a) ~ e^{-a L}: enough digits to resolve it
    phi = mpmath.exp(-mpmath.mpf(L))
    A = mpmath.mpf(a)
    h = (A + 1) / (1 - phi ** (A + 1)) - A / (1 - phi**A)
    expected = float(mpmath.log(1 - h))
    got = float(log_phi_link(torch.tensor(-a, dtype=f64), torch.tensor(L, dtype=f64)))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_invalid_phi_is_rejected():
    with pytest.raises(ValueError, match="phi must lie in"):
        phi_link(torch.tensor([1.0]), 1.5)
    with pytest.raises(ValueError, match="phi must lie in"):
        theta_link(torch.tensor([1.0]), -0.1)
    with pytest.raises(ValueError, match="smoothing eps"):
        log_cubic_smoothed_phi_link(torch.tensor([1.0]), torch.tensor([1.0]), 0.0)
    with pytest.raises(ValueError, match="unknown phi smoothing"):
        log_smoothed_phi_link(torch.tensor([1.0]), torch.tensor([1.0]), "spline")


@settings(max_examples=200, deadline=None)
@given(
    s=st.floats(min_value=-1e3, max_value=1e3, allow_nan=False),
    phi=st.floats(min_value=0.0, max_value=1.0),
)
def test_phi_link_symmetry_and_range(s, phi):
    st_ = torch.tensor([s, -s], dtype=f64)
    g = phi_link(st_, phi)
    assert 0.0 <= float(g[0]) <= 1.0
    assert float(g[0] + g[1]) == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(
    a=st.floats(min_value=0.0, max_value=40.0),
    b=st.floats(min_value=0.0, max_value=40.0),
    phi=st.floats(min_value=1e-4, max_value=1.0),
)
def test_phi_link_monotone_in_s(a, b, phi):
    lo, hi = sorted([a, b])
    g = phi_link(torch.tensor([lo, hi], dtype=f64), phi)
    assert float(g[0]) <= float(g[1]) + 1e-15


def test_phi_link_is_monotone_and_exact_next_to_zero():
    """Found by hypothesis: at |s| ~ 1e-113 the log form of r(a) = a / expm1(a L) lost 1e-14
    to cancellation and g(4e-113) came out above g(1e-79). g(0+) = 1 - (1/L - r(1)) exactly."""
    L = torch.tensor(0.5, dtype=f64)
    s = torch.tensor([4.436e-113, 9.88e-80, 1e-20, 1e-8], dtype=f64)
    g = torch.exp(log_phi_link(s, L))
    assert bool((g[1:] >= g[:-1]).all())
    limit = 1.0 - (1.0 / 0.5 - 1.0 / math.expm1(0.5))
    assert float(g[0]) == pytest.approx(limit, rel=1e-15)


def test_theorem1_tabular_optimal_policy_reproduces_preferences():
    # Statement 8: with r*(y) = -mu0(y), the optimal policy pi = pi_ref exp(r*/beta) / Z
    # has beta * Delta = mu0(yl) - mu0(yw), and g_phi of it is the true preference p*.
    rng = np.random.default_rng(0)
    n, beta, phi = 5, 0.3, 0.4
    pi_ref = rng.dirichlet(np.ones(n))
    mu0 = np.arange(n)  # item k has central rank k
    logits = np.log(pi_ref) - mu0 / beta
    log_pi = logits - np.logaddexp.reduce(logits)
    for w, l in itertools.combinations(range(n), 2):
        delta = (log_pi[w] - np.log(pi_ref[w])) - (log_pi[l] - np.log(pi_ref[l]))
        implied = float(phi_link(torch.tensor(beta * delta, dtype=f64), phi))
        assert implied == pytest.approx(brute_force_marginal(n, phi, w, l), abs=1e-10)


@pytest.mark.parametrize("phi", [0.05, 0.01, 1e-4])
def test_phi_link_derivative_is_accurate_at_large_gaps(phi):
    # Eq. 12 written as q'(a+1) - q'(a) cancels (both terms ~1) at large gaps; the
    # derivative must match autograd of the log-space link and stay finite and positive.
    L = torch.tensor(-math.log(phi), dtype=f64)
    s = torch.tensor([-300.0, -40.0, -15.0, 15.0, 40.0, 300.0], dtype=f64, requires_grad=True)
    log_g = log_phi_link(s, L)
    (dlog_g,) = torch.autograd.grad(log_g.sum(), s)
    derivative = phi_link_derivative(s.detach(), phi)
    ratio = torch.exp(torch.log(derivative) - log_g.detach())  # g'/g, computed in log space where g' underflows
    finite = derivative > 0
    assert torch.allclose(ratio[finite], dlog_g[finite], rtol=1e-8)
    from mallowspo.links import log_phi_link_derivative

    log_ratio = log_phi_link_derivative(s.detach(), L) - log_g.detach()
    assert torch.allclose(torch.exp(log_ratio), dlog_g, rtol=1e-8)


@pytest.mark.parametrize("phi", [0.3, 0.05, 0.01, 1e-4])
@pytest.mark.parametrize("eps", [0.1, "adaptive"])
def test_cubic_patch_lower_half_has_no_cancellation(phi, eps):
    # 1 - P(t) near t = eps is as small as 1 - g(eps); it must stay finite, match the
    # exact link at the join, and have a continuous log-slope there.
    L = torch.tensor(-math.log(phi), dtype=f64)
    half = 2 * float(L) if eps == "adaptive" else eps
    s = torch.tensor([-half, -half * (1 - 1e-7), -half * (1 + 1e-7)], dtype=f64, requires_grad=True)
    out = log_cubic_smoothed_phi_link(s, L, eps)
    assert bool(torch.isfinite(out).all())
    assert float(out[0].detach()) == pytest.approx(float(log_phi_link(torch.tensor(-half, dtype=f64), L)), rel=1e-9)
    (grad,) = torch.autograd.grad(out.sum(), s)
    assert bool(torch.isfinite(grad).all())
    if eps == 0.1:
        assert float(grad[1]) == pytest.approx(float(grad[2]), rel=1e-4)
    # (With eps = -2 log phi and small phi the patch is still C1, but 1 - P(t) climbs from
    # 1 - g(eps) ~ phi^{2L} by orders of magnitude just inside the join: log g bends sharply
    # there. This is the shape of a cubic over [-2L, 2L], and one reason 0.1 is the default.)
