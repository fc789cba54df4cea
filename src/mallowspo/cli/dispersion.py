"""`mallowspo dispersion`: run only the reference pass and report the per-prompt dispersion.

    mallowspo dispersion                                   # the built-in world, like `mallowspo train`
    mallowspo dispersion --config recipe.yaml [--key value ...] [--out DIR] [--top N]

The settings are `mallowspo train`'s (the same keys, defaults and recipes: the
``--dispersion_*`` keys, ``--model_name_or_path``, ``--dataset_name``,
``--dataset_train_split``, ``--max_length``, ``--strict_validation``, ...), so the report
shows the dispersion that the training run with the same recipe uses, from the same cached
reference pass (``$MALLOWSPO_CACHE``). The earlier flag names still work: --model, --dataset,
--split, --normalization, --clamp, --batch_size.

Writes to DIR (default runs/dispersion):
    dispersion.jsonl   per pair: row_index, prompt, hbar, neg_log_phi, mean entropies
    summary.json       phi*, settings, mean / std / range / quantiles of -log phi(x) and Hbar
    histogram.png      the distribution of -log phi(x) (paper §5.1, Fig. 4)
    report.md          the summary and the most / least dispersed prompts (paper App. A)

With ``dispersion_source: annotators`` the measured estimate is also checked against the entropy
proxy of the same reference pass (same normalisation and clamp): the agreement histogram (votes
agreeing with the consensus, by count, with the mean of each estimate), the two summaries side by
side and their Spearman correlation, printed and written into report.md and summary.json
("annotators"), and per pair into annotators.jsonl (row_index, agree, total, neg_log_phi,
entropy_neg_log_phi, hbar).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from mallowspo.annotator_columns import agreement  # noqa: E402
from mallowspo.cli.errors import user_errors  # noqa: E402
from mallowspo.cli.run_config import parse_run_config, setup_logging  # noqa: E402
from mallowspo.dispersion import DispersionSource, dispersion_estimate, uninformative_entropy  # noqa: E402
from mallowspo.training.collate import PreferenceCollator  # noqa: E402
from mallowspo.training.data import load_preference_dataset, prepare_training_data  # noqa: E402
from mallowspo.training.data.binarize import is_list_dataset  # noqa: E402
from mallowspo.training.head import add_completion_head  # noqa: E402
from mallowspo.training.list_collate import ListCollator  # noqa: E402
from mallowspo.training.list_reference import attach_reference_pass  # noqa: E402
from mallowspo.training.loading import check_model_source, check_tokenizer_fits, load_causal_lm, load_tokenizer  # noqa: E402
from mallowspo.training.outputs import check_output_dir, summary_statistics, write_dispersion_jsonl  # noqa: E402
from mallowspo.training.reference import annotation_values, with_dispersion  # noqa: E402
from mallowspo.training.reference_cache import weights_fingerprint

ACCEPTS_OVERRIDES = True
# The earlier flag names of this command -> the keys of `mallowspo train`.
FLAG_ALIASES = {
    "model": "model_name_or_path",
    "dataset": "dataset_name",
    "split": "dataset_train_split",
    "normalization": "dispersion_normalization",
    "clamp": "dispersion_clamp",
    "batch_size": "precompute_ref_batch_size",
}

logger = logging.getLogger("mallowspo.dispersion_report")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    shared = "Takes the settings of `mallowspo train` as --key value (see `mallowspo train --show_fields`)."
    parser.description = f"{parser.description or ''}. {shared}"
    parser.add_argument("--config", help="recipe YAML file (as for `mallowspo train`); without it, the built-in world")
    parser.add_argument("--out", default="runs/dispersion", help="output directory (default runs/dispersion)")
    parser.add_argument("--top", type=int, default=10, help="prompts listed at each end of the report (default 10)")


# ---------------------------------------------------------------------------------------
# Computing
# ---------------------------------------------------------------------------------------


def mixed_precision(training_args) -> str:
    """The accelerate mixed-precision mode of a run (part of the reference cache's key)."""
    return "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "no"


def compute_dispersion(model_args, script_args, training_args) -> tuple[Any, dict[str, Any]]:
    """Tokenize the train split, run (or reuse) the reference pass, estimate -log phi(x) as the
    trainer does (``mallowspo.training.reference.with_dispersion``). Lists stay lists under a
    listwise ``objective`` (Hbar over their K responses) and are binarized under ``pairwise``, as
    the training run with the same settings sees them.

    Returns the tokenized dataset with the reference columns and ``neg_log_phi``, and the
    run's facts (phi*, settings, whether the cache was reused).
    """
    check_model_source(model_args.model_name_or_path)
    split = script_args.dataset_train_split
    raw = load_preference_dataset(
        script_args.dataset_name, split, script_args.dataset_config
    )  # fails before the model
    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.trust_remote_code)
    settings = training_args.dispersion_settings()  # the annotation columns are carried even with mallows none
    data_config = dataclasses.replace(training_args.to_data_config(), annotation_columns=settings.annotation_columns)
    dataset, report = prepare_training_data(raw, tokenizer, data_config, training_args.to_list_config(), split)

    model = load_causal_lm(
        model_args.model_name_or_path, model_args.dtype, model_args.trust_remote_code, model_args.attn_implementation
    )
    check_tokenizer_fits(model, tokenizer, model_args.model_name_or_path)
    weights = weights_fingerprint(model)
    add_completion_head(model)
    accelerator = Accelerator(mixed_precision=mixed_precision(training_args), cpu=training_args.use_cpu)
    model.to(accelerator.device)
    collator = (ListCollator if is_list_dataset(dataset) else PreferenceCollator)(tokenizer.pad_token_id)
    dataset, result = attach_reference_pass(
        model,
        dataset,
        collator,
        accelerator,
        batch_size=training_args.precompute_ref_batch_size or training_args.per_device_train_batch_size,
        weights=weights,
        tokenizer=tokenizer,
        data_settings=data_config,
        name=split,
    )
    dataset, estimate = with_dispersion(dataset, settings, name=split)
    facts = {
        "model": model_args.model_name_or_path,
        "dataset": script_args.dataset_name,
        "split": split,
        "rows": len(dataset),
        "rows_are": "lists" if is_list_dataset(dataset) else "pairs",
        "validation": report.summary() if report is not None else None,
        "source": settings.source,
        "phi_star": estimate.phi_star,
        "normalization": settings.normalization,
        "clamp": list(settings.clamp) if settings.clamp is not None else None,
        "cache_dir": str(result.cache_dir),
        "cache_reused": result.reused,
    }
    if settings.source == "annotators":
        facts["prior"] = list(estimate.prior)
        facts["annotators"] = annotator_comparison(dataset, settings)
    return dataset, facts


