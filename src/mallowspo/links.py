"""Link functions of MallowsPO: p(y1 > y2 | x) = g(s) for a reward gap s (paper §3.2, §3.4).

Every function is batched torch and accepts a per-example dispersion. Internally the
dispersion is carried as ``L = -log phi`` (``neg_log_phi``), which is what the estimator
produces and what keeps ``phi -> 1`` (L -> 0) and ``phi -> 0`` (L -> inf) well conditioned.

Numerics: the phi link is evaluated in float64 and in log space, so there is no 0/0 at
s = 0, no cancellation in 1 - g(s) for small phi and large s, no overflow for |s| up to
1e4 and beyond, and phi = 1 (L = 0) gives exactly 1/2. Results are cast back to the
input dtype.
"""

from __future__ import annotations

import math

import torch

# Finite L is clamped to this before use (phi below exp(-700) ~ 1e-304 behaves as that);
# phi = 1 (L = 0) and phi = 0 (L = inf) are handled by explicit branches.
_MAX_NEG_LOG_PHI = 700.0


def _as_neg_log_phi(phi: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """-log(phi) as float64, broadcastable to ``like``; phi must lie in [0, 1] (phi = 0 gives inf)."""
    phi = torch.as_tensor(phi, dtype=torch.float64, device=like.device)
    if bool(((phi < 0) | (phi > 1) | torch.isnan(phi)).any()):
        raise ValueError("phi must lie in [0, 1] (it is the Mallows dispersion); got values outside it")
    return -torch.log(phi)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-x)) for x > 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x < math.log(2.0), torch.log(-torch.expm1(-x)), torch.log1p(-torch.exp(-x)))


def theta_link(s: torch.Tensor, phi: torch.Tensor | float) -> torch.Tensor:
    """MallowsPO-theta link, eq. 8: g_theta(s) = sigmoid(-2 log(phi) * s).

    Args:
        s: reward gaps, any shape.
        phi: dispersion in [0, 1], broadcastable to ``s``.
    Returns:
        probabilities with the shape of ``s``.
    """
    neg_log_phi = _as_neg_log_phi(phi, s).to(s.dtype)
    z = 2.0 * neg_log_phi * s
    return torch.sigmoid(torch.where(s == 0, torch.zeros_like(z), z))  # phi = 0, s = 0: 1/2, not inf * 0


def _log_b(x: torch.Tensor) -> torch.Tensor:
    """log B(x) = log(x / expm1(x)) for x > 0 (float64).

    Below 1e-3 the series log(1 - x/2 + x^2/12 - x^4/720) is used: the direct form
    log x - x - log(1 - e^-x) subtracts two large logs there (~ -260 at x = 1e-113) and
    loses ~1e-14 absolutely, enough to break the monotonicity of g near s = 0."""
    small = x < 1e-3
    xs = torch.where(small, x, torch.zeros_like(x))
    series = torch.log1p(-xs / 2.0 + xs.pow(2) / 12.0 - xs.pow(4) / 720.0)
    xl = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, series, torch.log(xl) - xl - log1mexp(xl))


def _log_r(a: torch.Tensor, neg_log_phi: torch.Tensor) -> torch.Tensor:
    """log of r(a) = a / expm1(a L) = B(a L) / L for a > 0, L > 0 (float64)."""
    return _log_b(a * neg_log_phi) - torch.log(neg_log_phi)


def log_phi_link_upper_tail(a: torch.Tensor, neg_log_phi: torch.Tensor) -> torch.Tensor:
    """log(1 - h(a)) for a > 0, where h(a) = g_phi(a) is eq. 9 on the positive side.

    With q(a) = a / (1 - phi^a) = a + r(a), r(a) = a / expm1(a L), eq. 9 reads
    h(a) = q(a + 1) - q(a) = 1 - (r(a) - r(a + 1)), so 1 - h(a) = r(a) - r(a + 1), a
    difference of two positive, decreasing terms that is computed in log space.

    Near uniformity ((a + 1) L < 1e-3) that difference cancels; there the expansion
    r(a) - r(a+1) = 1/2 - (2a + 1) L / 12 + ((a + 1)^4 - a^4) L^3 / 720 + O(((a+1)L)^5)
    is used instead (from x / expm1(x) = 1 - x/2 + x^2/12 - x^4/720 + ...).
    Inputs are float64 with a > 0 and L > 0.
    """
    near_uniform = (a + 1.0) * neg_log_phi < 1e-3
    a_series = torch.where(near_uniform, a, torch.zeros_like(a))
    L_series = torch.where(near_uniform, neg_log_phi, torch.zeros_like(neg_log_phi))
    series = (
        0.5 - (2.0 * a_series + 1.0) * L_series / 12.0 + ((a_series + 1.0) ** 4 - a_series**4) * L_series**3 / 720.0
    )

    a_exact = torch.where(near_uniform, torch.ones_like(a), a)
    L_exact = torch.where(near_uniform, torch.ones_like(neg_log_phi), neg_log_phi)
    log_r_a = _log_r(a_exact, L_exact)
    log_r_next = _log_r(a_exact + 1.0, L_exact)
    gap = (log_r_a - log_r_next).clamp(min=1e-300)  # r is decreasing, so gap > 0 up to rounding
    exact = log_r_a + log1mexp(gap)
    return torch.where(near_uniform, torch.log(series), exact)


