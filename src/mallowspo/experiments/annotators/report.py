"""The outputs of an annotator-accuracy experiment: results.json, annotators.png (Spearman
against M, and the calibration) and report.md (the tables and the computed verdict)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mallowspo.experiments.annotators.evaluate import ENTROPY  # noqa: E402

SUBSET_COLORS = {"all": "black", "closed": "tab:blue", "open": "tab:orange"}


def _title(dataset: str, evaluation: dict[str, Any]) -> str:
    """The evaluation's name: world, pairs; world, lists (K = 2-4); simulation, lists (K = 4); ..."""
    sizes = evaluation["sizes"]
    k = f"K = {sizes[0]}" if len(sizes) == 1 else f"K = {sizes[0]}-{sizes[-1]}"
    return f"{dataset}, {'pairs' if evaluation['kind'] == 'pairs' else f'lists ({k})'}"


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _annotator_keys(results: dict[str, Any]) -> list[str]:
    return [str(m) for m in results["options"]["annotators"]]


def evaluations(results: dict[str, Any]):
    """(dataset, evaluation) in report order."""
    for dataset in ("world", "simulation"):
        for evaluation in results[dataset]["evaluations"].values():
            yield dataset, evaluation


def spearman_table(results: dict[str, Any]) -> str:
    keys = _annotator_keys(results)
    head = "| data | prompts | " + " | ".join(f"M = {m}" for m in keys) + " | entropy |"
    lines = [head, "|" + "---|" * (len(keys) + 3)]
    for dataset, evaluation in evaluations(results):
        for subset, row in evaluation["spearman"].items():
            label = _title(dataset, evaluation) + ("" if subset == "all" else f", {subset}")
            cells = " | ".join(_cell(row[k]) for k in keys)
            lines.append(f"| {label} | {row['prompts']} | {cells} | {_cell(row[ENTROPY])} |")
    return "\n".join(lines)


def calibration_table(results: dict[str, Any], evaluation: dict[str, Any]) -> str:
    keys = _annotator_keys(results) + [ENTROPY]
    names = [f"M = {k}" if k != ENTROPY else ENTROPY for k in keys]
    lines = ["| bin of the truth | prompts | true -log phi | " + " | ".join(names) + " |"]
    lines.append("|" + "---|" * (len(keys) + 3))
    calibration = evaluation["calibration"]
    for b in calibration["bins"]:
        cells = " | ".join(f"{b['estimates'][k]:.2f}" for k in keys)
        lines.append(f"| {b['label']} | {b['count']} | {b['truth']:.2f} | {cells} |")
    errors = " | ".join(f"{calibration['mean_abs_error'][k]:.2f}" for k in keys)
    lines.append(f"| mean \\|estimate - truth\\| | | | {errors} |")
    return "\n".join(lines)


def verdict_lines(results: dict[str, Any]) -> list[str]:
    """Per evaluation and subset: the fewest annotators whose Spearman reaches the entropy's."""
    keys = _annotator_keys(results)
    lines = []
    for dataset, evaluation in evaluations(results):
        for subset, row in evaluation["spearman"].items():
            label = _title(dataset, evaluation) + ("" if subset == "all" else f", {subset}")
            entropy = row[ENTROPY]
            scored = [(int(k), row[k]) for k in keys if row[k] is not None]
            if entropy is None or not scored:
                continue
            best_m, best = max(scored, key=lambda kv: kv[1])
            reach = [m for m, v in scored if v >= entropy]
            outcome = (
                f"M = {min(reach)} annotators match or beat it"
                if reach
                else f"no M up to {max(int(k) for k in keys)} does (best M = {best_m}: {best:.3f})"
            )
            lines.append(f"{label}: entropy {entropy:.3f}; {outcome}")
    return lines


