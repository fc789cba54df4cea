"""The outputs of a controllable-generation experiment: results.json, the figures
(Figs. 8c, 3 and 7 of the paper), report.md with its tables and the verdict."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mallowspo.experiments.controllable.config import (  # noqa: E402
    COLORS,
    LABELS,
    METRICS,
    PROMPT_FAMILIES,
    ControllableConfig,
)
from mallowspo.experiments.controllable.stats import compare_to_dpo, scopes_of, summarize  # noqa: E402


def _save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out, write and close ``fig``; returns the path."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def _draw_curves(ax, entry: dict[str, Any], scope: str) -> None:
    for m, r in entry["methods"].items():
        kl = [p[scope]["kl"]["mean"] for p in r["curve"]]
        rw = [p[scope]["reward"]["mean"] for p in r["curve"]]
        lo = [p[scope]["reward"]["lo"] for p in r["curve"]]
        hi = [p[scope]["reward"]["hi"] for p in r["curve"]]
        ax.plot(kl, rw, "o-", ms=4, lw=1.5, color=COLORS[m], label=r["label"])
        if not any(math.isnan(x) for x in lo):
            ax.errorbar(
                kl,
                rw,
                yerr=[np.subtract(rw, lo), np.subtract(hi, rw)],
                fmt="none",
                ecolor=COLORS[m],
                alpha=0.5,
                capsize=2,
            )
        ax.annotate(
            f"{r['curve'][-1]['step']}",
            (kl[-1], rw[-1]),
            fontsize=7,
            color=COLORS[m],
            xytext=(3, -9),
            textcoords="offset points",
        )
    ax.set_xlabel("KL(pi || pi_ref), nats per response")
    ax.set_ylabel("mean true reward r* (VADER)")
    ax.grid(alpha=0.3)


def _seed_text(results: dict[str, Any]) -> str:
    n = len(results["config"]["seeds"])
    return "1 seed" if n == 1 else f"mean of {n} seeds, 95% t-interval"


def plot_reward_kl(results: dict[str, Any], path: str | Path, dpi: int = 120, scope: str = "all") -> Path:
    """Fig. 8c: reward against KL over training checkpoints, one curve per method, a panel per beta."""
    betas = list(results["summary"])
    fig, axes = plt.subplots(1, len(betas), figsize=(5.2 * len(betas), 4), squeeze=False)
    for ax, beta in zip(axes[0], betas):
        _draw_curves(ax, results["summary"][beta], scope)
        ax.set_title(
            f"beta {beta}: held-out {results['config']['family']} prompts ({_seed_text(results)})", fontsize=9
        )
        ax.legend(fontsize=8, loc="lower right")
    return _save_figure(fig, path, dpi)


def plot_reward_kl_by_family(results: dict[str, Any], path: str | Path) -> Path:
    """The same curves with reward and KL restricted to each prompt family (rows: betas)."""
    betas = list(results["summary"])
    scopes = [s for s in PROMPT_FAMILIES if s in scopes_of(results["runs"])]
    fig, axes = plt.subplots(len(betas), len(scopes), figsize=(5.2 * len(scopes), 3.9 * len(betas)), squeeze=False)
    for row, beta in zip(axes, betas):
        for ax, scope in zip(row, scopes):
            _draw_curves(ax, results["summary"][beta], scope)
            ax.set_title(f"beta {beta}: {scope} prompts only", fontsize=9)
            ax.legend(fontsize=7, loc="lower right")
    return _save_figure(fig, path)


def plot_dispersion_vs_truth(results: dict[str, Any], path: str | Path) -> Path:
    """Fig. 3 for the LM: the trainer's per-pair estimate of -log phi(x) against the truth."""
    d = results["dispersion"]
    values = d["values"]
    est, truth = np.asarray(values["estimate"]), np.asarray(values["true_neg_log_phi"])
    family = np.asarray(values["family"])
    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    top = max(truth.max(), est.max()) * 1.05
    ax.plot([0, top], [0, top], ls="--", color="0.6", lw=1, label="diagonal")
    for f, color in zip(PROMPT_FAMILIES, ("tab:green", "tab:purple")):
        mask = family == f
        jitter = rng.uniform(-0.04, 0.04, mask.sum())
        ax.plot(truth[mask] + jitter, est[mask], ".", ms=3, alpha=0.35, color=color, label=f"{f} prompts")
    for t, s in d["by_template"].items():
        ax.plot(s["true_neg_log_phi"], s["estimate_mean"], "D", ms=7, mfc="none", color="black")
        ax.annotate(
            t, (s["true_neg_log_phi"], s["estimate_mean"]), fontsize=8, xytext=(6, 4), textcoords="offset points"
        )
    ax.set_xlabel("true -log phi(x) of the prompt's annotators")
    ax.set_ylabel("estimate -phi* log Hbar(x) (trainer, per pair)")
    ax.set_title(
        f"Dispersion estimate vs truth, {len(est)} train pairs\nSpearman {d['spearman']:.3f} "
        f"(closed {d['spearman_closed']:.2f}, open {d['spearman_open']:.2f}); phi* = {d['phi_star']:.3f}",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return _save_figure(fig, path)


def plot_dispersion_hist(results: dict[str, Any], path: str | Path) -> Path:
    """Fig. 7: histogram of the normalised dispersion estimates, by prompt family."""
    values = results["dispersion"]["values"]
    est, family = np.asarray(values["estimate"]), np.asarray(values["family"])
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    bins = np.linspace(est.min(), est.max(), 40) if np.ptp(est) > 0 else 10
    for f, color in zip(PROMPT_FAMILIES, ("tab:green", "tab:purple")):
        if (family == f).any():
            ax.hist(
                est[family == f], bins=bins, alpha=0.6, color=color, label=f"{f} (mean {est[family == f].mean():.2f})"
            )
    ax.axvline(1.0, ls="--", color="0.5", lw=1)
    ax.set_xlabel("estimate of -log phi(x) (train mean = 1)")
    ax.set_ylabel("pairs")
    ax.set_title("Dispersion estimates by prompt family (cf. paper Fig. 7)", fontsize=9)
    ax.legend(fontsize=8)
    return _save_figure(fig, path)


FIGURES = {
    "reward_kl": "reward_kl.png",
    "reward_kl_by_family": "reward_kl_by_family.png",
    "dispersion_vs_truth": "dispersion_vs_truth.png",
    "dispersion_hist": "dispersion_hist.png",
}


def write_outputs(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """results.json, the four figures and report.md in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json"}
    paths["results"].write_text(json.dumps(results, indent=1, default=float) + "\n")
    paths.update(write_report(results, out))
    return paths


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    paths = {
        "reward_kl": plot_reward_kl(results, out / FIGURES["reward_kl"]),
        "reward_kl_by_family": plot_reward_kl_by_family(results, out / FIGURES["reward_kl_by_family"]),
        "dispersion_vs_truth": plot_dispersion_vs_truth(results, out / FIGURES["dispersion_vs_truth"]),
        "dispersion_hist": plot_dispersion_hist(results, out / FIGURES["dispersion_hist"]),
    }
    paths["report"] = out / "report.md"
    paths["report"].write_text(report_markdown(results))
    return paths


def read_results(out_dir: str | Path, config_class=ControllableConfig, summarize_runs=summarize) -> dict[str, Any]:
    """results.json of ``out_dir``, its summary recomputed from the runs by ``summarize_runs(config,
    runs)`` with the saved ``config_class`` (so a report redrawn with a newer version of this package
    has that version's statistics)."""
    results = json.loads((Path(out_dir) / "results.json").read_text())
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in results["config"].items()}
    results["summary"] = summarize_runs(config_class(**fields), results["runs"])
    return results


def load_results(out_dir: str | Path) -> dict[str, Any]:
    """A controllable experiment's results.json, summary recomputed (``read_results``)."""
    return read_results(out_dir)


def format_ci(ci: dict[str, Any] | None, digits: int = 3, signed: bool = False) -> str:
    """A mean and its 95% interval (when there are several seeds) as text; "n/a" when undefined."""
    if ci is None or ci.get("n", 0) == 0 or math.isnan(ci["mean"]):
        return "n/a"
    spec = f"{'+' if signed else ''}.{digits}f"
    text = format(ci["mean"], spec)
    if ci["n"] > 1:
        text += f" [{format(ci['lo'], spec)}, {format(ci['hi'], spec)}]"
    return text


def verdict_lines(results: dict[str, Any]) -> list[str]:
    """Plain-language findings, derived from the numbers only."""
    lines = []
    for beta, entry in results["summary"].items():
        methods = entry["methods"]
        if "dpo" not in methods:
            continue
        final = {m: r["final"]["all"] for m, r in methods.items()}
        where = "; ".join(
            f"{LABELS[m]} reward {final[m]['reward']['mean']:+.3f} at KL {final[m]['kl']['mean']:.2f}" for m in methods
        )
        lines.append(f"**beta {beta}**, end of training ({methods['dpo']['final']['step']} steps): {where}.")
        for m in ("phi", "theta"):
            c = compare_to_dpo(results, beta, m)
            if c is None:
                continue
            d = c["diff"]["mean"]
            kl = c["kl"]["mean"]
            if not c["beyond_noise"]:
                what = f"about the same reward as DPO at equal KL ({kl:.2f} nats): difference {d:+.3f}, within noise ({c['noise']})"
            elif d > 0:
                what = (
                    f"a higher reward than DPO at equal KL ({kl:.2f} nats): {d:+.3f} ({c['noise']}), i.e. it "
                    "reaches DPO's reward at a lower KL"
                )
            else:
                what = (
                    f"a lower reward than DPO at equal KL ({kl:.2f} nats): {d:+.3f} ({c['noise']}), i.e. it "
                    "needs more KL than DPO for the same reward"
                )
            lines.append(f"{LABELS[m]} has {what}.")
            for fam in PROMPT_FAMILIES:
                cf = compare_to_dpo(results, beta, m, fam)
                if cf is not None and len(results["summary"][beta]["matched_kl"]) > 2:
                    lines.append(
                        f"  - {fam} prompts only: {cf['diff']['mean']:+.3f} at KL {cf['kl']['mean']:.2f} "
                        f"({'beyond' if cf['beyond_noise'] else 'within'} noise)"
                    )
        kl_split = {m: (r["final"].get("closed", {}).get("kl", {}).get("mean"), r["final"].get("open", {}).get("kl", {}).get("mean"))
                    for m, r in methods.items()}  # fmt: skip
        if all(v[0] is not None and v[1] is not None for v in kl_split.values()):
            lines.append(
                "Where the KL goes (closed / open prompts): "
                + "; ".join(f"{LABELS[m]} {a:.2f} / {b:.2f}" for m, (a, b) in kl_split.items())
                + "."
            )
    phi_claim = [compare_to_dpo(results, b, "phi") for b in results["summary"]]
    phi_claim = [c for c in phi_claim if c is not None]
    if phi_claim:
        if all(c["beyond_noise"] and c["diff"]["mean"] > 0 for c in phi_claim):
            lines.append("The paper's claim (MallowsPO-phi: same reward at a lower KL than DPO) **holds** here.")
        elif any(c["beyond_noise"] and c["diff"]["mean"] < 0 for c in phi_claim):
            lines.append(
                "The paper's claim (MallowsPO-phi: same reward at a lower KL than DPO) is **contradicted** here."
            )
        else:
            lines.append(
                "The paper's claim (MallowsPO-phi: same reward at a lower KL than DPO) is **not shown** here "
                "(at some beta the reward difference at equal KL is within noise)."
            )
    d = results["dispersion"]
    lines.append(
        f"The entropy estimate of -log phi(x) ranks prompts by their true dispersion with Spearman "
        f"{d['spearman']:.3f} over {len(d['values']['estimate'])} train pairs (closed {d['spearman_closed']:.2f}, "
        f"open {d['spearman_open']:.2f} within each family)."
    )
    return lines


def table_scopes(results: dict[str, Any]) -> list[str]:
    """ "all" and each family; just "all" when the run has one family (the columns would repeat)."""
    scopes = scopes_of(results["runs"])
    return scopes if len(scopes) > 2 else ["all"]


def _final_table(results: dict[str, Any], beta: str) -> list[str]:
    entry = results["summary"][beta]
    scopes = table_scopes(results)
    header = ["method"] + [f"{k} ({s})" for s in scopes for k in ("reward", "KL", "accuracy")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    first = next(iter(entry["methods"].values()))
    base = ["base model (step 0)"] + [
        format_ci(first["base"][s][k], 3 if k != "kl" else 2) if k != "accuracy" else "-"
        for s in scopes for k in METRICS
    ]  # fmt: skip
    lines.append("| " + " | ".join(base) + " |")
    for r in entry["methods"].values():
        cells = [r["label"]] + [format_ci(r["final"][s][k], 2 if k == "kl" else 3) for s in scopes for k in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _fmt_diff(ci: dict[str, Any] | None, digits: int = 3) -> str:
    """A paired difference, with the number of seeds on each side of 0 when there are several."""
    text = format_ci(ci, digits, signed=True)
    if ci is not None and ci.get("n", 0) > 1:
        text += f" ({sum(v > 0 for v in ci['values'])}/{ci['n']} > 0)"
    return text


def _matched_table(results: dict[str, Any], beta: str) -> list[str]:
    entry = results["summary"][beta]
    methods = list(entry["methods"])
    lines = ["| prompts | matched KL K* (nats) | " + " | ".join(f"{LABELS[m]} reward at K*" for m in methods) + " |"]
    lines.append("|" + "---|" * (2 + len(methods)))
    for scope in table_scopes(results):
        matched = entry["matched_kl"][scope]
        cells = [scope, format_ci(matched["kl"], 2)] + [format_ci(matched["methods"][m]["reward"]) for m in methods]
        lines.append("| " + " | ".join(cells) + " |")
    others = [m for m in methods if m != "dpo"]
    if not others or "dpo" not in methods:
        return lines
    lines += [
        "",
        "Differences to DPO, paired by seed (mean, 95% t-interval, seeds above 0):",
        "",
        "| prompts | method | reward at K* | final reward | final KL (nats) |",
        "|---|---|---|---|---|",
    ]
    for scope in table_scopes(results):
        for m in others:
            d = entry["matched_kl"][scope]["methods"][m]
            lines.append(
                f"| {scope} | {LABELS[m]} - DPO | {_fmt_diff(d.get('reward_minus_dpo'))} | "
                f"{_fmt_diff(d.get('final_reward_minus_dpo'))} | {_fmt_diff(d.get('final_kl_minus_dpo'), 2)} |"
            )
    return lines


def report_markdown(results: dict[str, Any]) -> str:
    c = results["config"]
    t = results["timing_seconds"]
    w = results["world"]
    d = results["dispersion"]
    seeds = c["seeds"]
    lines = [
        "# Controllable generation in the built-in world (paper §5.3, Fig. 8c)",
        "",
        f"DPO, MallowsPO-theta and MallowsPO-phi (library defaults: cubic smoothing eps 0.1, entropy "
        f"dispersion, mean normalisation) fine-tuned from the same base model on the same "
        f"{results['train_pairs']} preference pairs ({c['family']} prompts), with the same budget: "
        f"{c['max_steps']} steps of {c['batch_size']} pairs, AdamW lr {c['learning_rate']:g} "
        f"({c['lr_scheduler_type']}, {c['warmup_steps']} warmup steps), beta {', '.join(f'{b:g}' for b in c['betas'])}, "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}.",
        "",
        f"Evaluated at steps {', '.join(str(s['step']) for s in next(iter(next(iter(results['summary'].values()))['methods'].values()))['curve'])} "
        f"on {results['eval_prompts']} held-out prompts x {c['samples_per_prompt']} samples (temperature 1, up to "
        f"{c['max_new_tokens']} tokens) and {results['eval_pairs']} held-out pairs:",
        "",
        "- **reward**: mean true reward r*(x, y) (VADER compound score of the response, in [-1, 1]) of the samples;",
        "- **KL**: mean over the same samples of log pi(y|x) - log pi_ref(y|x) (nats per response), on the sampled tokens;",
        "- **accuracy**: share of held-out pairs with implicit reward margin > 0 (0 at step 0, where every margin is 0).",
        "",
        f"World: `{w['root']}` ({w.get('model_parameters') or '?'} parameters, held-out perplexity "
        f"{w.get('heldout_perplexity') or float('nan'):.2f}). Wall time {t['total']:.0f} s (world {t.get('world', 0):.0f} s, "
        f"dispersion {t.get('dispersion', 0):.0f} s, training and evaluation {t.get('training', 0):.0f} s) on "
        f"{results['machine']['cpus']} CPUs, {results['jobs']} job(s) of {results['machine']['threads']} thread(s), "
        f"load average at the end {', '.join(f'{x:.1f}' for x in results['machine']['load_average'] or [])}.",
        "",
        "## Verdict",
        "",
        *[f"- {line}" if not line.startswith("  ") else line for line in verdict_lines(results)],
        "",
    ]
    if len(seeds) == 1:
        lines += ["One seed: the numbers carry no seed-to-seed interval. `mallowspo experiment controllable --seeds N` "
                  "repeats this comparison over seeds and betas (see docs/controllable.md).", ""]  # fmt: skip
    for beta in results["summary"]:
        lines += [f"## Final checkpoint, beta {beta} ({_seed_text(results)})", "", *_final_table(results, beta), ""]
        lines += [
            f"### At equal KL, beta {beta}",
            "",
            "Per seed, K* is the smallest final KL among the methods; each method's reward is interpolated on its "
            "own training curve where its KL reaches K*; differences to DPO are paired by seed.",
            "",
            *_matched_table(results, beta),
            "",
        ]
    lines += [
        "## Dispersion estimate",
        "",
        f"The trainer's per-pair estimate -phi* log Hbar(x) (eqs. 10-11, phi* = {d['phi_star']:.4f} so the train mean "
        f"is 1) against the true -log phi(x) of each template's annotators, over the whole train set "
        f"({len(d['values']['estimate'])} pairs). Spearman rank correlation {d['spearman']:.3f} "
        f"(within closed {d['spearman_closed']:.3f}, within open {d['spearman_open']:.3f}).",
        "",
        "| template | family | true -log phi | estimate, mean | sd | pairs |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in d["by_template"].items():
        lines.append(
            f"| {name} | {s['family']} | {s['true_neg_log_phi']:.3f} | {s['estimate_mean']:.3f} | {s['estimate_std']:.3f} | {s['pairs']} |"
        )
    lines += [
        "",
        "## Figures",
        "",
        "- `reward_kl.png`: reward against KL over the training checkpoints, one curve per method (paper Fig. 8c); "
        "the number at the end of each curve is the last step.",
        "- `reward_kl_by_family.png`: the same, reward and KL on closed and on open prompts separately.",
        "- `dispersion_vs_truth.png`: the dispersion estimate against the truth (paper Fig. 3, for the LM).",
        "- `dispersion_hist.png`: histogram of the estimates by prompt family (paper Fig. 7).",
        "",
        "![reward vs KL](reward_kl.png)",
        "",
        "![reward vs KL by family](reward_kl_by_family.png)",
        "",
        "![estimate vs truth](dispersion_vs_truth.png) ![histogram](dispersion_hist.png)",
        "",
    ]
    first_run = {}
    for r in results["runs"]:
        first_run.setdefault(r["method"], r)
    lines += [f"## Example generations at the last checkpoint (seed {seeds[0]}, beta {c['betas'][0]:g})", ""]
    for m, r in first_run.items():
        lines += [f"**{LABELS[m]}**", ""]
        lines += [
            f"- `{e['prompt']}` -> `{e['response'].strip()}` (r* {e['reward']:+.2f})"
            for e in r["checkpoints"][-1]["examples"]
        ]
        lines.append("")
    lines += [
        "Reproduce: `mallowspo demo --out DIR` (the single-seed demo) or `mallowspo experiment controllable` "
        "(see docs/controllable.md); every number above is in `results.json`.",
        "",
    ]
    return "\n".join(lines)
