"""The statistics of a controllable-generation experiment: means with t-intervals over
seeds, rewards interpolated at a matched KL, the paired comparison with DPO, and the
dispersion estimate against the truth."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import spearmanr
from scipy.stats import t as student_t

from mallowspo.experiments.controllable.config import LABELS, METRICS, PROMPT_FAMILIES, ControllableConfig


def mean_ci(values: list[float], level: float = 0.95) -> dict[str, Any]:
    """Mean and the two-sided t-interval over ``values`` (seeds); no interval for one value."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0, "values": []}
    mean = float(x.mean())
    if n == 1:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": 1, "values": x.tolist()}
    half = float(student_t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "values": x.tolist()}


def beyond(ci: dict[str, Any] | None) -> bool:
    """Whether a difference's 95% t-interval over seeds excludes 0 (never with one seed)."""
    return ci is not None and ci.get("n", 0) > 1 and not (ci["lo"] <= 0 <= ci["hi"])


def value_at_kl(checkpoints: list[dict[str, Any]], kl: float, metric: str = "reward", scope: str = "all") -> float:
    """``metric`` interpolated along a training curve at the first point where its KL reaches ``kl``."""
    points = [(c[scope]["kl"], c[scope][metric]) for c in checkpoints if scope in c]
    for (k0, v0), (k1, v1) in zip(points, points[1:]):
        if k0 <= kl <= k1 or k1 <= kl <= k0:
            return v0 if k1 == k0 else v0 + (v1 - v0) * (kl - k0) / (k1 - k0)
    return math.nan


def dispersion_vs_truth(dispersion: dict[str, Any]) -> dict[str, Any]:
    """The trainer's per-pair estimate of -log phi(x) against the true -log phi(x) of the
    annotators: Spearman overall and within each family, means by template and by family.

    (Not ``mallowspo.training.outputs.dispersion_summary``, the distribution of one estimate.)"""
    est = np.asarray(dispersion["estimate"])
    truth = np.asarray(dispersion["true_neg_log_phi"])
    family = np.asarray(dispersion["family"])
    template = np.asarray(dispersion["template"])

    def rho(mask: np.ndarray) -> float:
        if mask.sum() < 3 or len(set(truth[mask])) < 2 or np.ptp(est[mask]) == 0:
            return math.nan
        return float(spearmanr(est[mask], truth[mask]).statistic)

    by_template = {
        t: {
            "family": str(family[template == t][0]),
            "true_neg_log_phi": float(truth[template == t][0]),
            "estimate_mean": float(est[template == t].mean()),
            "estimate_std": float(est[template == t].std()),
            "pairs": int((template == t).sum()),
        }
        for t in dict.fromkeys(template.tolist())
    }
    by_family = {
        f: {"estimate_mean": float(est[family == f].mean()), "estimate_std": float(est[family == f].std()),
            "pairs": int((family == f).sum())}
        for f in PROMPT_FAMILIES if (family == f).any()
    }  # fmt: skip
    return {
        "phi_star": dispersion["phi_star"],
        "spearman": rho(np.ones(len(est), bool)),
        **{f"spearman_{f}": rho(family == f) for f in PROMPT_FAMILIES},
        "by_template": by_template,
        "by_family": by_family,
    }


def scopes_of(runs: list[dict[str, Any]]) -> list[str]:
    first = runs[0]["checkpoints"][0]
    return [s for s in ("all", *PROMPT_FAMILIES) if s in first]


def summarize(
    config: ControllableConfig,
    runs: list[dict[str, Any]],
    metrics: tuple[str, ...] = METRICS,
    labels: dict[str, str] = LABELS,
) -> dict[str, Any]:
    """Per beta: each method's curve (mean over seeds per checkpoint) and final numbers with
    95% t-intervals over seeds; and the paired comparison with DPO at matched KL (of every
    metric but the KL)."""
    out: dict[str, Any] = {}
    if not runs:
        return out
    scopes = scopes_of(runs)
    for beta in config.betas:
        by_method = {m: [r for r in runs if r["beta"] == beta and r["method"] == m] for m in config.methods}
        by_method = {m: sorted(rs, key=lambda r: r["seed"]) for m, rs in by_method.items() if rs}
        entry: dict[str, Any] = {"methods": {}}
        for m, rs in by_method.items():
            steps = [c["step"] for c in rs[0]["checkpoints"]]
            curve = []
            for i, step in enumerate(steps):
                point: dict[str, Any] = {"step": step}
                for scope in scopes:
                    point[scope] = {
                        k: mean_ci([r["checkpoints"][i][scope][k] for r in rs])
                        for k in (*metrics, "unfinished", "reward_se")
                    }
                curve.append(point)
            entry["methods"][m] = {
                "label": labels[m],
                "seeds": [r["seed"] for r in rs],
                "curve": curve,
                "final": curve[-1],
                "base": curve[0],
                "train_loss_last": mean_ci([r["train_loss_last"] for r in rs]),
                "seconds": mean_ci([r["seconds"] for r in rs]),
            }
        at_kl = tuple(k for k in metrics if k != "kl")
        entry["matched_kl"] = matched_kl_comparison(by_method, scopes, at_kl)
        out[f"{beta:g}"] = entry
    return out


