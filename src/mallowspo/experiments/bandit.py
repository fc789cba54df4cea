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

``run_bandit`` trains (no I/O but progress lines); ``write_outputs`` writes
results.json, trajectories.npz, the figures and README.md; ``write_report`` redraws
figures and README from those files without training.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit

from mallowspo.links import cubic_patch_coefficients, log_phi_link, log_phi_link_derivative, smoothing_eps
from mallowspo.losses import preference_loss

# ----------------------------------------------------------------------------------------
# The bandit (App. C.1). Arms are numbered 1..5 in the paper, 0..4 here.
# ----------------------------------------------------------------------------------------

ARM_VALUES = ((20.0, 11.0), (30.0, 3.0), (18.0, 15.0), (15.0, 10.0), (1.0, 4.0))
ARM_PROBS = ((0.5, 0.5), (0.5, 0.5), (0.5, 0.5), (0.99, 0.01), (0.99, 0.01))
N_ARMS = len(ARM_VALUES)
# (winner, loser), 1-based as printed in the paper, in the paper's order.
PAIRS = (
    (3, 5), (2, 5), (2, 5), (1, 2), (3, 5), (1, 5), (1, 4), (1, 5),
    (4, 5), (2, 4), (2, 1), (2, 5), (1, 3), (3, 5), (3, 4), (4, 2),
)  # fmt: skip
N_PAIRS = len(PAIRS)
FRONTIER_BETAS = (0.05, 0.1, 0.5, 1.0)  # the four policies of Fig. 8b
ARM_PLOT_BETAS = (0.05, 0.1)  # the two policies of Fig. 9
DEFAULT_BETAS = tuple(float(b) for b in np.logspace(-2, 1, 16))  # 0.01 .. 10, includes 0.1 and 1

# Each method: the keyword arguments of preference_loss (loss_type is always "sigmoid").
METHODS: dict[str, dict] = {
    "dpo": {"mallows": "none"},
    "phi-sigmoid": {"mallows": "phi", "phi_smoothing": "sigmoid"},
    "phi-cubic-0.1": {"mallows": "phi", "phi_smoothing": "cubic", "smoothing_eps": 0.1},
    "phi-cubic-adaptive": {"mallows": "phi", "phi_smoothing": "cubic", "smoothing_eps": "adaptive"},
}
METHOD_LABELS = {
    "dpo": "DPO",
    "phi-sigmoid": "MallowsPO-phi (sigmoid)",
    "phi-cubic-0.1": "MallowsPO-phi (cubic, eps=0.1)",
    "phi-cubic-adaptive": "MallowsPO-phi (cubic, eps=-2 log phi)",
}


def arm_expected_rewards() -> np.ndarray:
    """E[R_i] of the five arms, (5,): 15.5, 16.5, 16.5, 14.95, 1.03."""
    return np.array([sum(v * p for v, p in zip(vals, probs)) for vals, probs in zip(ARM_VALUES, ARM_PROBS)])


def expected_reward(probs: np.ndarray) -> np.ndarray:
    """Exact expected reward sum_i pi_i E[R_i] of policies given as probabilities on the last axis."""
    return np.asarray(probs, dtype=np.float64) @ arm_expected_rewards()