def _plot(results: dict[str, Any], path: Path) -> None:
    keys = _annotator_keys(results)
    ms = [int(k) for k in keys]
    panels = list(evaluations(results))
    fig, axes = plt.subplots(2, len(panels), figsize=(3.6 * len(panels), 7.2), squeeze=False)
    colors = plt.cm.viridis([i / max(1, len(keys) - 1) for i in range(len(keys))])
    for col, (dataset, evaluation) in enumerate(panels):
        ax, bx = axes[0, col], axes[1, col]
        for subset, row in evaluation["spearman"].items():
            color = SUBSET_COLORS.get(subset, "black")
            values = [row[k] if row[k] is not None else float("nan") for k in keys]
            ax.plot(ms, values, "o-", color=color, label=f"annotators, {subset} ({row['prompts']})")
            if row[ENTROPY] is not None:
                ax.axhline(row[ENTROPY], color=color, ls=":", lw=1.2)
        ax.plot([], [], ls=":", color="0.3", label="entropy estimate")
        ax.set_xscale("log")
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.set_ylim(-1.0, 1.02)
        ax.axhline(0, color="0.85", lw=0.8)
        ax.set_xlabel("annotators M")
        ax.set_ylabel("Spearman with true -log phi")
        ax.set_title(_title(dataset, evaluation), fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        bins = evaluation["calibration"]["bins"]
        truth = [b["truth"] for b in bins]
        top = max(truth + [b["estimates"][k] for b in bins for k in keys + [ENTROPY]])
        bx.plot([0, top], [0, top], color="0.7", ls="--", lw=1, label="estimate = truth")
        for k, c in zip(keys, colors):
            bx.plot(truth, [b["estimates"][k] for b in bins], "o-", ms=3, color=c, label=f"M = {k}")
        bx.plot(truth, [b["estimates"][ENTROPY] for b in bins], "s--", ms=4, color="tab:red", label="entropy")
        bx.set_xlabel(f"true -log phi (mean per bin: {evaluation['calibration']['binning']})", fontsize=8)
        bx.set_ylabel("mean estimate")
        bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_markdown(results: dict[str, Any]) -> str:
    options, world = results["options"], results["world"]
    m_max = max(options["annotators"])
    drawn = (
        f"annotators 1-{world['given_annotators']} are the world's, {world['given_annotators'] + 1}-{m_max} drawn "
        f"here from the Kendall model at the prompt's true phi (seed {options['seed']})"
        if m_max > world["given_annotators"]
        else f"the world's first M of {world['given_annotators']} annotators"
    )
    sections = [
        "# Annotator estimates of -log phi(x) against the truth",
        "",
        f"World: the `{options['split']}` split, {world['prompts']} prompts ({options['world']}); {drawn}. "
        f"Votes derived from the world's rankings equal its `votes` column: {world['shipped_votes_match']}. "
        f"Entropy estimate -phi* log Hbar, phi* = {world['phi_star']:.4f} (mean 1), clamp [0.05, 20].",
        "",
        f"Simulation: {results['simulation']['prompts']} prompts, true -log phi ~ U[0, {options['sim_max_neg_log_phi']:g}], "
        f"K = {options['list_size']}, Kendall annotators around the identity; Hbar from the winner and loser entropies "
        f"of {options['entropy_samples']} draws per prompt (Fig. 3), phi* = {results['simulation']['phi_star']:.4f}.",
        "",
        "Annotator estimates are posterior means (empirical-Bayes prior fitted on the rows of each evaluation), "
        "pairs: `neg_log_phi_from_votes`, consensus majority, on annotator 1's top vs bottom; lists: "
        "`neg_log_phi_from_rankings`. — : undefined (one annotator gives every prompt the prior mean).",
        "",
        "## Spearman correlation with the true -log phi",
        "",
        spearman_table(results),
        "",
        "## Calibration: mean estimate per bin of the truth",
        "",
    ]
    for dataset, evaluation in evaluations(results):
        sections += [f"### {_title(dataset, evaluation)}", "", calibration_table(results, evaluation), ""]
    sections += ["## Verdict", ""] + [f"- {line}" for line in verdict_lines(results)]
    sections += [
        "",
        f"`annotators.png`: Spearman against M (top) and calibration (bottom). {results['seconds']:.1f} s.",
        "",
    ]
    return "\n".join(sections)


def write_outputs(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, annotators.png and report.md into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "figure": out / "annotators.png", "report": out / "report.md"}
    paths["results"].write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    _plot(results, paths["figure"])
    paths["report"].write_text(report_markdown(results))
    return paths