def log_phi_link(s: torch.Tensor, neg_log_phi: torch.Tensor) -> torch.Tensor:
    """log g_phi(s), eq. 9, exact (the sgn form: g(0) = 1/2, jump at 0), as float64.

    Args:
        s: reward gaps, any shape (float64 preferred).
        neg_log_phi: L = -log(phi) >= 0, broadcastable to ``s``.
    """
    s, neg_log_phi = torch.broadcast_tensors(s.to(torch.float64), neg_log_phi.to(torch.float64))
    uniform = neg_log_phi <= 0.0
    certain = torch.isinf(neg_log_phi)  # phi = 0: a step, g = 1 for s > 0 and 0 for s < 0
    a = s.abs()
    # Substitute safe arguments in branches that are not selected, so that neither the
    # value nor the gradient of an unused branch can be NaN.
    # |s| below 1e-150 is the limit g(0+) to double precision; the floor avoids subnormals.
    a_safe = torch.where((a > 0) & ~uniform, a.clamp(min=1e-150), torch.ones_like(a))
    L_safe = torch.where(uniform, torch.ones_like(neg_log_phi), neg_log_phi.clamp(max=_MAX_NEG_LOG_PHI))
    log_lower = log_phi_link_upper_tail(a_safe, L_safe)  # log(1 - h(|s|)) = log g(-|s|)
    log_upper = log1mexp(-log_lower)  # log h(|s|) = log g(|s|)
    half = torch.full_like(s, -math.log(2.0))
    out = torch.where(s > 0, log_upper, torch.where(s < 0, log_lower, half))
    step = torch.where(s > 0, torch.zeros_like(s), torch.where(s < 0, torch.full_like(s, -math.inf), half))
    return torch.where(uniform, half, torch.where(certain, step, out))


def phi_link(s: torch.Tensor, phi: torch.Tensor | float) -> torch.Tensor:
    """MallowsPO-phi link, eq. 9 (Cor. 3), exact:

        g_phi(s) = (1 - sgn s)/2 + sgn(s) [ (|s|+1)/(1 - phi^{|s|+1}) - |s|/(1 - phi^{|s|}) ].

    For integer s > 0 this is the probability, under a Kendall Mallows model with any
    number of items, that the item at central rank i is ranked above the one at i + s.
    g(0) = 1/2, g(-s) = 1 - g(s), g(1) = 1/(1 + phi); phi = 1 gives 1/2 everywhere.

    Args:
        s: reward gaps, any shape.
        phi: dispersion in [0, 1], broadcastable to ``s``.
    Returns:
        probabilities with the shape and dtype of ``s``.
    """
    return torch.exp(log_phi_link(s, _as_neg_log_phi(phi, s))).to(s.dtype)


def _log_abs_b_prime(x: torch.Tensor) -> torch.Tensor:
    """log |B'(x)| for x > 0, where B(x) = x / expm1(x) and r(a) = a / expm1(a L) = B(a L) / L.

    |B'(x)| = e^{-x} (x - 1 + e^{-x}) / (1 - e^{-x})^2, decreasing from 1/2 at 0; near 0 the
    series 1/2 - x/6 + x^3/180 - x^5/5040 avoids the cancellation in x - 1 + e^{-x}.
    """
    small = x < 0.1
    xs = torch.where(small, x, torch.zeros_like(x))
    series = 0.5 - xs / 6.0 + xs.pow(3) / 180.0 - xs.pow(5) / 5040.0
    xl = torch.where(small, torch.ones_like(x), x)
    exact = -xl + torch.log(xl + torch.expm1(-xl)) - 2.0 * log1mexp(xl)
    return torch.where(small, torch.log(series), exact)


