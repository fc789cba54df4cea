"""The outputs of the bandit experiment: summaries of the runs (``summarize``),
results.json and trajectories.npz (``write_outputs``, ``load_outputs``), the figures
(Figs. 8a, 8b and 9 of the paper) and README.md with the findings (``write_report``,
``findings_markdown``)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mallowspo.experiments.bandit.problem import (  # noqa: E402
    N_ARMS,
    PAIRS,
    arm_expected_rewards,
    expected_reward,
    kl_divergence,
)
from mallowspo.experiments.bandit.train import FRONTIER_BETAS, METHOD_LABELS, BanditConfig, MethodRun  # noqa: E402

ARM_PLOT_BETAS = (0.05, 0.1)  # the two policies of Fig. 9


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
                "best": {
                    "epoch": int(run.epochs_recorded[best]),
                    "reward": float(fr_reward[best]),
                    "kl": float(fr_kl[best]),
                },
                "final": {"reward": float(fr_reward[-1]), "kl": float(fr_kl[-1])},
            },
        }
    return out


# ----------------------------------------------------------------------------------------
# Output: results.json, trajectories.npz, figures, README.md
# ----------------------------------------------------------------------------------------


def write_outputs(
    cfg: BanditConfig, runs: dict[str, MethodRun], out_dir: str | Path, seconds: float
) -> dict[str, Path]:
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
            ax.annotate(
                f"{b:g}", (kl[i], rw[i]), fontsize=6, color=COLORS.get(m), xytext=(2, 2), textcoords="offset points"
            )
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
        len(ARM_PLOT_BETAS),
        len(names),
        figsize=(2.6 * len(names) + 0.5, 2.3 * len(ARM_PLOT_BETAS)),
        squeeze=False,
        sharey=True,
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
        "Arm expected rewards: "
        + ", ".join(f"arm{i + 1} {v:g}" for i, v in enumerate(results["arm_expected_rewards"]))
        + ".",
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
    for r in methods.values():
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
    for r in methods.values():
        desc = []
        for b in small:
            fp = r["per_beta"][f"{b:g}"]["final_probs"]
            top = int(np.argmax(fp))
            good = sum(fp[a] >= SEVERAL_PROB for a in GOOD_ARMS)
            state = (
                f"collapsed on arm{top + 1} ({fp[top]:.3f})"
                if fp[top] >= COLLAPSE_PROB
                else (f"spread ({good} of arms 1-3 >= {SEVERAL_PROB}; top arm{top + 1} {fp[top]:.2f})")
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
