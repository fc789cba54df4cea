"""`mallowspo dispersion`: run only the reference pass and report the per-prompt dispersion.

    mallowspo dispersion --model M --dataset D [--out DIR]

Writes to DIR (default runs/dispersion):
    dispersion.jsonl   per pair: row_index, prompt, hbar, neg_log_phi, mean entropies
    summary.json       phi*, settings, mean / std / range / quantiles of -log phi(x) and Hbar
    histogram.png      the distribution of -log phi(x) (paper §5.1, Fig. 4)
    report.md          the summary and the most / least dispersed prompts (paper App. A)

The reference pass is the trainer's, with the same cache (``$MALLOWSPO_CACHE``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("mallowspo.dispersion_report")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model directory or hub id (default: the built-in tiny model)")
    parser.add_argument("--dataset", default=None, help="preference data: file, directory or hub id (default: bundled)")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--out", default="runs/dispersion", help="output directory")
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--max_prompt_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--normalization", default="mean", help="phi*: 'mean' (mean estimate 1) or a number")
    parser.add_argument("--clamp", type=float, nargs=2, default=[0.05, 20.0], metavar=("MIN", "MAX"))
    parser.add_argument("--dtype", default="auto", help="weights dtype: auto, float32, bfloat16, float16")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--top", type=int, default=10, help="prompts listed at each end of the report")


# ---------------------------------------------------------------------------------------
# Computing
# ---------------------------------------------------------------------------------------


def compute_dispersion(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Tokenize, run (or reuse) the reference pass, estimate -log phi(x).

    Returns the tokenized dataset with the reference columns and ``neg_log_phi``, and the
    run's facts (phi*, settings, whether the cache was reused).
    """
    import torch
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from mallowspo.collate import PreferenceCollator
    from mallowspo.config import number_or_keyword
    from mallowspo.data import DataConfig, load_preference_dataset, prepare_preference_dataset
    from mallowspo.dispersion import estimate_neg_log_phi
    from mallowspo.head import add_completion_head
    from mallowspo.reference import load_or_compute_reference_columns, weights_fingerprint
    from mallowspo.trainer import check_model_source, ensure_pad_token, load_causal_lm

    if args.model is None or args.dataset is None:
        from mallowspo.builtin import TINY_MODEL_THREADS, bundled_preferences, ensure_default_model

        if args.model is None:
            args.model = str(ensure_default_model())
            torch.set_num_threads(TINY_MODEL_THREADS)
        args.dataset = args.dataset or str(bundled_preferences())
    normalization = number_or_keyword(args.normalization, "mean", "--normalization")
    check_model_source(args.model)
    raw = load_preference_dataset(args.dataset, args.split)  # a bad file fails before the model loads
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    ensure_pad_token(tokenizer)
    data_config = DataConfig(max_length=args.max_length, max_prompt_length=args.max_prompt_length, strict=False)
    dataset, report = prepare_preference_dataset(raw, tokenizer, data_config)

    model = load_causal_lm(args.model, args.dtype, args.trust_remote_code)
    weights = weights_fingerprint(model)
    add_completion_head(model)
    accelerator = Accelerator()
    model.to(accelerator.device)
    result = load_or_compute_reference_columns(
        model, dataset, PreferenceCollator(tokenizer.pad_token_id), accelerator,
        batch_size=args.batch_size, weights=weights, tokenizer=tokenizer, data_settings=data_config,
    )
    estimates, phi_star = estimate_neg_log_phi(
        torch.tensor(result.columns["hbar"]), phi_star=normalization, clamp=tuple(args.clamp)
    )
    for name, values in {**result.columns, "neg_log_phi": estimates.numpy()}.items():
        dataset = dataset.add_column(name, values.tolist())
    facts = {
        "model": args.model,
        "dataset": args.dataset,
        "split": args.split,
        "rows": len(dataset),
        "validation": report.summary(),
        "phi_star": phi_star,
        "normalization": normalization,
        "clamp": list(args.clamp),
        "cache_dir": str(result.cache_dir),
        "cache_reused": result.reused,
    }
    return dataset, facts


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------