def log_phi_link_derivative(s: torch.Tensor, neg_log_phi: torch.Tensor) -> torch.Tensor:
    """log g_phi'(s) for s != 0 (eq. 12; g' is even in s), float64, accurate for all s and L.

    With a = |s|: g'(a) = r'(a + 1) - r'(a) = |B'(a L)| - |B'((a + 1) L)|, a difference of
    positive terms of different size (ratio ~ phi for large a), evaluated in log space.
    Near uniformity ((a + 1) L < 1e-3) the series L/6 - ((a + 1)^3 - a^3) L^3 / 180 is used.
    At s = 0, where g jumps, the one-sided limit is returned. phi = 1 (L = 0) gives -inf
    (g' = 0); phi = 0 (L = inf) is not supported here.
    """
    s, L = torch.broadcast_tensors(s.to(torch.float64), neg_log_phi.to(torch.float64))
    a = s.abs()
    uniform = L <= 0.0
    near_uniform = ((a + 1.0) * L < 1e-3) & ~uniform
    a_series = torch.where(near_uniform, a, torch.zeros_like(a))
    L_series = torch.where(near_uniform, L, torch.ones_like(L))
    series = L_series / 6.0 - ((a_series + 1.0) ** 3 - a_series**3) * L_series**3 / 180.0

    far = ~near_uniform & ~uniform
    a_exact = torch.where(far, a, torch.ones_like(a))
    L_exact = torch.where(far, L.clamp(max=_MAX_NEG_LOG_PHI), torch.ones_like(L))
    log_here = _log_abs_b_prime(a_exact * L_exact)
    log_next = _log_abs_b_prime((a_exact + 1.0) * L_exact)
    exact = log_here + log1mexp((log_here - log_next).clamp(min=1e-300))
    out = torch.where(near_uniform, torch.log(series), exact)
    return torch.where(uniform, torch.full_like(out, -math.inf), out)


def phi_link_derivative(s: torch.Tensor, phi: torch.Tensor | float) -> torch.Tensor:
    """d g_phi / ds for s != 0, eq. 12: g'(s) = q'(|s| + 1) - q'(|s|), q(a) = a / (1 - phi^a).

    Evaluated stably through ``log_phi_link_derivative`` (no cancellation at large |s| or
    phi near 1). At s = 0, where g jumps, the one-sided limit q'(1) - q'(0+) is returned.
    """
    return torch.exp(log_phi_link_derivative(s, _as_neg_log_phi(phi, s))).to(s.dtype)


# --------------------------------------------------------------------------------------
# Smoothings of the phi link (§3.4): g_phi is flat on each side of a jump at 0, so
# training from pi = pi_ref gets no useful gradient. Two smoothings are offered.
# --------------------------------------------------------------------------------------


def log_sigmoid_smoothed_phi_link(s: torch.Tensor, neg_log_phi: torch.Tensor) -> torch.Tensor:
    """Smoothing (i): g ~ sigmoid(-s log phi) = sigmoid(L s); equal to g_phi at s = 1.

    This makes MallowsPO-phi the same objective as MallowsPO-theta with beta halved.
    Returns log g, in the dtype of ``s``.
    """
    return torch.nn.functional.logsigmoid(neg_log_phi.to(s.dtype) * s)