# ---------------------------------------------------------------------------------------
# Annotators against the entropy proxy
# ---------------------------------------------------------------------------------------


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation, or None when one side is constant (it is then undefined)."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def annotator_comparison(dataset, settings: DispersionSource) -> dict[str, Any]:
    """The annotator estimate (``neg_log_phi``) against the entropy one from the same ``hbar``, with
    the same normalisation and clamp: agreement histogram, summaries, Spearman correlation; and,
    per pair, the columns of annotators.jsonl (under "rows")."""
    rows = dataset["row_index"]
    agree, total = agreement(settings.annotators, annotation_values(dataset, settings), rows)
    hbar = np.asarray(dataset["hbar"], dtype=np.float64)
    entropy = dispersion_estimate(dataclasses.replace(settings, source="entropy"), size=len(dataset), hbar=hbar)
    measured, proxy = np.asarray(dataset["neg_log_phi"], dtype=np.float64), entropy.neg_log_phi.numpy()
    histogram = []
    for a, t in sorted(set(zip(agree.tolist(), total.tolist())), key=lambda p: (-p[1], -p[0])):
        mask = (agree == a) & (total == t)
        histogram.append(
            {
                "agree": a,
                "total": t,
                "pairs": int(mask.sum()),
                "annotators": measured[mask].mean(),
                "entropy": proxy[mask].mean(),
            }
        )
    return {
        "annotations": settings.annotators.where(),
        "consensus": settings.consensus,
        "kind": settings.annotators.kind,
        "histogram": histogram,
        "summary": {"annotators": summary_statistics(measured), "entropy": summary_statistics(proxy)},
        "entropy_phi_star": entropy.phi_star,
        "spearman": spearman(measured, proxy),
        "entropy_note": uninformative_entropy(hbar, proxy),
        "rows": {
            "row_index": rows,
            "agree": agree.tolist(),
            "total": total.tolist(),
            "entropy_neg_log_phi": proxy.tolist(),
        },
    }