def per_prompt_table(dataset) -> list[dict[str, Any]]:
    """Pairs grouped by prompt text: mean -log phi(x), mean Hbar, pair count; most dispersed first."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for prompt, value, hbar in zip(dataset["prompt"], dataset["neg_log_phi"], dataset["hbar"]):
        groups.setdefault(prompt, []).append((value, hbar))
    table = [
        {"prompt": p, "neg_log_phi": float(np.mean([v for v, _ in g])), "hbar": float(np.mean([h for _, h in g])), "pairs": len(g)}
        for p, g in groups.items()
    ]
    return sorted(table, key=lambda row: row["neg_log_phi"])


def write_histogram(path: Path, values: np.ndarray, phi_star: float) -> Path:
    """Histogram of -log phi(x) with its mean, as a PNG (matplotlib Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=min(50, max(10, len(values) // 10)), color="#4c72b0", edgecolor="white")
    ax.axvline(float(np.mean(values)), color="#c44e52", linestyle="--", label=f"mean {np.mean(values):.3f}")
    ax.set_xlabel("estimated -log phi(x)   (low = high dispersion)")
    ax.set_ylabel("pairs")
    ax.set_title(f"Per-prompt dispersion (phi* = {phi_star:.3g})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _clip(text: str, width: int = 90) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 3] + "..."


def render_report(facts: dict[str, Any], summary: dict[str, Any], table: list[dict[str, Any]], top: int) -> str:
    """The markdown report: settings, summary statistics, most and least dispersed prompts."""
    rows = lambda items: [  # noqa: E731
        f"| {r['neg_log_phi']:.3f} | {r['hbar']:.3f} | {r['pairs']} | {_clip(r['prompt'])} |" for r in items
    ]
    header = ["| -log phi | Hbar | pairs | prompt |", "|---|---|---|---|"]
    stats = summary["neg_log_phi"]
    return "\n".join([
        "# Dispersion report",
        "",
        f"Model `{facts['model']}`, data `{facts['dataset']}` (split {facts['split']}), {facts['rows']} pairs.",
        f"Estimator: -log phi(x) = -phi* log Hbar(x) (paper eqs. 10-11), phi* = {facts['phi_star']:.4g} "
        f"(normalisation `{facts['normalization']}`), clamp {facts['clamp']}.",
        f"Reference pass: {'reused the cache' if facts['cache_reused'] else 'computed'} at `{facts['cache_dir']}`.",
        "",
        "![histogram](histogram.png)",
        "",
        "| statistic | -log phi(x) | Hbar |",
        "|---|---|---|",
        *[f"| {k} | {stats[k]:.4g} | {summary['hbar'][k]:.4g} |" for k in stats if k != "count"],
        "",
        f"## Most dispersed prompts (lowest -log phi: many acceptable answers, weaker preference signal)",
        "",
        *header,
        *rows(table[:top]),
        "",
        f"## Least dispersed prompts (highest -log phi: one clear answer, stronger preference signal)",
        "",
        *header,
        *rows(reversed(table[-top:])),
        "",
        f"Data validation: {_clip(facts['validation'].splitlines()[0], 200)}",
        "",
    ])


def write_outputs(out: Path, dataset, facts: dict[str, Any], top: int) -> dict[str, Path]:
    """Write dispersion.jsonl, summary.json, histogram.png and report.md into ``out``."""
    from mallowspo.model_card import dispersion_summary
    from mallowspo.reference import write_dispersion_jsonl

    out.mkdir(parents=True, exist_ok=True)
    values = np.asarray(dataset["neg_log_phi"], dtype=np.float64)
    summary = {"neg_log_phi": dispersion_summary(values), "hbar": dispersion_summary(np.asarray(dataset["hbar"]))}
    paths = {
        "jsonl": write_dispersion_jsonl(out / "dispersion.jsonl", dataset),
        "summary": out / "summary.json",
        "histogram": write_histogram(out / "histogram.png", values, facts["phi_star"]),
        "report": out / "report.md",
    }
    paths["summary"].write_text(json.dumps({**facts, "summary": summary}, indent=2, default=str))
    paths["report"].write_text(render_report(facts, summary, per_prompt_table(dataset), top))
    return paths


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mallowspo").setLevel(logging.INFO)
    from mallowspo.cli import user_errors
    from mallowspo.trainer import check_output_dir

    with user_errors():  # settings, paths, data: the user's
        check_output_dir(args.out)
        dataset, facts = compute_dispersion(args)
    paths = write_outputs(Path(args.out), dataset, facts, args.top)
    stats = json.loads(paths["summary"].read_text())["summary"]["neg_log_phi"]
    print(
        f"{facts['rows']} pairs: -log phi mean {stats['mean']:.3f}, range [{stats['min']:.3f}, {stats['max']:.3f}], "
        f"phi* {facts['phi_star']:.4g}; wrote {', '.join(str(p) for p in paths.values())}"
    )
    return 0