def matched_kl_comparison(
    by_method: dict[str, list[dict[str, Any]]], scopes: list[str], metrics: tuple[str, ...] = ("reward", "accuracy")
) -> dict[str, Any]:
    """Per seed and scope: K* = the smallest final KL among the methods; each method's
    ``metrics`` at K* on its own curve; the paired difference to DPO (``<metric>_minus_dpo``)."""
    seeds = sorted(set.intersection(*(set(r["seed"] for r in rs) for rs in by_method.values())))
    out: dict[str, Any] = {}
    for scope in scopes:
        per_seed: dict[str, dict[str, list[float]]] = {m: {k: [] for k in metrics} for m in by_method}
        kstars = []
        for seed in seeds:
            curves = {m: next(r for r in rs if r["seed"] == seed)["checkpoints"] for m, rs in by_method.items()}
            kstar = max(0.0, min(c[-1][scope]["kl"] for c in curves.values()))  # a sampled KL can be slightly < 0
            kstars.append(kstar)
            for m, c in curves.items():
                for metric in metrics:
                    per_seed[m][metric].append(value_at_kl(c, kstar, metric, scope))
        entry: dict[str, Any] = {"kl": mean_ci(kstars), "methods": {}}
        final = {m: {k: [next(r for r in rs if r["seed"] == s)["checkpoints"][-1][scope][k] for s in seeds] for k in ("reward", "kl")}
                 for m, rs in by_method.items()}  # fmt: skip
        for m in by_method:
            entry["methods"][m] = {metric: mean_ci(v) for metric, v in per_seed[m].items()}
            if m != "dpo" and "dpo" in by_method:
                paired = lambda a, b: mean_ci([x - y for x, y in zip(a, b)])  # noqa: E731
                for metric in metrics:
                    entry["methods"][m][f"{metric}_minus_dpo"] = paired(per_seed[m][metric], per_seed["dpo"][metric])
                entry["methods"][m]["final_reward_minus_dpo"] = paired(final[m]["reward"], final["dpo"]["reward"])
                entry["methods"][m]["final_kl_minus_dpo"] = paired(final[m]["kl"], final["dpo"]["kl"])
        out[scope] = entry
    return out


def compare_to_dpo(results: dict[str, Any], beta: str, method: str, scope: str = "all") -> dict[str, Any] | None:
    """The reward difference (method - DPO) at matched KL, and whether it is beyond noise.

    Several seeds: beyond noise when the 95% t-interval over seeds excludes 0. One seed: when
    |difference| > 2 standard errors of the difference of two mean rewards (sampling noise
    of the evaluation only; seed-to-seed variation is not covered)."""
    entry = results["summary"][beta]
    matched = entry["matched_kl"].get(scope)
    if matched is None or method not in matched["methods"] or "dpo" not in entry["methods"]:
        return None
    diff = matched["methods"][method]["reward_minus_dpo"]
    if diff["n"] == 0:
        return None
    if diff["n"] > 1:
        beyond = not (diff["lo"] <= 0 <= diff["hi"])
        noise = "95% t-interval over seeds"
    else:
        se = [entry["methods"][m]["final"][scope]["reward_se"]["mean"] for m in (method, "dpo")]
        threshold = 2 * math.sqrt(se[0] ** 2 + se[1] ** 2)
        beyond = abs(diff["mean"]) > threshold
        noise = f"one seed; noise threshold 2 SE = {threshold:.3f}"
    return {"diff": diff, "beyond_noise": beyond, "noise": noise, "kl": matched["kl"]}