def comparison_tables(comparison: dict[str, Any]) -> list[list[list[str]]]:
    """The agreement histogram and the two summaries, as tables (header row first)."""
    what = "pair orders with the center" if comparison["kind"] == "rankings" else "votes with the consensus"
    histogram = [[what, "pairs", "-log phi, annotators", "-log phi, entropy"]] + [
        [f"{h['agree']} of {h['total']}", str(h["pairs"]), f"{h['annotators']:.3f}", f"{h['entropy']:.3f}"]
        for h in comparison["histogram"]
    ]
    stats = comparison["summary"]
    keys = ("mean", "std", "min", "q25", "q50", "q75", "max")
    summary = [["-log phi(x)", *keys]] + [
        [name, *(f"{stats[name][k]:.3f}" for k in keys)] for name in ("annotators", "entropy")
    ]
    return [histogram, summary]


def markdown_table(table: list[list[str]]) -> list[str]:
    return [f"| {' | '.join(table[0])} |", "|" + "---|" * len(table[0])] + [f"| {' | '.join(r)} |" for r in table[1:]]


def text_table(table: list[list[str]]) -> list[str]:
    """Columns aligned: the first to the left, the others to the right."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in table
    ]


def comparison_lines(facts: dict[str, Any], render) -> list[str]:
    """The annotators section, its tables drawn by ``render`` (``markdown_table`` or ``text_table``)."""
    comparison = facts["annotators"]
    a, b = facts["prior"]
    lines = [
        f"Annotations: {comparison['annotations']}, consensus {comparison['consensus']}; Beta prior a = {a:.3g}, "
        f"b = {b:.3g} (fitted on this split); phi* = {facts['phi_star']:.4g}.",
    ]
    for table in comparison_tables(comparison):
        lines += ["", *render(table)]
    rho = f"{comparison['spearman']:.3f}" if comparison["spearman"] is not None else "undefined (one is constant)"
    lines += ["", f"Spearman correlation of the annotator and entropy estimates over {facts['rows']} pairs: {rho}"]
    if comparison["entropy_note"]:
        lines.append(f"Note: {comparison['entropy_note']}.")
    return lines


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------


def per_prompt_table(dataset) -> list[dict[str, Any]]:
    """Rows (pairs or lists) grouped by prompt text: mean -log phi(x), mean Hbar, row count; most dispersed first."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for prompt, value, hbar in zip(dataset["prompt"], dataset["neg_log_phi"], dataset["hbar"]):
        groups.setdefault(prompt, []).append((value, hbar))
    table = [
        {
            "prompt": p,
            "neg_log_phi": float(np.mean([v for v, _ in g])),
            "hbar": float(np.mean([h for _, h in g])),
            "rows": len(g),
        }
        for p, g in groups.items()
    ]
    return sorted(table, key=lambda row: row["neg_log_phi"])


