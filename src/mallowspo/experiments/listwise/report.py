"""The outputs of the listwise experiment: results.json, listwise.png (reward against KL, and the
held-out Kendall tau against the step) and report.md (the tables and the computed verdict)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mallowspo.experiments.controllable.report import format_ci, read_results  # noqa: E402
from mallowspo.experiments.controllable.stats import beyond  # noqa: E402
from mallowspo.experiments.listwise.run import ARM_COLORS, ARM_LABELS, ListwiseConfig, summarize_listwise  # noqa: E402

FINAL_COLUMNS = (
    ("reward", "reward"),
    ("kl", "KL"),
    ("accuracy", "pair accuracy"),
    ("kendall_tau", "tau (observed)"),
    ("kendall_tau_true", "tau (true)"),
)
AT_KL = (("reward", "reward"), ("kendall_tau", "tau (observed)"), ("kendall_tau_true", "tau (true)"))


def final_table(entry: dict[str, Any], scope: str) -> list[str]:
    lines = ["| arm | " + " | ".join(name for _, name in FINAL_COLUMNS) + " |"]
    lines.append("| --- |" + " --- |" * len(FINAL_COLUMNS))
    for r in entry["methods"].values():
        final = r["final"][scope]
        lines.append(f"| {r['label']} | " + " | ".join(format_ci(final[k]) for k, _ in FINAL_COLUMNS) + " |")
    return lines


def matched_table(entry: dict[str, Any], scope: str) -> list[str]:
    matched = entry["matched_kl"][scope]
    lines = [
        f"K* = {format_ci(matched['kl'], 2)} nats (per seed, the smallest final KL of the arms).",
        "",
        "| arm | " + " | ".join(f"{name} at K*" for _, name in AT_KL) + " | "
        + " | ".join(f"{name} minus DPO" for _, name in AT_KL) + " |",
        "| --- |" + " --- |" * (2 * len(AT_KL)),
    ]  # fmt: skip
    for arm, m in matched["methods"].items():
        diffs = ["" if arm == "dpo" else format_ci(m.get(f"{k}_minus_dpo"), signed=True) for k, _ in AT_KL]
        lines.append(
            f"| {ARM_LABELS[arm]} | "
            + " | ".join(format_ci(m[k]) for k, _ in AT_KL)
            + " | "
            + " | ".join(diffs)
            + " |"
        )
    return lines


def verdict_lines(entry: dict[str, Any]) -> list[str]:
    """Per arm against DPO best-vs-worst, over all held-out prompts: the reward at matched KL and the
    held-out Kendall tau (observed order) at matched KL, each beyond or within the 95% interval."""
    matched = entry["matched_kl"]["all"]
    if "dpo" not in matched["methods"]:
        return []
    lines = []
    for arm, m in matched["methods"].items():
        if arm == "dpo":
            continue
        parts = []
        for metric, name in (("reward", "reward"), ("kendall_tau", "held-out tau")):
            d = m[f"{metric}_minus_dpo"]
            word = ("above" if d["mean"] > 0 else "below") if beyond(d) else "within noise of"
            parts.append(f"{name} {format_ci(d, signed=True)} ({word} DPO)")
        lines.append(f"{ARM_LABELS[arm]} at matched KL {format_ci(matched['kl'], 2)}: " + "; ".join(parts))
    return lines


def _plot(results: dict[str, Any], path: Path) -> None:
    betas = list(results["summary"])
    fig, axes = plt.subplots(2, len(betas), figsize=(5.4 * len(betas), 8), squeeze=False)
    for col, beta in enumerate(betas):
        ax, bx = axes[0, col], axes[1, col]
        for arm, r in results["summary"][beta]["methods"].items():
            kl = [p["all"]["kl"]["mean"] for p in r["curve"]]
            reward = [p["all"]["reward"]["mean"] for p in r["curve"]]
            tau = [p["all"]["kendall_tau"]["mean"] for p in r["curve"]]
            steps = [p["step"] for p in r["curve"]]
            ax.plot(kl, reward, "o-", ms=4, color=ARM_COLORS[arm], label=r["label"])
            bx.plot(steps, tau, "o-", ms=4, color=ARM_COLORS[arm], label=r["label"])
        ax.set_xlabel("KL(pi || pi_ref), nats per response")
        ax.set_ylabel("mean true reward r* (VADER)")
        ax.set_title(f"beta {beta}: held-out prompts (mean over {len(results['config']['seeds'])} seeds)", fontsize=9)
        bx.set_xlabel("optimizer step")
        bx.set_ylabel("Kendall tau, implicit rewards vs observed ranking")
        bx.set_title("held-out lists", fontsize=9)
        for a in (ax, bx):
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_markdown(results: dict[str, Any]) -> str:
    c = results["config"]
    d = results["dispersion"]
    sizes = ", ".join(f"{n} of K = {k}" for k, n in results["list_sizes"].items())
    lines = [
        f"# Listwise MallowsPO: {c['family']}, {len(c['seeds'])} seed(s), {c['max_steps']} steps",
        "",
        f"Every arm reads the same {results['train_lists']} train lists of the built-in world "
        f"({results['train_sequences']} responses; all train lists: {sizes}) through one loader, in batches of "
        f"{c['batch_size']} prompts, for {c['max_steps']} AdamW steps at learning rate {c['learning_rate']:g}. "
        "DPO best-vs-worst trains on each list's best and worst response (`binarize: best_worst`, the world's "
        "pairs); the others on the whole ranking (annotator 1's).",
        "",
        f"Evaluation at steps {sorted({p['step'] for r in results['runs'] for p in r['checkpoints']})}: reward "
        f"and KL of {c['samples_per_prompt']} samples on each of {results['eval_prompts']} held-out prompts, the "
        f"accuracy on {results['eval_pairs']} held-out pairs (best vs worst), and on {results['eval_lists']} "
        "held-out lists Kendall's tau between the implicit rewards beta (log pi - log pi_ref) and the observed "
        "ranking (tau observed) or the order of the true rewards (tau true), averaged over lists. Means over "
        "seeds with 95% t-intervals; differences paired by seed.",
        "",
        f"Dispersion (MallowsPO arms): the entropy estimate over the K responses of each list, phi* = "
        f"{d['phi_star']:.4f}; its Spearman correlation with the true -log phi is {d['spearman']:.3f} "
        f"(closed {d['spearman_closed']:.3f}, open {d['spearman_open']:.3f}).",
    ]
    for beta, entry in results["summary"].items():
        scopes = list(entry["matched_kl"])
        for scope in scopes:
            title = "all held-out prompts" if scope == "all" else f"{scope} prompts"
            lines += ["", f"## beta {beta}, {title}: end of training", ""] + final_table(entry, scope)
            lines += ["", f"## beta {beta}, {title}: at matched KL", ""] + matched_table(entry, scope)
        lines += ["", f"## beta {beta}: verdict", ""] + [f"- {x}" for x in verdict_lines(entry)]
    lines += ["", f"`listwise.png`: reward against KL and held-out tau against step. {results['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, Any], out_dir) -> dict[str, Path]:
    """Write results.json, listwise.png and report.md into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "figure": out / "listwise.png", "report": out / "report.md"}
    paths["results"].write_text(json.dumps(results, indent=1, default=float) + "\n")
    _plot(results, paths["figure"])
    paths["report"].write_text(report_markdown(results))
    return paths


def load_results(out_dir) -> dict[str, Any]:
    """results.json of ``out_dir``, its summary recomputed from the runs."""
    return read_results(out_dir, ListwiseConfig, summarize_listwise)