def kl_divergence(probs: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
    """Exact KL(pi || ref) in nats on the last axis, 0 log 0 = 0; ref defaults to uniform."""
    p = np.asarray(probs, dtype=np.float64)
    q = np.full(p.shape[-1], 1.0 / p.shape[-1]) if ref is None else np.asarray(ref, dtype=np.float64)
    safe_p = np.where(p > 0, p, 1.0)
    return np.where(p > 0, p * (np.log(safe_p) - np.log(q)), 0.0).sum(axis=-1)


def pair_indices() -> tuple[torch.Tensor, torch.Tensor]:
    """0-based (winners, losers), each (16,)."""
    w = torch.tensor([a - 1 for a, _ in PAIRS])
    l = torch.tensor([b - 1 for _, b in PAIRS])
    return w, l


def incidence_matrix() -> np.ndarray:
    """(16, 5) D with D[k, w_k] = 1, D[k, l_k] = -1, so theta @ D.T = theta_w - theta_l per pair."""
    d = np.zeros((N_PAIRS, N_ARMS))
    for k, (w, l) in enumerate(PAIRS):
        d[k, w - 1], d[k, l - 1] = 1.0, -1.0
    return d


# ----------------------------------------------------------------------------------------
# The library loss (the reference) and its gradient in closed form (the training step).
# ----------------------------------------------------------------------------------------


def bandit_losses(logits: torch.Tensor, betas: torch.Tensor, method: str, neg_log_phi: float) -> torch.Tensor:
    """Mean ``preference_loss`` over the 16 pairs for each row of ``logits``.

    Args:
        logits: (nb, 5) policy logits, row b trained with beta ``betas[b]``.
        betas: (nb,) KL strengths.
        method: a key of ``METHODS``.
        neg_log_phi: -log phi of every pair (ignored by DPO).
    Returns:
        (nb,) the batch (mean) loss of each policy.

    preference_loss takes a scalar beta and depends on beta only through
    z = beta * Delta, so the log-probs of row b are multiplied by beta_b and the call
    uses beta = 1 (a test checks this against per-beta calls).
    """
    nb = logits.shape[0]
    w, l = pair_indices()
    scaled = torch.log_softmax(logits, dim=-1) * betas[:, None]  # beta * log pi
    ref = (betas * math.log(1.0 / N_ARMS))[:, None].expand(nb, N_PAIRS).reshape(-1)  # beta * log pi_ref
    out = preference_loss(
        scaled[:, w].reshape(-1),
        scaled[:, l].reshape(-1),
        ref,
        ref,
        loss_type="sigmoid",
        beta=1.0,
        neg_log_phi=torch.full((nb * N_PAIRS,), neg_log_phi, dtype=logits.dtype),
        **METHODS[method],
    )
    return out.losses.view(nb, N_PAIRS).mean(dim=1)


def library_gradient(logits: np.ndarray, betas: np.ndarray, method: str, neg_log_phi: float) -> np.ndarray:
    """Autograd of ``bandit_losses`` (i.e. of preference_loss) w.r.t. (nb, 5) logits, float64."""
    t = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    loss = bandit_losses(t, torch.tensor(betas, dtype=torch.float64), method, neg_log_phi).sum()
    (grad,) = torch.autograd.grad(loss, t)  # rows are independent policies
    return grad.numpy()


def link_log_derivative(method: str, neg_log_phi: float) -> Callable[[np.ndarray], np.ndarray]:
    """psi(z) = d log g(z) / dz of ``method``'s link, as a numpy function of z (any shape).

    psi is what the loss -log g(z) needs: d(-log g)/dz = -psi. The cubic patch
    coefficients and half-width come from ``mallowspo.links`` (computed once here).
    """
    kwargs = METHODS[method]
    L = float(neg_log_phi)
    if kwargs["mallows"] == "none":
        return lambda z: expit(-z)
    if kwargs["phi_smoothing"] == "sigmoid":
        return lambda z: L * expit(-L * z)
    if kwargs["phi_smoothing"] != "cubic":
        raise ValueError(f"no closed-form step for {method!r}")
    L_t = torch.tensor([L], dtype=torch.float64)
    eps_t = smoothing_eps(L_t, kwargs["smoothing_eps"])
    a3_t, a1_t, log_one_minus_G_t, D_t = cubic_patch_coefficients(eps_t, L_t)
    eps, a3, a1 = float(eps_t), float(a3_t), float(a1_t)
    one_minus_G, D = float(torch.exp(log_one_minus_G_t)), float(D_t)

    def patch_psi(z: np.ndarray) -> np.ndarray:
        """P'(z) / P(z) on [-eps, eps]; the lower half's P as the links module writes it (no cancellation)."""
        t = np.clip(-z, 0.0, None)
        lower = one_minus_G + (eps - t) * (D - a3 * (eps - t) * (t + 2.0 * eps))
        upper = (a3 * z * z + a1) * z + 0.5
        return (3.0 * a3 * z * z + a1) / np.where(z >= 0, upper, lower)

    def psi(z: np.ndarray) -> np.ndarray:
        inside = np.abs(z) <= eps
        out = np.empty_like(z)
        out[inside] = patch_psi(z[inside])
        if not inside.all():
            zo = torch.from_numpy(z[~inside])
            out[~inside] = torch.exp(log_phi_link_derivative(zo, L_t) - log_phi_link(zo, L_t)).numpy()
        return out

    return psi


def closed_form_gradient(
    logits: np.ndarray, betas: np.ndarray, psi: Callable[[np.ndarray], np.ndarray], incidence: np.ndarray
) -> np.ndarray:
    """d/dlogits of the mean loss over the pairs, for (..., nb, 5) logits and (nb,) betas.

    grad = -(beta / 16) sum_k psi(z_k) (e_{w_k} - e_{l_k}), z_k = beta (theta_{w_k} - theta_{l_k}).
    """
    z = betas[:, None] * (logits @ incidence.T)
    return -(betas[:, None] / incidence.shape[0]) * (psi(z) @ incidence)


def dpo_gradient_closed_form(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """The DPO gradient written out by hand (an independent cross-check), one policy (5,):

    dL/dlogit_j = -(beta/16) sum_k sigmoid(-beta Delta_k) (1[w_k = j] - 1[l_k = j]).
    """
    w, l = pair_indices()
    weight = torch.sigmoid(-beta * (logits[w] - logits[l])) * beta / N_PAIRS
    grad = torch.zeros_like(logits)
    grad.index_add_(0, w, -weight)
    grad.index_add_(0, l, weight)
    return grad


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BanditConfig:
    epochs: int = 500_000
    betas: tuple[float, ...] = DEFAULT_BETAS
    lr: float = 5e-3
    phi: float = 0.05
    seed: int = 0
    record_every: int = 100
    tail: int = 30  # epochs averaged for the frontier over beta
    check_every: int = 10_000  # epochs between comparisons with autograd through preference_loss
    methods: tuple[str, ...] = tuple(METHODS)

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not 0.0 < self.phi < 1.0:
            raise ValueError(f"phi must lie in (0, 1), got {self.phi}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if min(self.record_every, self.tail, self.check_every) < 1:
            raise ValueError("record_every, tail and check_every must be >= 1")
        if any(not b > 0 for b in self.betas):
            raise ValueError(f"betas must be > 0, got {self.betas}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown or no method(s) {unknown}; choose from {list(METHODS)}")
        # The beta grid always holds the four frontier betas; sorted, duplicates removed.
        grid = sorted(set(round(float(b), 12) for b in (*self.betas, *FRONTIER_BETAS)))
        object.__setattr__(self, "betas", tuple(grid))

    @property
    def neg_log_phi(self) -> float:
        return -math.log(self.phi)


@dataclass
class MethodRun:
    """What training recorded for one method; arrays over records r and betas b."""

    method: str
    epochs_recorded: np.ndarray  # (R,) epoch of each record (0 = initial policy)
    probs: np.ndarray  # (R, nb, 5) arm probabilities
    tail_reward: np.ndarray  # (nb,) reward averaged over the last `tail` epochs
    tail_kl: np.ndarray  # (nb,)
    final_probs: np.ndarray  # (nb, 5)
    library_check_max_rel_diff: float  # max |closed form - autograd(preference_loss)| / max |autograd|
    library_checks: int
    nonfinite_steps: int = 0  # steps whose gradient had a NaN/inf entry (the step is then skipped)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _check_against_library(logits: np.ndarray, betas: np.ndarray, method: str, L: float, grad: np.ndarray) -> float:
    ref = library_gradient(logits, betas, method, L)
    scale = np.abs(ref).max(axis=-1, keepdims=True)  # per policy
    return float((np.abs(grad - ref) / np.maximum(scale, 1e-300)).max())


def train(cfg: BanditConfig, progress: bool = True) -> dict[str, MethodRun]:
    """Plain SGD on every method and beta at once; see the module docstring."""
    torch.manual_seed(cfg.seed)  # nothing is random; kept so that a seed is recorded
    np.random.seed(cfg.seed)
    methods, L = cfg.methods, cfg.neg_log_phi
    betas = np.array(cfg.betas)
    nm, nb = len(methods), len(betas)
    D = incidence_matrix()
    psis = [link_log_derivative(m, L) for m in methods]
    logits = np.zeros((nm, nb, N_ARMS))
    grad = np.empty_like(logits)

    n_records = cfg.epochs // cfg.record_every + 1
    probs_rec = np.empty((n_records, nm, nb, N_ARMS))
    epochs_rec = np.zeros(n_records, dtype=np.int64)
    probs_rec[0] = _softmax(logits)
    r = 1
    tail_start = max(cfg.epochs - cfg.tail + 1, 1)
    tail_reward, tail_kl = np.zeros((nm, nb)), np.zeros((nm, nb))
    check_diff, checks, nonfinite = np.zeros(nm), 0, np.zeros(nm, dtype=np.int64)

    start = time.perf_counter()
    report_every = max(cfg.epochs // 10, 1)
    for epoch in range(1, cfg.epochs + 1):
        for i, psi in enumerate(psis):
            grad[i] = closed_form_gradient(logits[i], betas, psi, D)
        if epoch % cfg.check_every == 0 or epoch == 1 or epoch == cfg.epochs:
            checks += 1
            for i, m in enumerate(methods):
                check_diff[i] = max(check_diff[i], _check_against_library(logits[i], betas, m, L, grad[i]))
        finite = np.isfinite(grad).all(axis=(1, 2))
        if not finite.all():
            nonfinite += ~finite
            grad[~finite] = 0.0
        logits -= cfg.lr * grad
        if epoch % cfg.record_every == 0:
            probs_rec[r], epochs_rec[r] = _softmax(logits), epoch
            r += 1
        if epoch >= tail_start:
            p = _softmax(logits)
            tail_reward += expected_reward(p)
            tail_kl += kl_divergence(p)
        if progress and cfg.epochs >= 10_000 and epoch % report_every == 0:
            el = time.perf_counter() - start
            print(
                f"  epoch {epoch}/{cfg.epochs}  {el:.0f}s elapsed, ~{el / epoch * (cfg.epochs - epoch):.0f}s left",
                file=sys.stderr,
                flush=True,
            )
    n_tail = cfg.epochs - tail_start + 1
    final = _softmax(logits)
    return {
        m: MethodRun(
            method=m,
            epochs_recorded=epochs_rec[:r],
            probs=probs_rec[:r, i],
            tail_reward=tail_reward[i] / n_tail,
            tail_kl=tail_kl[i] / n_tail,
            final_probs=final[i],
            library_check_max_rel_diff=float(check_diff[i]),
            library_checks=checks,
            nonfinite_steps=int(nonfinite[i]),
        )
        for i, m in enumerate(methods)
    }


def run_bandit(cfg: BanditConfig, progress: bool = True) -> dict[str, MethodRun]:
    """Train every method of ``cfg``; returns {method: run}."""
    return train(cfg, progress)


# ----------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------


def _beta_index(betas: tuple[float, ...], beta: float) -> int:
    return min(range(len(betas)), key=lambda i: abs(betas[i] - beta))


def training_frontier(run: MethodRun, betas: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(mean reward, mean KL) over the FRONTIER_BETAS policies at each record, each (R,)."""
    idx = [_beta_index(betas, b) for b in FRONTIER_BETAS]
    p = run.probs[:, idx]
    return expected_reward(p).mean(axis=1), kl_divergence(p).mean(axis=1)


def effective_arms(probs: np.ndarray) -> np.ndarray:
    """exp(entropy): 1 for a policy on one arm, 5 for the uniform policy."""
    return np.exp(math.log(N_ARMS) - kl_divergence(probs))


def summarize(cfg: BanditConfig, runs: dict[str, MethodRun]) -> dict:
    """The results.json content (without the options and timing)."""
    out = {}
    for m, run in runs.items():
        fr_reward, fr_kl = training_frontier(run, cfg.betas)
        best = int(np.argmax(fr_reward))
        per_beta = {
            f"{b:g}": {
                "reward": float(run.tail_reward[i]),
                "kl": float(run.tail_kl[i]),
                "final_probs": [float(x) for x in run.final_probs[i]],
                "final_max_arm_prob": float(run.final_probs[i].max()),
                "final_effective_arms": float(effective_arms(run.final_probs[i])),
            }
            for i, b in enumerate(cfg.betas)
        }
        best_beta = int(np.argmax(run.tail_reward))
        out[m] = {
            "label": METHOD_LABELS[m],
            "nonfinite_steps": run.nonfinite_steps,
            "library_check": {"checks": run.library_checks, "max_rel_diff": run.library_check_max_rel_diff},
            "per_beta": per_beta,
            "best_reward_over_beta": {
                "reward": float(run.tail_reward[best_beta]),
                "kl": float(run.tail_kl[best_beta]),
                "beta": cfg.betas[best_beta],
            },
            "training_frontier": {
                "epochs": run.epochs_recorded.tolist(),
                "mean_reward": fr_reward.tolist(),
                "mean_kl": fr_kl.tolist(),
                "best": {"epoch": int(run.epochs_recorded[best]), "reward": float(fr_reward[best]), "kl": float(fr_kl[best])},
                "final": {"reward": float(fr_reward[-1]), "kl": float(fr_kl[-1])},
            },
        }
    return out


# ----------------------------------------------------------------------------------------
# Output: results.json, trajectories.npz, figures, README.md
# ----------------------------------------------------------------------------------------


def write_outputs(cfg: BanditConfig, runs: dict[str, MethodRun], out_dir: str | Path, seconds: float) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "options": {**asdict(cfg), "neg_log_phi": cfg.neg_log_phi, "frontier_betas": list(FRONTIER_BETAS)},
        "arm_expected_rewards": arm_expected_rewards().tolist(),
        "pairs": [list(p) for p in PAIRS],
        "wall_seconds": seconds,
        "methods": summarize(cfg, runs),
    }
    paths = {"results": out / "results.json", "trajectories": out / "trajectories.npz"}
    paths["results"].write_text(json.dumps(results, indent=1) + "\n")
    arrays = {"betas": np.array(cfg.betas)}
    for m, run in runs.items():
        arrays[f"{m}/epochs"] = run.epochs_recorded
        arrays[f"{m}/probs"] = run.probs.astype(np.float32)
    np.savez_compressed(paths["trajectories"], **arrays)
    paths.update(write_report(out))
    return paths


def load_outputs(out_dir: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    out = Path(out_dir)
    results = json.loads((out / "results.json").read_text())
    with np.load(out / "trajectories.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return results, arrays


def write_report(out_dir: str | Path) -> dict[str, Path]:
    """Draw the figures and write README.md from results.json and trajectories.npz."""
    out = Path(out_dir)
    results, arrays = load_outputs(out)
    paths = _plot_all(results, arrays, out)
    paths["readme"] = out / "README.md"
    paths["readme"].write_text(findings_markdown(results, arrays))
    return paths


COLORS = {"dpo": "black", "phi-sigmoid": "tab:blue", "phi-cubic-0.1": "tab:orange", "phi-cubic-adaptive": "tab:green"}


def _plot_all(results: dict, arrays: dict, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    betas = [float(b) for b in arrays["betas"]]
    arm_means = results["arm_expected_rewards"]
    paths = {}

    # Fig. 8a: reward against KL over beta.
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for m, r in methods.items():
        kl = [r["per_beta"][f"{b:g}"]["kl"] for b in betas]
        rw = [r["per_beta"][f"{b:g}"]["reward"] for b in betas]
        ax.plot(kl, rw, "o-", ms=3, color=COLORS.get(m), label=r["label"])
        for b in FRONTIER_BETAS:
            i = _beta_index(tuple(betas), b)
            ax.annotate(f"{b:g}", (kl[i], rw[i]), fontsize=6, color=COLORS.get(m), xytext=(2, 2), textcoords="offset points")
    ax.axhline(max(arm_means), ls=":", color="grey", lw=0.8)
    ax.set_xlabel("KL(pi || pi_ref)  (nats)")
    ax.set_ylabel("expected reward")
    ax.set_title(f"Frontier over beta (last {results['options']['tail']} epochs)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths["fig_frontier_beta"] = out / "frontier_beta.png"
    fig.savefig(paths["fig_frontier_beta"], dpi=80)
    plt.close(fig)

    # Fig. 8b: frontier over training.
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for m, r in methods.items():
        tf = r["training_frontier"]
        ax.plot(tf["mean_kl"], tf["mean_reward"], "-", color=COLORS.get(m), label=r["label"], lw=1.2)
        ax.plot(tf["mean_kl"][-1], tf["mean_reward"][-1], "o", color=COLORS.get(m), ms=4)
    ax.set_xlabel("mean KL(pi || pi_ref) over beta in {0.05, 0.1, 0.5, 1}")
    ax.set_ylabel("mean expected reward")
    ax.set_title("Frontier over training (dot: last epoch)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths["fig_frontier_training"] = out / "frontier_training.png"
    fig.savefig(paths["fig_frontier_training"], dpi=80)
    plt.close(fig)

    # Fig. 9: arm probabilities over training.
    names = list(methods)
    fig, axes = plt.subplots(
        len(ARM_PLOT_BETAS), len(names), figsize=(2.6 * len(names) + 0.5, 2.3 * len(ARM_PLOT_BETAS)), squeeze=False, sharey=True
    )
    for col, m in enumerate(names):
        epochs = arrays[f"{m}/epochs"]
        for row, b in enumerate(ARM_PLOT_BETAS):
            ax = axes[row][col]
            p = arrays[f"{m}/probs"][:, _beta_index(tuple(betas), b)]
            for a in range(N_ARMS):
                ax.plot(epochs, p[:, a], lw=1, label=f"arm{a + 1} ({arm_means[a]:g})")
            ax.set_title(f"{methods[m]['label']}\nbeta={b:g}", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.set_ylim(-0.02, 1.02)
            if row == len(ARM_PLOT_BETAS) - 1:
                ax.set_xlabel("epoch", fontsize=7)
    axes[0][0].set_ylabel("arm probability", fontsize=7)
    axes[-1][0].set_ylabel("arm probability", fontsize=7)
    axes[0][-1].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    paths["fig_arm_probs"] = out / "arm_probs.png"
    fig.savefig(paths["fig_arm_probs"], dpi=80)
    plt.close(fig)
    return paths


COLLAPSE_PROB = 0.9  # "collapsed onto a single arm": one arm holds at least this probability
GOOD_ARMS = (0, 1, 2)  # arms 1-3, expected rewards 15.5, 16.5, 16.5
SEVERAL_PROB = 0.1  # an arm "keeps probability" when it holds at least this


def findings_markdown(results: dict, arrays: dict) -> str:
    """README.md: what was run and what was found, with the criteria spelled out."""
    opts = results["options"]
    methods = results["methods"]
    betas = [float(b) for b in arrays["betas"]]
    small = [b for b in betas if b <= 0.1 + 1e-12]
    lines = [
        "# Bandit experiment (MallowsPO §5.2, App. C.1)",
        "",
        f"epochs {opts['epochs']}, lr {opts['lr']}, phi {opts['phi']} (-log phi = {opts['neg_log_phi']:.4f}), "
        f"betas {', '.join(f'{b:g}' for b in betas)}; wall time {results['wall_seconds']:.0f}s.",
        "Arm expected rewards: " + ", ".join(f"arm{i + 1} {v:g}" for i, v in enumerate(results["arm_expected_rewards"])) + ".",
        "",
        "Files: results.json (numbers), trajectories.npz (arm probabilities every "
        f"{opts['record_every']} epochs), frontier_beta.png (Fig. 8a), frontier_training.png (Fig. 8b), "
        "arm_probs.png (Fig. 9).",
        "",
        "## Numbers",
        "",
        "| method | best reward over beta (KL, beta) | best mean reward over training (KL, epoch) "
        "| final arm probs beta=0.05 | final arm probs beta=0.1 |",
        "|---|---|---|---|---|",
    ]
    for m, r in methods.items():
        bb = r["best_reward_over_beta"]
        tb = r["training_frontier"]["best"]
        probs = [" / ".join(f"{x:.2f}" for x in r["per_beta"][f"{b:g}"]["final_probs"]) for b in ARM_PLOT_BETAS]
        lines.append(
            f"| {r['label']} | {bb['reward']:.3f} ({bb['kl']:.3f}, {bb['beta']:g}) | {tb['reward']:.3f} "
            f"({tb['kl']:.3f}, {tb['epoch']}) | {probs[0]} | {probs[1]} |"
        )
    lines += [
        "",
        f"Closed-form step against autograd through preference_loss ({methods[next(iter(methods))]['library_check']['checks']} "
        "checks along the run), largest relative difference: "
        + ", ".join(f"{r['label']} {r['library_check']['max_rel_diff']:.1e}" for r in methods.values())
        + ".",
    ]
    bad = {m: r["nonfinite_steps"] for m, r in methods.items() if r["nonfinite_steps"]}
    if bad:
        lines.append(f"Steps skipped for a non-finite gradient: {bad}.")

    lines += [
        "",
        "## Findings (computed from the numbers above; criteria stated)",
        "",
        f"Collapse = one arm holds >= {COLLAPSE_PROB} of the final policy. "
        f"'Several good arms' = at least two of arms 1-3 hold >= {SEVERAL_PROB} each.",
        "",
    ]
    for m, r in methods.items():
        desc = []
        for b in small:
            fp = r["per_beta"][f"{b:g}"]["final_probs"]
            top = int(np.argmax(fp))
            good = sum(fp[a] >= SEVERAL_PROB for a in GOOD_ARMS)
            state = f"collapsed on arm{top + 1} ({fp[top]:.3f})" if fp[top] >= COLLAPSE_PROB else (
                f"spread ({good} of arms 1-3 >= {SEVERAL_PROB}; top arm{top + 1} {fp[top]:.2f})"
            )
            desc.append(f"beta {b:g}: {state}")
        lines.append(f"- {r['label']}: " + "; ".join(desc) + ".")
    if "dpo" in methods:
        dpo = methods["dpo"]
        d_beta = dpo["best_reward_over_beta"]["reward"]
        d_train = dpo["training_frontier"]["best"]["reward"]
        d_final = dpo["training_frontier"]["final"]
        lines += ["", "Best reward on the frontier compared with DPO:", ""]
        for m, r in methods.items():
            if m == "dpo":
                continue
            b = r["best_reward_over_beta"]["reward"]
            t = r["training_frontier"]["best"]["reward"]
            lines.append(
                f"- {r['label']}: over beta {b:.3f} vs DPO {d_beta:.3f} ({'higher' if b > d_beta + 1e-6 else 'not higher'}); "
                f"over training {t:.3f} vs DPO {d_train:.3f} ({'higher' if t > d_train + 1e-6 else 'not higher'}); "
                f"at the last epoch (mean of the four frontier policies) reward {r['training_frontier']['final']['reward']:.3f} "
                f"at KL {r['training_frontier']['final']['kl']:.3f} vs DPO {d_final['reward']:.3f} at KL {d_final['kl']:.3f}."
            )
    lines += [
        "",
        "Note: with the sigmoid smoothing, MallowsPO-phi at beta is exactly DPO at beta * (-log phi) "
        f"= {opts['neg_log_phi']:.3f} beta (same loss, same gradient), so its frontier over beta is a "
        "re-parametrisation of DPO's.",
        "",
    ]
    return "\n".join(lines)
