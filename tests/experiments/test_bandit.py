"""The bandit experiment (§5.2): exact reward/KL helpers against hand computation, the
vectorised library loss against per-beta calls and a closed-form DPO gradient, and a
short run through the CLI."""

import json
import math

import numpy as np
import pytest
import torch

from mallowspo.cli import main
from mallowspo.experiments.bandit import (
    METHODS,
    PAIRS,
    BanditConfig,
    arm_expected_rewards,
    bandit_losses,
    closed_form_gradient,
    dpo_gradient_closed_form,
    expected_reward,
    incidence_matrix,
    kl_divergence,
    library_gradient,
    link_log_derivative,
    pair_indices,
)
from mallowspo.experiments.bandit.train import train
from mallowspo.losses import preference_loss

f64 = torch.float64
NEG_LOG_PHI = -math.log(0.05)


def test_arm_expected_rewards_by_hand():
    # 20*.5+11*.5, 30*.5+3*.5, 18*.5+15*.5, 15*.99+10*.01, 1*.99+4*.01
    np.testing.assert_allclose(arm_expected_rewards(), [15.5, 16.5, 16.5, 14.95, 1.03], atol=1e-12)


def test_reward_and_kl_by_hand():
    uniform = np.full(5, 0.2)
    assert expected_reward(uniform) == pytest.approx((15.5 + 16.5 + 16.5 + 14.95 + 1.03) / 5)
    assert kl_divergence(uniform) == pytest.approx(0.0, abs=1e-15)
    one_hot = np.array([0.0, 1.0, 0.0, 0.0, 0.0])
    assert expected_reward(one_hot) == pytest.approx(16.5)
    assert kl_divergence(one_hot) == pytest.approx(math.log(5))  # 0 log 0 = 0
    half = np.array([0.5, 0.5, 0.0, 0.0, 0.0])
    assert expected_reward(half) == pytest.approx(16.0)
    assert kl_divergence(half) == pytest.approx(math.log(2.5))
    p = np.array([0.1, 0.2, 0.3, 0.25, 0.15])
    assert kl_divergence(p) == pytest.approx(sum(x * math.log(x / 0.2) for x in p))
    # batched over leading axes
    assert kl_divergence(np.stack([uniform, one_hot])).shape == (2,)


def test_pairs_are_the_papers():
    assert len(PAIRS) == 16 and PAIRS[0] == (3, 5) and PAIRS[-1] == (4, 2)
    w, l = pair_indices()
    assert w.tolist()[:4] == [2, 1, 1, 0] and l.tolist()[:4] == [4, 4, 4, 1]


@pytest.mark.parametrize("method", list(METHODS))
def test_vectorised_loss_equals_per_beta_library_calls(method):
    # bandit_losses folds beta into the log-probs and calls preference_loss with beta=1.
    torch.manual_seed(0)
    betas = torch.tensor([0.01, 0.1, 1.0, 7.0], dtype=f64)
    logits = torch.randn(4, 5, dtype=f64) * 3
    got = bandit_losses(logits, betas, method, NEG_LOG_PHI)
    w, l = pair_indices()
    ref = torch.full((16,), math.log(0.2), dtype=f64)
    for b in range(4):
        lp = torch.log_softmax(logits[b], -1)
        want = preference_loss(
            lp[w], lp[l], ref, ref, beta=float(betas[b]), neg_log_phi=torch.full((16,), NEG_LOG_PHI, dtype=f64),
            **METHODS[method],
        ).losses.mean()  # fmt: skip
        torch.testing.assert_close(got[b], want, rtol=1e-12, atol=1e-12)


def test_incidence_matrix_matches_pairs():
    d = incidence_matrix()
    w, l = pair_indices()
    assert (
        (d.sum(axis=1) == 0).all()
        and (d[np.arange(16), w.numpy()] == 1).all()
        and (d[np.arange(16), l.numpy()] == -1).all()
    )


def _spread_logits(seed: int, n: int) -> np.ndarray:
    # logits from near-uniform to far apart, so that z = beta * (theta_w - theta_l)
    # covers the cubic patch, both sides of it, and |z| up to a few hundred
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)) * np.geomspace(0.01, 40.0, n)[:, None]


@pytest.mark.parametrize("method", list(METHODS))
def test_closed_form_step_equals_autograd_of_preference_loss(method):
    betas = np.array([0.01, 0.05, 0.1, 0.5, 1.0, 3.0, 10.0])
    D = incidence_matrix()
    psi = link_log_derivative(method, NEG_LOG_PHI)
    for seed in range(3):
        logits = _spread_logits(seed, len(betas))
        got = closed_form_gradient(logits, betas, psi, D)
        want = library_gradient(logits, betas, method, NEG_LOG_PHI)
        scale = np.abs(want).max(axis=-1, keepdims=True)
        assert np.isfinite(got).all()
        assert (np.abs(got - want) <= 1e-8 * scale).all(), (np.abs(got - want) / scale).max()