def cubic_patch_coefficients(
    eps: torch.Tensor, neg_log_phi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cubic P(s) = a3 s^3 + a1 s + 1/2 joining g_phi in C1 at +-eps.

    a0 = 1/2 keeps P(s) + P(-s) = 1. Matching value G = g(eps) and slope D = g'(eps):
        a3 = (D eps - (G - 1/2)) / (2 eps^3),  a1 = D - 3 a3 eps^2.
    g is increasing and concave on (0, inf), so a3 < 0 and a1 > D > 0: P is increasing.
    Inputs float64, eps > 0. Returns (a3, a1, log(1 - G), D): the last two let the lower
    half of the patch be evaluated without cancellation (see ``log_cubic_smoothed_phi_link``).
    """
    log_one_minus_G = log_phi_link(-eps, neg_log_phi)
    G = -torch.expm1(log_one_minus_G)
    D = torch.exp(log_phi_link_derivative(eps, neg_log_phi))
    a3 = (D * eps - (G - 0.5)) / (2.0 * eps.pow(3))
    a1 = D - 3.0 * a3 * eps.pow(2)
    return a3, a1, log_one_minus_G, D


def smoothing_eps(neg_log_phi: torch.Tensor, eps: float | str) -> torch.Tensor:
    """Half-width of the cubic patch: a fixed positive number, or "adaptive" = -2 log phi = 2 L.

    The adaptive width is floored at 1e-3 so that phi = 1 stays well defined (there g is
    constant 1/2 and the patch reduces to it).
    """
    if isinstance(eps, str):
        if eps != "adaptive":
            raise ValueError(f"smoothing eps must be a positive number or 'adaptive', got {eps!r}")
        return (2.0 * neg_log_phi.to(torch.float64)).clamp(min=1e-3)
    if not eps > 0:
        raise ValueError(f"smoothing eps must be > 0, got {eps}")
    return torch.full_like(neg_log_phi, float(eps), dtype=torch.float64)


def _log_cubic_link_and_log_slope(
    s: torch.Tensor, neg_log_phi: torch.Tensor, eps: float | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """log g and log g' of the cubic-smoothed phi link, float64, broadcast shape (no autograd needed).

    Inside the patch g' = P'(s) = 3 a3 s^2 + a1 on both halves (P' is even); outside it is
    eq. 12 (``log_phi_link_derivative``)."""
    s64, L = torch.broadcast_tensors(s.to(torch.float64), neg_log_phi.to(torch.float64))
    half_width = smoothing_eps(L, eps)
    a3, a1, log_one_minus_G, D = cubic_patch_coefficients(half_width, L)
    inside = s64.abs() <= half_width
    s_in = torch.where(inside, s64, torch.zeros_like(s64))
    # Signed arguments on each half (not |s|), so the slope at s = 0 is a1, not 0.
    s_up = s_in.clamp(min=0.0)
    upper = torch.log(a3 * s_up.pow(3) + a1 * s_up + 0.5)  # log P(s) for s >= 0, P in [1/2, G]
    t = (-s_in).clamp(min=0.0)  # s = -t on the lower half
    rest = (half_width - t) * (D - a3 * (half_width - t) * (t + 2.0 * half_width))
    at_join = t >= half_width  # there use log(1 - G) itself, exact even where 1 - G underflows
    one_minus_P = torch.where(at_join, torch.ones_like(rest), torch.exp(log_one_minus_G) + rest)
    lower = torch.where(at_join, log_one_minus_G, torch.log(one_minus_P.clamp(min=1e-300)))  # log(1 - P(t))
    patch = torch.where(s64 >= 0, upper, lower)
    s_outside = torch.where(inside, half_width, s64)  # keeps the unused branch away from the jump
    log_g = torch.where(inside, patch, log_phi_link(s_outside, L))
    log_slope = torch.where(inside, torch.log(3.0 * a3 * s_in.pow(2) + a1), log_phi_link_derivative(s_outside, L))
    return log_g, log_slope


class _LogCubicSmoothedPhiLink(torch.autograd.Function):
    """log g of the cubic-smoothed phi link with the analytic derivative d log g / ds = g'/g.

    About a hundred float64 element-wise ops give the value; autograd through them would
    record and replay every one (launch-bound on a GPU). Here the backward is one product."""

    @staticmethod
    def forward(ctx, s, neg_log_phi, eps):
        log_g, log_slope = _log_cubic_link_and_log_slope(s, neg_log_phi, eps)
        ctx.save_for_backward(torch.exp(log_slope - log_g))
        ctx.s_shape, ctx.s_dtype = s.shape, s.dtype
        return log_g.to(s.dtype)

    @staticmethod
    def backward(ctx, grad):
        (d_log_g,) = ctx.saved_tensors
        grad_s = (grad.to(torch.float64) * d_log_g).sum_to_size(ctx.s_shape).to(ctx.s_dtype)
        return grad_s, None, None


def log_cubic_smoothed_phi_link(s: torch.Tensor, neg_log_phi: torch.Tensor, eps: float | str = 0.1) -> torch.Tensor:
    """Smoothing (ii): g_phi with a cubic patch P(s) on [-eps, eps] (C1 at +-eps).

    Differentiable everywhere, including s = 0, where P'(0) = a1 > 0. ``eps`` is a fixed
    half-width (the paper suggests 0.1; the default) or "adaptive" (eps = -2 log phi(x)).

    On the lower half, s = -t with t in [0, eps], P(s) = 1 - P(t) is tiny when phi is small
    and would cancel; it is evaluated as a sum of positive terms,
        1 - P(t) = (1 - G) + (eps - t) [D - a3 (eps - t) (t + 2 eps)],   a3 < 0.
    Returns log g, in the dtype of ``s``; differentiable in ``s`` (analytic g'/g), not in
    ``neg_log_phi`` (a constant of the reference model).
    """
    return _LogCubicSmoothedPhiLink.apply(s, neg_log_phi, eps)


PHI_SMOOTHINGS = ("cubic", "sigmoid", "none")


def log_smoothed_phi_link(
    s: torch.Tensor, neg_log_phi: torch.Tensor, smoothing: str = "cubic", eps: float | str = 0.1
) -> torch.Tensor:
    """log g for the phi link under a chosen smoothing: "cubic" (default), "sigmoid", or "none" (exact eq. 9)."""
    if smoothing == "cubic":
        return log_cubic_smoothed_phi_link(s, neg_log_phi, eps)
    if smoothing == "sigmoid":
        return log_sigmoid_smoothed_phi_link(s, neg_log_phi)
    if smoothing == "none":
        return log_phi_link(s, neg_log_phi).to(s.dtype)
    raise ValueError(f"unknown phi smoothing {smoothing!r}; choose one of {PHI_SMOOTHINGS}")