def write_histogram(path: Path, values: np.ndarray, title: str) -> Path:
    """Histogram of -log phi(x) with its mean, as a PNG (matplotlib Agg backend)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=min(50, max(10, len(values) // 10)), color="#4c72b0", edgecolor="white")
    ax.axvline(float(np.mean(values)), color="#c44e52", linestyle="--", label=f"mean {np.mean(values):.3f}")
    ax.set_xlabel("estimated -log phi(x)   (low = high dispersion)")
    ax.set_ylabel("pairs")
    ax.set_title(f"Per-prompt dispersion ({title})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _clip(text: str, width: int = 90) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 3] + "..."


def estimator_text(facts: dict[str, Any]) -> str:
    """How -log phi(x) was obtained, in one phrase."""
    if facts["source"] == "entropy":
        return (
            f"-log phi(x) = -phi* log Hbar(x) (paper eqs. 10-11), phi* = {facts['phi_star']:.4g} "
            f"(normalisation `{facts['normalization']}`), clamp {facts['clamp']}"
        )
    if facts["source"] == "constant":
        return "the same -log phi(x) for every pair (dispersion_source constant)"
    if facts["source"] == "annotators":
        return (
            f"-log phi(x) = phi* E[-log phi(x) | annotations] (notes §8), phi* = {facts['phi_star']:.4g} "
            f"(normalisation `{facts['normalization']}`), clamp {facts['clamp']}"
        )
    return "-log phi(x) as given in the data (dispersion_source column)"


def short_estimator_text(facts: dict[str, Any]) -> str:
    return f"phi* {facts['phi_star']:.4g}" if facts["phi_star"] is not None else f"source {facts['source']}"


def render_report(facts: dict[str, Any], summary: dict[str, Any], table: list[dict[str, Any]], top: int) -> str:
    """The markdown report: settings, summary statistics, most and least dispersed prompts."""
    rows = lambda items: [  # noqa: E731
        f"| {r['neg_log_phi']:.3f} | {r['hbar']:.3f} | {r['rows']} | {_clip(r['prompt'])} |" for r in items
    ]
    header = [f"| -log phi | Hbar | {facts['rows_are']} | prompt |", "|---|---|---|---|"]
    stats = summary["neg_log_phi"]
    return "\n".join(
        [
            "# Dispersion report",
            "",
            f"Model `{facts['model']}`, data `{facts['dataset']}` (split {facts['split']}), {facts['rows']} {facts['rows_are']}.",
            f"Estimator: {estimator_text(facts)}.",
            f"Reference pass: {'reused the cache' if facts['cache_reused'] else 'computed'} at `{facts['cache_dir']}`.",
            "",
            "![histogram](histogram.png)",
            "",
            "| statistic | -log phi(x) | Hbar |",
            "|---|---|---|",
            *[f"| {k} | {stats[k]:.4g} | {summary['hbar'][k]:.4g} |" for k in stats if k != "count"],
            "",
            "## Most dispersed prompts (lowest -log phi: many acceptable answers, weaker preference signal)",
            "",
            *header,
            *rows(table[:top]),
            "",
            "## Least dispersed prompts (highest -log phi: one clear answer, stronger preference signal)",
            "",
            *header,
            *rows(reversed(table[-top:])),
            "",
            *(annotator_section(facts) if "annotators" in facts else []),
            f"Data validation: {_clip(facts['validation'].splitlines()[0], 200) if facts['validation'] else 'tokenized data, checked'}",
            "",
        ]
    )


def annotator_section(facts: dict[str, Any]) -> list[str]:
    return ["## Annotators against the entropy proxy", "", *comparison_lines(facts, markdown_table), ""]


def write_outputs(out: Path, dataset, facts: dict[str, Any], top: int) -> dict[str, Path]:
    """Write dispersion.jsonl, summary.json, histogram.png and report.md into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    values = np.asarray(dataset["neg_log_phi"], dtype=np.float64)
    summary = {"neg_log_phi": summary_statistics(values), "hbar": summary_statistics(np.asarray(dataset["hbar"]))}
    paths = {
        "jsonl": write_dispersion_jsonl(out / "dispersion.jsonl", dataset),
        "summary": out / "summary.json",
        "histogram": write_histogram(out / "histogram.png", values, short_estimator_text(facts)),
        "report": out / "report.md",
    }
    if "annotators" in facts:
        paths["annotators"] = write_annotator_jsonl(out / "annotators.jsonl", dataset, facts["annotators"]["rows"])
    written = (
        {**facts, "annotators": {k: v for k, v in facts["annotators"].items() if k != "rows"}}
        if "annotators" in facts
        else facts
    )
    paths["summary"].write_text(json.dumps({**written, "summary": summary}, indent=2, default=str))
    paths["report"].write_text(render_report(facts, summary, per_prompt_table(dataset), top))
    return paths


def write_annotator_jsonl(path: Path, dataset, rows: dict[str, list]) -> Path:
    """Per pair: row_index, agree, total, neg_log_phi (annotators), entropy_neg_log_phi, hbar."""
    columns = {**rows, "neg_log_phi": dataset["neg_log_phi"], "hbar": dataset["hbar"]}
    order = ("row_index", "agree", "total", "neg_log_phi", "entropy_neg_log_phi", "hbar")
    with path.open("w") as f:
        for i in range(len(dataset)):
            f.write(json.dumps({name: columns[name][i] for name in order}) + "\n")
    return path


def run(args: argparse.Namespace) -> int:
    with user_errors():  # settings, paths, data: the user's
        model_args, script_args, training_args = parse_run_config(args.config, args.overrides, FLAG_ALIASES)
        setup_logging()
        check_output_dir(args.out)
        dataset, facts = compute_dispersion(model_args, script_args, training_args)
    paths = write_outputs(Path(args.out), dataset, facts, args.top)
    stats = json.loads(paths["summary"].read_text())["summary"]["neg_log_phi"]
    print(
        f"{facts['rows']} {facts['rows_are']}: -log phi mean {stats['mean']:.3f}, range [{stats['min']:.3f}, {stats['max']:.3f}], "
        f"{short_estimator_text(facts)}; wrote {', '.join(str(p) for p in paths.values())}"
    )
    if "annotators" in facts:
        print("\n".join(comparison_lines(facts, text_table)))
    return 0
