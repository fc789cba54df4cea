"""Preference losses: reductions to known objectives, finite-difference gradients,
finiteness at extremes, and clear errors."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mallowspo.losses import LOSS_TYPES, preference_loss

f64 = torch.float64


def batch(B=6, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(B, generator=g, dtype=f64) for _ in range(4)]


def test_theta_with_unit_dispersion_is_dpo_and_matches_textbook_formula():
    pc, pr, rc, rr = batch()
    beta = 0.2
    dpo = preference_loss(pc, pr, rc, rr, beta=beta).losses
    textbook = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    assert torch.allclose(dpo, textbook)
    theta = preference_loss(pc, pr, rc, rr, beta=beta, mallows="theta", neg_log_phi=torch.ones(6, dtype=f64)).losses
    assert torch.equal(theta, dpo)
    sigmoid_phi = preference_loss(
        pc, pr, rc, rr, beta=beta, mallows="phi", phi_smoothing="sigmoid", neg_log_phi=torch.ones(6, dtype=f64)
    ).losses
    assert torch.allclose(sigmoid_phi, dpo, rtol=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "ipo", "hinge", "simpo"])
def test_theta_scale_c_is_base_loss_with_beta_times_c(loss_type):
    # Statement 1 (Prop. 4): per example, theta with L(x) = c is the base loss at beta * c
    # (for IPO: the scaled_beta form; the authors' scaled_margin form is that times c^2, tested below).
    pc, pr, rc, rr = batch()
    c = torch.tensor([0.3, 0.7, 1.0, 1.5, 2.0, 4.0], dtype=f64)
    lengths = dict(chosen_lengths=torch.tensor([3, 5, 7, 2, 9, 4]), rejected_lengths=torch.tensor([4, 4, 6, 8, 1, 2]))
    beta, gamma = 0.3, 0.4
    theta = preference_loss(
        pc,
        pr,
        rc,
        rr,
        loss_type=loss_type,
        beta=beta,
        mallows="theta",
        neg_log_phi=c,
        label_smoothing=0.1,
        simpo_gamma=gamma,
        ipo_form="scaled_beta",
        **lengths,
    ).losses
    for i in range(6):
        # SimPO keeps its target margin in Delta units (gamma / beta), as in the authors' code.
        base = preference_loss(
            pc[i : i + 1],
            pr[i : i + 1],
            rc[i : i + 1],
            rr[i : i + 1],
            loss_type=loss_type,
            beta=beta * float(c[i]),
            label_smoothing=0.1,
            simpo_gamma=gamma * float(c[i]),
            chosen_lengths=lengths["chosen_lengths"][i : i + 1],
            rejected_lengths=lengths["rejected_lengths"][i : i + 1],
        ).losses
        assert float(theta[i]) == pytest.approx(float(base), rel=1e-12)


def test_base_objectives_match_their_papers():
    pc, pr, rc, rr = batch()
    beta, eps = 0.5, 0.2
    z = beta * ((pc - rc) - (pr - rr))
    cdpo = preference_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps).losses
    assert torch.allclose(cdpo, -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z))
    robust = preference_loss(pc, pr, rc, rr, loss_type="robust", beta=beta, label_smoothing=eps).losses
    assert torch.allclose(robust, (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps))
    ipo_sum = preference_loss(pc, pr, rc, rr, loss_type="ipo", beta=beta, length_normalize=False).losses
    assert torch.allclose(ipo_sum, ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2)
    hinge = preference_loss(pc, pr, rc, rr, loss_type="hinge", beta=beta).losses
    assert torch.allclose(hinge, torch.relu(1 - z))
    lc, lr = torch.tensor([2, 3, 4, 5, 6, 7]), torch.tensor([7, 6, 5, 4, 3, 2])
    simpo = preference_loss(
        pc, pr, loss_type="simpo", beta=2.0, simpo_gamma=0.5, chosen_lengths=lc, rejected_lengths=lr
    )
    assert torch.allclose(simpo.losses, -F.logsigmoid(2.0 * (pc / lc - pr / lr) - 0.5))
    assert torch.allclose(simpo.chosen_rewards, 2.0 * pc / lc)


def test_ipo_averages_log_ratios_per_token_by_default_as_trl():
    # trl 1.16 DPOTrainer, loss_type="ipo": ((chosen_logratio / |yw| - rejected_logratio / |yl|) - 1/(2 beta))^2;
    # its logged rewards stay the summed beta * log-ratios.
    pc, pr, rc, rr = batch()
    lc, lr = torch.tensor([2, 3, 4, 5, 6, 7]), torch.tensor([7, 6, 5, 4, 3, 2])
    beta = 0.5
    out = preference_loss(pc, pr, rc, rr, loss_type="ipo", beta=beta, chosen_lengths=lc, rejected_lengths=lr)
    per_token = (pc - rc) / lc - (pr - rr) / lr
    assert torch.allclose(out.losses, (per_token - 1 / (2 * beta)) ** 2)
    assert torch.allclose(out.chosen_rewards, beta * (pc - rc))
    assert torch.allclose(out.rejected_rewards, beta * (pr - rr))


def test_mallows_ipo_forms_authors_scaled_margin_and_scaled_beta():
    # The authors' MallowsIPO: (L Delta - 1/(2 beta))^2; the scaled_beta form (Delta - 1/(2 beta L))^2 is it / L^2:
    # same per-pair optimum Delta = 1/(2 beta L), different weights.
    pc, pr, rc, rr = batch()
    L = torch.tensor([1e-3, 0.2, 0.9, 1.0, 2.5, 4.0], dtype=f64)
    beta = 0.1
    delta = (pc - rc) - (pr - rr)
    common = dict(loss_type="ipo", beta=beta, mallows="theta", neg_log_phi=L, length_normalize=False)
    authors = preference_loss(pc, pr, rc, rr, **common).losses
    assert torch.allclose(authors, (L * delta - 1 / (2 * beta)) ** 2)
    scaled_beta = preference_loss(pc, pr, rc, rr, ipo_form="scaled_beta", **common).losses
    assert torch.allclose(scaled_beta, (delta - 1 / (2 * beta * L)) ** 2)
    assert torch.allclose(authors, scaled_beta * L**2)
    # Near-uniform reference (tiny L): the authors' form stays near (1/(2 beta))^2, the other explodes.
    assert float(authors[0]) < 30.0 and float(scaled_beta[0]) > 1e6
    # Both vanish at the same optimum.
    optimum = 1 / (2 * beta * L)
    for form in ("scaled_margin", "scaled_beta"):
        at_opt = preference_loss(
            optimum, torch.zeros_like(L), torch.zeros_like(L), torch.zeros_like(L), ipo_form=form, **common
        ).losses
        assert torch.allclose(at_opt, torch.zeros_like(L), atol=1e-9)
    with pytest.raises(ValueError, match="unknown ipo_form 'x'"):
        preference_loss(pc, pr, rc, rr, ipo_form="x", **common)


def test_phi_loss_is_minus_log_of_the_phi_link():
    from mallowspo.links import phi_link

    pc, pr, rc, rr = batch(scale=1.0)
    L = torch.full((6,), -math.log(0.3), dtype=f64)
    out = preference_loss(pc, pr, rc, rr, beta=1.0, mallows="phi", phi_smoothing="none", neg_log_phi=L)
    delta = (pc - rc) - (pr - rr)
    assert torch.allclose(out.losses, -torch.log(phi_link(delta, 0.3)))


def test_rewards_follow_trl_definitions():
    pc, pr, rc, rr = batch()
    out = preference_loss(pc, pr, rc, rr, beta=0.1)
    assert torch.allclose(out.chosen_rewards, 0.1 * (pc - rc))
    assert torch.allclose(out.rejected_rewards, 0.1 * (pr - rr))
    assert not out.chosen_rewards.requires_grad


CONFIGS = [
    (lt, m, sm, eps)
    for lt, m in itertools.product(LOSS_TYPES, ["none", "theta", "phi"])
    for sm, eps in ([("cubic", 0.1), ("cubic", "adaptive"), ("sigmoid", 0.1)] if m == "phi" else [("cubic", 0.1)])
    if not (m == "phi" and lt in ("ipo", "hinge"))
]


@pytest.mark.parametrize("loss_type,mallows,smoothing,eps", CONFIGS)
def test_gradients_match_finite_differences(loss_type, mallows, smoothing, eps):
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(5, generator=g, dtype=f64, requires_grad=True) for _ in range(2)]
    ref = [torch.randn(5, generator=g, dtype=f64) for _ in range(2)]
    L = torch.tensor([0.2, 0.9, 1.0, 2.5, 4.0], dtype=f64)

    def total(pc, pr):
        return preference_loss(
            pc,
            pr,
            *ref,
            loss_type=loss_type,
            beta=0.7,
            mallows=mallows,
            neg_log_phi=L,
            phi_smoothing=smoothing,
            smoothing_eps=eps,
            label_smoothing=0.1,
            chosen_lengths=torch.tensor([2, 3, 4, 5, 6]),
            rejected_lengths=torch.tensor([3, 3, 3, 3, 3]),
        ).losses.sum()

    assert torch.autograd.gradcheck(total, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("loss_type,mallows,smoothing,eps", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_margins_give_finite_losses_and_gradients(loss_type, mallows, smoothing, eps, dtype):
    delta = torch.tensor([-1e4, -50.0, -1e-7, 0.0, 1e-7, 50.0, 1e4], dtype=dtype)
    pc = delta.clone().requires_grad_(True)
    zeros = torch.zeros_like(delta)
    L = torch.tensor([1e-8, 0.01, 0.5, 1.0, 3.0, 9.2, 30.0], dtype=dtype)
    out = preference_loss(
        pc,
        zeros,
        zeros,
        zeros,
        loss_type=loss_type,
        beta=1.0,
        mallows=mallows,
        neg_log_phi=L,
        phi_smoothing=smoothing,
        smoothing_eps=eps,
        chosen_lengths=torch.ones(7),
        rejected_lengths=torch.ones(7),
    ).losses
    assert out.dtype == torch.float32  # half precision is computed in float32
    assert bool(torch.isfinite(out).all()), out
    out.sum().backward()
    assert bool(torch.isfinite(pc.grad).all()), pc.grad


def test_phi_smoothings_give_gradient_at_the_reference_point():
    # At pi = pi_ref, Delta = 0: the exact sgn-form link has no gradient there; both smoothings do.
    pc = torch.zeros(3, dtype=f64, requires_grad=True)
    zeros = torch.zeros(3, dtype=f64)
    L = torch.full((3,), 3.0, dtype=f64)
    for smoothing, expect_gradient in [("none", False), ("sigmoid", True), ("cubic", True)]:
        pc.grad = None
        preference_loss(
            pc, zeros, zeros, zeros, mallows="phi", neg_log_phi=L, phi_smoothing=smoothing
        ).losses.sum().backward()
        assert bool((pc.grad != 0).all()) == expect_gradient, smoothing


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(loss_type="dpo"), "unknown loss_type"),
        (dict(mallows="kendall"), "unknown Mallows variant"),
        (dict(beta=0.0), "beta must be > 0"),
        (dict(beta=-1.0), "beta must be > 0"),
        (dict(label_smoothing=0.5), "label_smoothing"),
        (dict(mallows="phi", loss_type="ipo", neg_log_phi=torch.ones(2)), "replaces the logistic link"),
        (dict(mallows="phi", smoothing_eps=0.0, neg_log_phi=torch.ones(2)), "smoothing_eps must be > 0"),
        (dict(mallows="phi", smoothing_eps="auto", neg_log_phi=torch.ones(2)), "smoothing_eps must be"),
        (dict(mallows="phi", phi_smoothing="spline", neg_log_phi=torch.ones(2)), "unknown phi smoothing"),
        (dict(mallows="theta"), "needs the per-example dispersion"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, message):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=message):
        preference_loss(x, x, x, x, **kwargs)


def test_reference_based_loss_without_reference_is_an_error():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss(x, x, loss_type="sigmoid")
    with pytest.raises(ValueError, match="length normalisation needs"):
        preference_loss(x, x, loss_type="simpo")


def test_half_precision_log_probs_are_computed_in_float32():
    # Summed log-probs of ~100 nats are 0.5 apart in bfloat16: the margin would be lost if kept there.
    pc = torch.tensor([-100.3, -120.7], dtype=torch.float64)
    pr, rc, rr = pc - 0.9, pc - 0.1, pc - 0.95
    exact = preference_loss(pc, pr, rc, rr, beta=0.5)
    for dtype in (torch.bfloat16, torch.float16):
        out = preference_loss(*(x.to(dtype) for x in (pc, pr, rc, rr)), beta=0.5)
        assert out.losses.dtype == torch.float32
        # the inputs' own rounding remains (0.25-0.5 nats per bfloat16 value), but nothing is added to it
        inputs = [x.to(dtype).double() for x in (pc, pr, rc, rr)]
        from_rounded = preference_loss(*inputs, beta=0.5)
        torch.testing.assert_close(out.losses.double(), from_rounded.losses, rtol=1e-6, atol=1e-7)
    assert exact.losses.dtype == torch.float64