def test_dpo_gradient_written_out_by_hand():
    torch.manual_seed(1)
    betas = torch.tensor([0.05, 0.5, 3.0], dtype=f64)
    logits = torch.randn(3, 5, dtype=f64) * 2
    lib = library_gradient(logits.numpy(), betas.numpy(), "dpo", NEG_LOG_PHI)
    for b in range(3):
        np.testing.assert_allclose(
            dpo_gradient_closed_form(logits[b], float(betas[b])).numpy(), lib[b], rtol=1e-10, atol=1e-15
        )


@pytest.mark.parametrize("method", ["dpo", "phi-sigmoid", "phi-cubic-0.1", "phi-cubic-adaptive"])
def test_psi_matches_autograd_of_the_library_link(method):
    # psi = d log g / dz against autograd through preference_loss's link, on both sides of
    # the cubic joins and far into the tails (where eq. 12 as a difference would cancel).
    psi = link_log_derivative(method, NEG_LOG_PHI)
    z = torch.tensor(
        [-300.0, -15.0, -6.5, -6.0, -0.1001, -0.0999, -0.05, 0.0, 0.05, 0.0999, 0.1001, 6.0, 15.0],
        dtype=f64,
        requires_grad=True,
    )
    loss = preference_loss(
        z,
        torch.zeros_like(z),
        torch.zeros_like(z),
        torch.zeros_like(z),
        beta=1.0,
        neg_log_phi=torch.full_like(z, NEG_LOG_PHI),
        **METHODS[method],
    ).losses
    (want,) = torch.autograd.grad(-loss.sum(), z)
    np.testing.assert_allclose(psi(z.detach().numpy()), want.numpy(), rtol=1e-8, atol=1e-300)


def test_training_follows_sgd_on_the_library_loss():
    # train() with the closed-form step against plain SGD with autograd through
    # preference_loss. lr 0.05 moves the policies in 30 steps while keeping SGD stable
    # (in the steep cubic patch of phi-cubic-0.1 a much larger lr * beta^2 makes the
    # iteration chaotic, and then rounding differences grow).
    cfg = BanditConfig(epochs=30, betas=(0.05,), lr=0.05, record_every=10, check_every=1000)
    runs = train(cfg, progress=False)
    betas = np.array(cfg.betas)
    for m, run in runs.items():
        logits = np.zeros((len(betas), 5))
        for _ in range(cfg.epochs):
            logits -= cfg.lr * library_gradient(logits, betas, m, cfg.neg_log_phi)
        want = torch.softmax(torch.tensor(logits), -1).numpy()
        assert np.abs(want - 0.2).max() > 1e-3, m  # it did move
        np.testing.assert_allclose(run.final_probs, want, rtol=1e-8, atol=1e-12, err_msg=m)
        np.testing.assert_allclose(run.probs[-1], want, rtol=1e-8, atol=1e-12, err_msg=m)
        assert run.library_check_max_rel_diff < 1e-8 and run.nonfinite_steps == 0


def test_phi_sigmoid_is_dpo_with_beta_times_neg_log_phi():
    # sigmoid smoothing: log g = logsigmoid(L z), so phi-sigmoid at beta == DPO at L*beta.
    torch.manual_seed(2)
    logits = torch.randn(3, 5, dtype=f64)
    betas = torch.tensor([0.05, 0.1, 1.0], dtype=f64)
    torch.testing.assert_close(
        bandit_losses(logits, betas, "phi-sigmoid", NEG_LOG_PHI),
        bandit_losses(logits, betas * NEG_LOG_PHI, "dpo", 0.0),
    )


def test_cli_short_run_writes_all_files(tmp_path):
    out = tmp_path / "bandit"
    argv = ["bandit", "--out", str(out), "--epochs", "60", "--record-every", "30", "--betas", "0.05,0.1,2"]
    assert main(argv) == 0
    for name in (
        "results.json",
        "trajectories.npz",
        "frontier_beta.png",
        "frontier_training.png",
        "arm_probs.png",
        "README.md",
    ):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert res["options"]["epochs"] == 60 and res["options"]["betas"] == [0.05, 0.1, 0.5, 1.0, 2.0]
    assert set(res["methods"]) == set(METHODS)
    for r in res["methods"].values():
        assert r["nonfinite_steps"] == 0 and r["library_check"]["max_rel_diff"] < 1e-8
        assert r["training_frontier"]["epochs"] == [0, 30, 60]
        # epoch 0 is the uniform policy: KL 0, reward = mean of the arm rewards
        assert r["training_frontier"]["mean_kl"][0] == pytest.approx(0.0, abs=1e-12)
        assert r["training_frontier"]["mean_reward"][0] == pytest.approx(12.896)
        for v in r["per_beta"].values():
            assert sum(v["final_probs"]) == pytest.approx(1.0)
            assert v["kl"] >= 0
    z = np.load(out / "trajectories.npz")
    assert z["dpo/probs"].shape == (3, 5, 5)
    assert "DPO" in (out / "README.md").read_text()
