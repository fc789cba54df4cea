"""The paper's bandit experiment (§5.2, App. C.1): DPO against MallowsPO-phi on a
five-armed bandit without context.

Setup (exactly the paper's):

- five arms with random rewards (value: probability)
  arm1 20:0.5 / 11:0.5, arm2 30:0.5 / 3:0.5, arm3 18:0.5 / 15:0.5,
  arm4 15:0.99 / 10:0.01, arm5 1:0.99 / 4:0.01
  (expected rewards 15.5, 16.5, 16.5, 14.95, 1.03);
- 16 observed preference pairs (winner > loser), ``PAIRS``;
- policy = softmax over 5 logits initialised at 0, reference = uniform;
- all 16 pairs in one batch (mean loss), plain SGD, lr 5e-3, 500,000 epochs (steps);
- MallowsPO-phi with phi = 0.05 for every pair (neg_log_phi = L = -log 0.05).

The paper does not say which smoothing of the phi link it used (§3.4), so MallowsPO-phi
runs under each: "sigmoid", "cubic" with eps = 0.1, "cubic" with eps = "adaptive"
(-2 log phi). DPO is ``preference_loss(loss_type="sigmoid", mallows="none")``.

The step. The loss of ``mallowspo.losses.preference_loss`` is, per pair k,
-log g(z_k) with z_k = beta * (log pi(w_k) - log pi(l_k)) (the uniform reference
cancels), and log pi(w) - log pi(l) = theta_w - theta_l (the softmax normaliser
cancels). So the gradient of the mean loss with respect to the logits is

    dL/dtheta = -(beta / 16) * sum_k psi(z_k) (e_{w_k} - e_{l_k}),   psi = d log g / dz,

with psi per method (``link_log_derivative``): DPO sigmoid(-z); phi-sigmoid
L sigmoid(-L z); phi-cubic P'(z)/P(z) inside the patch |z| <= eps, with (a3, a1) from
``mallowspo.links.cubic_patch_coefficients`` computed once, and g'(z)/g(z) of eq. 9
outside, from the library's log-space ``log_phi_link_derivative`` and ``log_phi_link``. All methods and betas are one (M, B, 5) float64
array updated in place with numpy: about 1 ms a step for all methods and betas together
(the full run took 550 s on a loaded 2-core machine), where autograd through
``preference_loss`` costs ~4 ms a step for each cubic method alone (~1300 tensor ops a call).

The product stays under test: every ``check_every`` epochs (and at the last one) the
closed-form gradient is compared with autograd through ``preference_loss``
(``library_gradient``) at the current logits of every method and beta; the largest
relative difference is recorded in results.json, and the tests check the same at random
logits and over a few hundred SGD steps.

Measured every ``record_every`` epochs: the exact expected reward sum_i pi_i E[R_i] and
the exact KL(pi || uniform) of each policy, and its arm probabilities. Over the last
``tail`` (30) epochs the reward and KL are averaged (the frontier over beta, Fig. 8a).
The frontier over training (Fig. 8b) is, at each record, the mean reward and mean KL of
the policies with beta in {0.05, 0.1, 0.5, 1.0}.

The package, one job per file:

- ``problem.py``: the bandit itself (arms and their rewards, ``PAIRS``, the exact expected
  reward and KL, the incidence matrix, the softmax);
- ``train.py``: ``BanditConfig`` and the run constants (``METHODS``, ``DEFAULT_BETAS``,
  ``FRONTIER_BETAS``), the library loss and its gradient, the closed-form step, the
  training loop and its check against the library; ``run_bandit`` trains (no I/O but
  progress lines);
- ``report.py``: the summaries; ``write_outputs`` writes results.json, trajectories.npz,
  the figures and README.md; ``write_report`` redraws figures and README from those files
  without training.
"""

from mallowspo.experiments.bandit.problem import (
    PAIRS,
    arm_expected_rewards,
    expected_reward,
    incidence_matrix,
    kl_divergence,
    pair_indices,
)
from mallowspo.experiments.bandit.report import load_outputs, summarize, write_outputs, write_report
from mallowspo.experiments.bandit.train import (
    DEFAULT_BETAS,
    METHODS,
    BanditConfig,
    MethodRun,
    bandit_losses,
    closed_form_gradient,
    dpo_gradient_closed_form,
    library_gradient,
    link_log_derivative,
    run_bandit,
)

__all__ = [
    "DEFAULT_BETAS",
    "METHODS",
    "PAIRS",
    "BanditConfig",
    "MethodRun",
    "arm_expected_rewards",
    "bandit_losses",
    "closed_form_gradient",
    "dpo_gradient_closed_form",
    "expected_reward",
    "incidence_matrix",
    "kl_divergence",
    "library_gradient",
    "link_log_derivative",
    "load_outputs",
    "pair_indices",
    "run_bandit",
    "summarize",
    "write_outputs",
    "write_report",
]
