"""The estimates of -log phi(x) and how they are scored against the truth.

Estimates, all from the library (``mallowspo.dispersion``):

- annotators on pairs: ``neg_log_phi_from_votes(agree, total)``, consensus "majority", with the
  votes of the first M annotators on annotator 1's pair (``AnnotatedPrompts.votes``) and the Beta
  prior fitted on the same prompts (``fit_vote_prior``); the raw posterior mean, on the scale of
  -log phi itself;
- annotators on lists: ``neg_log_phi_from_rankings`` of the first M rankings, prior
  ``fit_ranking_prior`` on the same prompts (prompts of different K share it);
- entropy: ``estimate_neg_log_phi(hbar, "mean", clamp=DEFAULT_CLAMP)``, -phi* log Hbar with phi*
  making the mean over the dataset's prompts 1, clamped to [0.05, 20], the library's defaults.

Scores: the Spearman correlation with the true -log phi (None when either side is constant: one
annotator carries no evidence, so at M = 1 every estimate is the prior mean), and the calibration,
the mean estimate per bin of the truth. The bins are the truth's distinct values when it takes at
most ``MAX_VALUE_BINS`` of them (the world: one value per template), else its deciles.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from scipy.stats import spearmanr

from mallowspo.annotators import fit_ranking_prior, fit_vote_prior
from mallowspo.dispersion import (
    DEFAULT_CLAMP,
    estimate_neg_log_phi,
    neg_log_phi_from_rankings,
    neg_log_phi_from_votes,
)
from mallowspo.experiments.annotators.data import FAMILIES, AnnotatedPrompts

MAX_VALUE_BINS = 10
DECILES = 10
ENTROPY = "entropy"  # the key of the entropy estimate next to the annotator counts "1", "2", ...


def entropy_estimate(prompts: AnnotatedPrompts) -> tuple[NDArray[np.float64], float]:
    """(N,) -phi* log Hbar(x) (eq. 10), phi* fitted so the mean is 1, clamped; and phi*."""
    estimate, phi_star = estimate_neg_log_phi(torch.as_tensor(prompts.hbar), "mean", clamp=DEFAULT_CLAMP)
    return estimate.numpy(), phi_star


def annotator_estimate(
    prompts: AnnotatedPrompts, rows: NDArray[np.int64], annotators: int, kind: str
) -> tuple[NDArray[np.float64], tuple[float, float]]:
    """(n,) E[-log phi(x) | the first ``annotators``' votes ("pairs") or rankings ("lists")] on
    ``rows``, under the empirical-Bayes prior fitted on those rows; and the prior (a, b)."""
    with warnings.catch_warnings():  # M = 1: "no prompt has two or more ...", expected here
        warnings.filterwarnings("ignore", message="no prompt has two or more")
        if kind == "pairs":
            agree, total = prompts.votes(annotators)
            agree, total = agree[rows], total[rows]
            prior = fit_vote_prior(agree, total)
            return neg_log_phi_from_votes(agree, total, prior=prior), tuple(prior)
        rankings = [prompts.rankings[n][:annotators] for n in rows]
        prior = fit_ranking_prior(rankings)
        return neg_log_phi_from_rankings(rankings, prior=prior), tuple(prior)


def _constant(values: NDArray[np.float64]) -> bool:
    """Equal up to rounding: at M = 1 the ranking estimate is the prior mean for every K, but the
    quadrature's sums differ in the last digits between K, and ranking those would be noise."""
    return bool(np.ptp(values) <= 1e-9 * max(1.0, float(np.abs(values).max())))


def spearman(estimate: NDArray[np.float64], truth: NDArray[np.float64]) -> float | None:
    """Spearman's rho, or None when it is undefined (fewer than 3 prompts, or a constant side)."""
    if len(truth) < 3 or _constant(estimate) or _constant(truth):
        return None
    return float(spearmanr(estimate, truth).statistic)


def truth_bins(truth: NDArray[np.float64], template: NDArray[np.str_]) -> tuple[str, list[str], NDArray[np.int64]]:
    """(binning, labels, (N,) bin of each prompt): the distinct true values (labelled by their
    templates when the data has them) if there are at most ``MAX_VALUE_BINS``, else deciles."""
    values = np.unique(truth)
    if len(values) <= MAX_VALUE_BINS:
        index = np.searchsorted(values, truth)
        labels = []
        for b, v in enumerate(values):
            names = sorted(set(template[index == b]) - {""})
            labels.append(f"{'/'.join(names)} ({v:.2f})" if names else f"{v:.2f}")
        return "distinct true values", labels, index
    edges = np.quantile(truth, np.linspace(0, 1, DECILES + 1))
    index = np.clip(np.searchsorted(edges, truth, side="right") - 1, 0, DECILES - 1)
    labels = [f"[{edges[b]:.2f}, {edges[b + 1]:.2f}]" for b in range(DECILES)]
    return "deciles of the truth", labels, index


def _calibration(
    truth: NDArray[np.float64], template: NDArray[np.str_], estimates: dict[str, NDArray[np.float64]]
) -> dict[str, Any]:
    binning, labels, index = truth_bins(truth, template)
    bins = [
        {
            "label": label,
            "count": int((index == b).sum()),
            "truth": float(truth[index == b].mean()),
            "estimates": {key: float(est[index == b].mean()) for key, est in estimates.items()},
        }
        for b, label in enumerate(labels)
        if (index == b).any()
    ]
    # count-weighted mean |mean estimate - mean truth| over the bins
    error = {
        key: float(sum(b["count"] * abs(b["estimates"][key] - b["truth"]) for b in bins) / len(truth))
        for key in estimates
    }
    return {"binning": binning, "bins": bins, "mean_abs_error": error}


def evaluate(
    prompts: AnnotatedPrompts,
    rows: NDArray[np.int64],
    kind: str,
    annotators: tuple[int, ...],
    entropy: NDArray[np.float64],
) -> dict[str, Any]:
    """One evaluation (``kind`` "pairs" or "lists" on ``rows``): the priors, the Spearman
    correlations overall and within each family, and the calibration, of every M and of the
    entropy estimate (``entropy``, (N,) over all prompts)."""
    truth, family, template = prompts.truth[rows], prompts.family[rows], prompts.template[rows]
    estimates, priors = {}, {}
    for m in annotators:
        estimates[str(m)], priors[str(m)] = annotator_estimate(prompts, rows, m, kind)
    estimates[ENTROPY] = entropy[rows]
    subsets = {"all": np.ones(len(rows), dtype=bool)}
    subsets.update({f: family == f for f in FAMILIES if (family == f).any()})
    return {
        "kind": kind,
        "prompts": len(rows),
        "sizes": sorted({int(k) for k in prompts.size[rows]}),
        "priors": {m: list(p) for m, p in priors.items()},
        "spearman": {
            name: {"prompts": int(mask.sum()), **{k: spearman(e[mask], truth[mask]) for k, e in estimates.items()}}
            for name, mask in subsets.items()
        },
        "calibration": _calibration(truth, template, estimates),
    }
