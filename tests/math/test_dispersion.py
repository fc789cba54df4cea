"""The entropy dispersion estimator (eqs. 10, 11, 17) against direct computations."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mallowspo.dispersion import (
    DispersionSource,
    dispersion_estimate,
    estimate_neg_log_phi,
    fit_phi_star,
    mean_completion_entropy,
    neg_log_phi_from_entropy,
    normalized_entropy,
)


def test_mean_completion_entropy_uses_only_masked_positions():
    H = torch.tensor([[9.0, 1.0, 2.0, 3.0], [9.0, 9.0, 4.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]])
    assert torch.allclose(mean_completion_entropy(H, mask), torch.tensor([2.0, 4.0]))
    assert float(mean_completion_entropy(H, torch.zeros_like(mask))[0]) == 0.0


def test_normalized_entropy_is_eq11_and_in_unit_interval():
    V = 1000
    chosen, rejected = torch.tensor([1.0, math.log(V)]), torch.tensor([3.0, math.log(V)])
    hbar = normalized_entropy(chosen, rejected, V)
    assert float(hbar[0]) == pytest.approx(0.5 * (1 / math.log(V) + 3 / math.log(V)))
    assert float(hbar[1]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="vocab_size"):
        normalized_entropy(chosen, rejected, 1)


def test_uniform_distribution_has_hbar_one_and_point_mass_zero():
    # Entropy of uniform logits over V is log V -> Hbar = 1; a one-hot distribution -> 0.
    V = 50
    uniform = torch.distributions.Categorical(logits=torch.zeros(3, V)).entropy()
    peaked = torch.distributions.Categorical(logits=torch.tensor([[1e4] + [0.0] * (V - 1)] * 3)).entropy()
    mask = torch.ones(1, 3)
    assert float(
        normalized_entropy(
            mean_completion_entropy(uniform[None], mask), mean_completion_entropy(uniform[None], mask), V
        )
    ) == pytest.approx(1.0)
    assert float(
        normalized_entropy(mean_completion_entropy(peaked[None], mask), mean_completion_entropy(peaked[None], mask), V)
    ) == pytest.approx(0.0, abs=1e-6)


def test_estimate_is_monotone_decreasing_in_hbar_and_bounded_at_zero():
    # Statement 7.
    hbar = torch.linspace(0.0, 1.0, 101)
    est = neg_log_phi_from_entropy(hbar, phi_star=0.29)
    assert bool((est.diff() <= 0).all()) and bool((est.diff()[:-1] < 0).any())
    assert bool(torch.isfinite(est).all())
    assert float(est[0]) == pytest.approx(-0.29 * math.log(1e-6))
    assert float(est[-1]) == 0.0


def test_mean_normalisation_gives_dataset_mean_one():
    g = torch.Generator().manual_seed(0)
    hbar = torch.rand(500, generator=g) * 0.9 + 0.01
    est, phi_star = estimate_neg_log_phi(hbar, "mean")
    assert float(est.mean()) == pytest.approx(1.0, rel=1e-6)
    assert phi_star == pytest.approx(1.0 / float((-torch.log(hbar.double())).mean()), rel=1e-6)


def test_fixed_constant_and_clamp():
    hbar = torch.tensor([1e-9, 0.1, 0.5, 1.0])
    est, phi_star = estimate_neg_log_phi(hbar, 0.29, clamp=(0.05, 2.0))
    assert phi_star == 0.29
    assert torch.allclose(est, torch.tensor([2.0, 0.29 * math.log(10), 0.29 * math.log(2), 0.05]))
    with pytest.raises(ValueError, match="clamp"):
        estimate_neg_log_phi(hbar, 0.29, clamp=(2.0, 1.0))
    with pytest.raises(ValueError, match="phi_star"):
        estimate_neg_log_phi(hbar, -1.0)
    with pytest.raises(ValueError, match="maximum entropy"):
        fit_phi_star(torch.ones(4))


def test_no_gradient_flows_through_the_estimate():
    H = torch.rand(2, 5, requires_grad=True)
    mask = torch.ones(2, 5)
    mean_entropy = mean_completion_entropy(H, mask)
    est, _ = estimate_neg_log_phi(normalized_entropy(mean_entropy, mean_entropy, vocab_size=100))
    assert not est.requires_grad
    assert float(est.mean()) == pytest.approx(1.0, rel=1e-5)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=2, max_size=40))
def test_mean_normalised_estimate_is_finite_and_nonnegative(values):
    hbar = torch.tensor(values, dtype=torch.float64)
    if float((-torch.log(hbar.clamp(1e-6, 1.0))).mean()) <= 1e-12:  # (numerically) maximum entropy everywhere
        with pytest.raises(ValueError):
            estimate_neg_log_phi(hbar)
        return
    est, _ = estimate_neg_log_phi(hbar)
    assert bool(torch.isfinite(est).all()) and bool((est >= 0).all())
    assert float(est.mean()) == pytest.approx(1.0, rel=1e-9)


# ----------------------------------------------------------------------------------------
# The one dispersion path: DispersionSource -> dispersion_estimate
# ----------------------------------------------------------------------------------------


def test_dispersion_estimate_of_each_source():
    hbar = torch.tensor([0.1, 0.2, 0.4], dtype=torch.float64)
    fitted = dispersion_estimate(DispersionSource(clamp=None), size=3, hbar=hbar)
    raw = -torch.log(hbar)
    assert torch.allclose(fitted.neg_log_phi, raw / raw.mean()) and fitted.phi_star == pytest.approx(1 / raw.mean())
    fixed = dispersion_estimate(DispersionSource(normalization=0.29, clamp=(0.05, 0.5)), size=3, hbar=hbar)
    assert torch.allclose(fixed.neg_log_phi, (0.29 * raw).clamp(0.05, 0.5)) and fixed.phi_star == 0.29
    constant = dispersion_estimate(DispersionSource(source="constant", constant=2.5), size=3)
    assert constant.neg_log_phi.tolist() == [2.5, 2.5, 2.5] and constant.phi_star is None
    column = dispersion_estimate(DispersionSource(source="column"), size=2, column=[0.3, 4.0])
    assert column.neg_log_phi.dtype == torch.float64 and column.neg_log_phi.tolist() == [0.3, 4.0]


def test_a_phi_star_fitted_on_train_is_reused_for_another_split():
    train = dispersion_estimate(DispersionSource(), size=3, hbar=torch.tensor([0.1, 0.2, 0.4]))
    other = torch.tensor([0.05, 0.5])
    reused = dispersion_estimate(DispersionSource(), size=2, hbar=other, phi_star=train.phi_star)
    assert reused.phi_star == train.phi_star
    assert torch.allclose(reused.neg_log_phi, (-train.phi_star * torch.log(other.double())).clamp(0.05, 20.0))
    assert float(reused.neg_log_phi.mean()) != pytest.approx(1.0)  # not refitted on this split
    fixed = dispersion_estimate(DispersionSource(normalization=0.29), size=2, hbar=other, phi_star=0.5)
    assert fixed.phi_star == 0.29  # a fixed normalisation stays fixed


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(source="oracle"), "unknown dispersion_source"),
        (dict(normalization="median"), "dispersion_normalization must be 'mean' or > 0"),
        (dict(normalization=0.0), "dispersion_normalization must be 'mean' or > 0"),
        (dict(clamp=(1.0,)), "dispersion_clamp needs two numbers"),
        (dict(clamp=(2.0, 1.0)), "dispersion_clamp needs 0 <= min <= max"),
        (dict(constant=0.0), "dispersion_constant must be > 0"),
    ],
)
def test_dispersion_source_rejects_bad_settings(fields, message):
    with pytest.raises(ValueError, match=message):
        DispersionSource(**fields)


def test_dispersion_estimate_needs_its_inputs():
    with pytest.raises(ValueError, match="needs Hbar"):
        dispersion_estimate(DispersionSource(), size=2)
    with pytest.raises(ValueError, match="needs the per-example values"):
        dispersion_estimate(DispersionSource(source="column"), size=2)
    with pytest.raises(ValueError, match=r"hbar has shape \(3,\), expected \(2,\)"):
        dispersion_estimate(DispersionSource(), size=2, hbar=torch.rand(3))
