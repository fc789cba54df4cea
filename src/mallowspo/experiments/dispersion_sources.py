"""Does knowing the dispersion help? The controllable-generation experiment in the built-in
world (``mallowspo.experiments.controllable``) with one more dimension: where MallowsPO's
-log phi(x) comes from.

Sources (``SOURCES``), each used by MallowsPO-theta and MallowsPO-phi:

- ``oracle``: the world's true -log phi(x) (the data's ``neg_log_phi``), as a dataset column;
- ``annotators``: the posterior mean from the M = 5 annotators' vote counts
  (``dispersion_source: annotators``, ``chosen_votes`` / ``rejected_votes``, ``majority``);
- ``entropy``: the library default, the reference model's entropy (eqs. 10-11);
- ``placebo``: the oracle's values shuffled across prompts with a fixed seed: the same
  distribution, no link to the prompt.

Every source gets the same normalisation and clamp: phi* so that the mean over the world's
whole train set (the mix) is 1, then ``DEFAULT_CLAMP``. The oracle and the placebo are
normalised here and given as a ``column`` (which the trainer uses as given); the entropy and
the annotators are normalised by the trainer ("mean" on the mix; on one family, the phi*
fitted on the mix, as in the controllable experiment). DPO has no dispersion and runs once
per seed. Everything else (budget, evaluation, equal-KL statistics) is the controllable
experiment's; the comparison at equal KL takes, per seed, the smallest final KL over all
runs of that seed (one K* for every source and method), and pairs each run with DPO.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from transformers import AutoModelForCausalLM

from mallowspo.annotators import neg_log_phi_from_votes
from mallowspo.dispersion import DEFAULT_CLAMP, scale_and_clamp
from mallowspo.experiments.controllable.config import LABELS, PROMPT_FAMILIES, ControllableConfig
from mallowspo.experiments.controllable.evaluate import say
from mallowspo.experiments.controllable.report import format_ci, read_results
from mallowspo.experiments.controllable.run import RunSpec, WorldRunner, train_grid, world_facts
from mallowspo.experiments.controllable.stats import beyond, matched_kl_comparison, mean_ci, scopes_of, value_at_kl
from mallowspo.experiments.world.ensure import ensure_world
from mallowspo.training.trainer import MallowsPOTrainer

SOURCES = ("oracle", "annotators", "entropy", "placebo")
ORACLE_COLUMN, PLACEBO_COLUMN = "oracle_neg_log_phi", "placebo_neg_log_phi"
VOTE_COLUMNS = ("chosen_votes", "rejected_votes")


@dataclass(frozen=True)
class DispersionSourcesConfig(ControllableConfig):
    """A controllable experiment (same budget and evaluation) over dispersion ``sources``."""

    sources: tuple[str, ...] = SOURCES
    placebo_seed: int = 0  # the permutation of the oracle's values across prompts

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [s for s in self.sources if s not in SOURCES]
        if unknown or not self.sources:
            raise ValueError(f"sources must be a non-empty subset of {SOURCES}, got {self.sources}")


@dataclass(frozen=True)
class SourceSpec(RunSpec):
    source: str = "none"  # "none" for DPO


def placebo_values(rows: list[dict[str, Any]], seed: int) -> list[float]:
    """The rows' true -log phi(x) permuted across prompts (``prompt_id``): each prompt gets the
    value of another prompt, fixed by ``seed``; rows of one prompt keep one value."""
    prompts = list(dict.fromkeys(r["prompt_id"] for r in rows))
    value = {r["prompt_id"]: float(r["neg_log_phi"]) for r in rows}
    perm = np.random.default_rng(seed).permutation(len(prompts))
    placebo = {p: value[prompts[j]] for p, j in zip(prompts, perm)}
    return [placebo[r["prompt_id"]] for r in rows]


def normalise(values, mean: float) -> np.ndarray:
    """``values`` / ``mean``, clamped: the entropy's and the annotators' normalisation ("mean") and clamp."""
    return scale_and_clamp(torch.as_tensor(np.asarray(values, np.float64)), 1.0 / mean, DEFAULT_CLAMP).numpy()


def vote_estimate(rows: list[dict[str, Any]]) -> np.ndarray:
    """The annotators' raw posterior mean of -log phi(x) from the rows' vote counts (majority)."""
    c = np.asarray([r["chosen_votes"] for r in rows])
    w = np.asarray([r["rejected_votes"] for r in rows])
    return np.asarray(neg_log_phi_from_votes(np.maximum(c, w), c + w, consensus="majority"))


class SourceRunner(WorldRunner):
    """The controllable runner with the oracle and placebo columns and the vote counts in its
    data, and one dispersion source per run."""

    def __init__(self, config: DispersionSourcesConfig, world_root, out_dir, log=say):
        super().__init__(config, world_root, out_dir, log=log)
        rows = self.all_train_rows  # the mix: the normalisation's train set; train_rows holds the same dicts
        truth = np.asarray([r["neg_log_phi"] for r in rows], np.float64)
        placebo = np.asarray(placebo_values(rows, config.placebo_seed))
        for r, o, p in zip(rows, normalise(truth, truth.mean()), normalise(placebo, placebo.mean())):
            r[ORACLE_COLUMN], r[PLACEBO_COLUMN] = float(o), float(p)
        self.annotator_phi_star = 1.0 / float(vote_estimate(rows).mean())

    def _dataset(self, rows):
        import datasets

        keys = ("prompt", "chosen", "rejected", ORACLE_COLUMN, PLACEBO_COLUMN, *VOTE_COLUMNS)
        return datasets.Dataset.from_list([{k: r[k] for k in keys} for r in rows])

    def run_name(self, spec: SourceSpec) -> str:
        name = self.config.run_name(spec.seed, spec.beta, spec.method)
        return name if spec.method == "dpo" else f"{name}-{spec.source}"

    def dispersion_args(self, spec: SourceSpec) -> dict[str, Any]:
        mix = self.config.family == "mix"
        if spec.method == "dpo" or spec.source == "entropy":
            return super().dispersion_args(spec)
        if spec.source in ("oracle", "placebo"):
            column = ORACLE_COLUMN if spec.source == "oracle" else PLACEBO_COLUMN
            return {"dispersion_source": "column", "dispersion_column": column}
        return {
            "dispersion_source": "annotators",
            "dispersion_chosen_votes_column": VOTE_COLUMNS[0],
            "dispersion_rejected_votes_column": VOTE_COLUMNS[1],
            "dispersion_consensus": "majority",
            "dispersion_normalization": "mean" if mix else self.annotator_phi_star,
        }

    def attached_dispersion(self, source: str, method: str = "phi") -> tuple[list[dict[str, Any]], np.ndarray]:
        """The train rows and the ``neg_log_phi`` the trainer attaches to them for ``source``."""
        spec = SourceSpec(0, 0.1, method, source)
        args = self.trainer_args(self.out_dir / "dispersion" / source, method, 0.1, 0, 1, **self.dispersion_args(spec))
        model = AutoModelForCausalLM.from_pretrained(self.world.model_dir, dtype=torch.float32)
        trainer = MallowsPOTrainer(
            model, args=args, train_dataset=self._dataset(self.train_rows), processing_class=self.tokenizer
        )
        data = trainer.train_dataset
        return [self.train_rows[i] for i in data["row_index"]], np.asarray(data["neg_log_phi"], np.float64)


def source_summary(rows: list[dict[str, Any]], estimate: np.ndarray) -> dict[str, Any]:
    """Spearman of a source's attached -log phi(x) with the truth (overall and per family), and its mean by family."""
    truth = np.asarray([r["neg_log_phi"] for r in rows])
    family = np.asarray([r["family"] for r in rows])

    def rho(mask):
        ok = mask.sum() >= 3 and np.ptp(truth[mask]) > 0 and np.ptp(estimate[mask]) > 0
        return float(spearmanr(estimate[mask], truth[mask]).statistic) if ok else math.nan

    out: dict[str, Any] = {"spearman": rho(np.ones(len(rows), bool)), "mean": float(estimate.mean())}
    for f in PROMPT_FAMILIES:
        if (family == f).any():
            out[f"spearman_{f}"] = rho(family == f)
            out[f"mean_{f}"] = float(estimate[family == f].mean())
    return out


def run_specs(config: DispersionSourcesConfig) -> list[SourceSpec]:
    """Seed-major: per seed and beta, DPO once, then each source with each MallowsPO method."""
    mallows = [m for m in config.methods if m != "dpo"]
    specs = []
    for seed in config.seeds:
        for beta in config.betas:
            specs += [SourceSpec(seed, beta, "dpo")] if "dpo" in config.methods else []
            specs += [SourceSpec(seed, beta, m, s) for s in config.sources for m in mallows]
    return specs


def key(run: dict[str, Any]) -> str:
    return "dpo" if run["method"] == "dpo" else f"{run['method']}:{run['source']}"


def label(k: str) -> str:
    method, _, source = k.partition(":")
    return LABELS[method] + (f" ({source})" if source else "")


def summarize_sources(config: DispersionSourcesConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per beta: final reward and KL per run kind and scope; the paired comparison with DPO at
    one matched KL per seed (the least travelled of all runs); oracle - placebo at that KL."""
    out: dict[str, Any] = {}
    if not runs:
        return out
    scopes = scopes_of(runs)
    for beta in config.betas:
        by_key: dict[str, list[dict[str, Any]]] = {}
        for r in sorted((r for r in runs if r["beta"] == beta), key=lambda r: r["seed"]):
            by_key.setdefault(key(r), []).append(r)
        final = {
            k: {s: {m: mean_ci([r["checkpoints"][-1][s][m] for r in rs]) for m in ("reward", "kl")} for s in scopes}
            for k, rs in by_key.items()
        }
        contrast: dict[str, Any] = {}
        seeds = sorted(set.intersection(*(set(r["seed"] for r in rs) for rs in by_key.values())))
        for m in (m for m in config.methods if m != "dpo"):
            a, b = f"{m}:oracle", f"{m}:placebo"
            if a in by_key and b in by_key:
                contrast[m] = {}
                for s in scopes:
                    diffs = []
                    for seed in seeds:
                        curves = [next(r for r in rs if r["seed"] == seed)["checkpoints"] for rs in by_key.values()]
                        kstar = max(0.0, min(c[-1][s]["kl"] for c in curves))
                        ca, cb = (next(r for r in by_key[k] if r["seed"] == seed)["checkpoints"] for k in (a, b))
                        diffs.append(value_at_kl(ca, kstar, "reward", s) - value_at_kl(cb, kstar, "reward", s))
                    contrast[m][s] = mean_ci(diffs)
        out[f"{beta:g}"] = {
            "keys": list(by_key),
            "final": final,
            "matched_kl": matched_kl_comparison(by_key, scopes),
            "matched_kl_by_source": {  # K* of DPO and the two methods of one source, as in the controllable experiment
                src: matched_kl_comparison(
                    {k: v for k, v in by_key.items() if k == "dpo" or k.endswith(f":{src}")}, scopes
                )
                for src in config.sources
                if "dpo" in by_key
            },
            "oracle_minus_placebo": contrast,
        }
    return out


def run_dispersion_sources(
    config: DispersionSourcesConfig, out_dir, world_root=None, jobs: int = 1, log=say
) -> dict[str, Any]:
    """World, the sources' attached dispersion, every run, the summary (``write_outputs`` writes them)."""
    from transformers.utils import logging as hf_logging

    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    hf_logging.disable_progress_bar()
    try:
        world = ensure_world(world_root, log=log)
        runner = SourceRunner(config, world.root, out, log=log)
        runner.dispersion()  # the entropy's phi* on the mix (family runs keep it)
        sources = {}
        for s in config.sources:
            sources[s] = source_summary(*runner.attached_dispersion(s))
            log(f"[sources] {s}: Spearman with the true -log phi {sources[s]['spearman']:.3f}")
        specs = run_specs(config)
        log(f"[runs] {len(specs)} runs on {len(runner.train_rows)} {config.family} pairs, {config.max_steps} steps")
        runs = train_grid(runner, specs, jobs, world.root, out, log)
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "config": asdict(config),
        "jobs": jobs,
        "world": world_facts(world),
        "train_pairs": len(runner.train_rows),
        "eval_prompts": len(runner.eval_set.prompts),
        "phi_star_entropy": runner.phi_star,
        "phi_star_annotators": runner.annotator_phi_star,
        "sources": sources,
        "runs": runs,
        "summary": summarize_sources(config, runs),
        "seconds": time.perf_counter() - start,
    }


def report_markdown(results: dict[str, Any]) -> str:
    c = results["config"]
    lines = [
        f"# Dispersion sources: {c['family']}, {len(c['seeds'])} seed(s), {c['max_steps']} steps",
        "",
        "Means over seeds with 95% t-intervals. Matched KL: per seed, K* = the smallest final KL of all runs; "
        "each run's reward is interpolated on its own curve at K*; differences are paired by seed.",
        "",
        "## The sources' -log phi(x) on the train pairs",
        "",
        "| source | Spearman with truth | closed | open | mean closed | mean open |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s, v in results["sources"].items():
        cells = [
            v.get(k, math.nan) for k in ("spearman", "spearman_closed", "spearman_open", "mean_closed", "mean_open")
        ]
        lines.append(f"| {s} | " + " | ".join(f"{x:.3f}" for x in cells) + " |")
    for beta, entry in results["summary"].items():
        scopes = list(next(iter(entry["final"].values())))
        lines += ["", f"## beta {beta}: final reward / KL", ""]
        lines += ["| run | " + " | ".join(f"reward {s} | KL {s}" for s in scopes) + " |"]
        lines += ["| --- |" + " --- | --- |" * len(scopes)]
        for k in entry["keys"]:
            f = entry["final"][k]
            lines.append(
                f"| {label(k)} | "
                + " | ".join(f"{format_ci(f[s]['reward'])} | {format_ci(f[s]['kl'])}" for s in scopes)
                + " |"
            )
        lines += ["", f"## beta {beta}: reward at matched KL, minus DPO (paired by seed)", ""]
        lines += [
            "| run | " + " | ".join(f"{s}: K* {format_ci(entry['matched_kl'][s]['kl'], 2)}" for s in scopes) + " |"
        ]
        lines += ["| --- |" + " --- |" * len(scopes)]
        for k in entry["keys"]:
            cells = []
            for s in scopes:
                m = entry["matched_kl"][s]["methods"][k]
                cells.append(format_ci(m["reward"]) if k == "dpo" else format_ci(m["reward_minus_dpo"], signed=True))
            lines.append(f"| {label(k)} | " + " | ".join(cells) + " |")
        if entry.get("matched_kl_by_source"):
            lines += ["", f"## beta {beta}: minus DPO at each source's own matched KL (K* of DPO, theta, phi)", ""]
            lines += ["| run | K* all | " + " | ".join(scopes) + " |", "| --- | --- |" + " --- |" * len(scopes)]
            for matched in entry["matched_kl_by_source"].values():
                for k in (k for k in matched["all"]["methods"] if k != "dpo"):
                    cells = [format_ci(matched[s]["methods"][k]["reward_minus_dpo"], signed=True) for s in scopes]
                    lines.append(f"| {label(k)} | {format_ci(matched['all']['kl'], 2)} | " + " | ".join(cells) + " |")
        if entry["oracle_minus_placebo"]:
            lines += ["", f"## beta {beta}: oracle minus placebo at matched KL", ""]
            lines += ["| method | " + " | ".join(scopes) + " |", "| --- |" + " --- |" * len(scopes)]
            for m, v in entry["oracle_minus_placebo"].items():
                lines.append(f"| {LABELS[m]} | " + " | ".join(format_ci(v[s], signed=True) for s in scopes) + " |")
        lines += ["", "## Verdict", ""] + [f"- {x}" for x in verdict_lines(entry)]
    return "\n".join(lines) + "\n"


def verdict_lines(entry: dict[str, Any]) -> list[str]:
    """Which runs differ from DPO (and the oracle from the placebo) beyond the 95% interval, over all prompts."""
    lines = []
    for k in entry["keys"]:
        if k != "dpo":
            d = entry["matched_kl"]["all"]["methods"][k]["reward_minus_dpo"]
            word = ("above" if d["mean"] > 0 else "below") + " DPO" if beyond(d) else "not distinguishable from DPO"
            lines.append(f"{label(k)}: {format_ci(d, signed=True)} at matched KL, {word}")
    for m, v in entry["oracle_minus_placebo"].items():
        lines.append(
            f"{LABELS[m]}, oracle - placebo: {format_ci(v['all'], signed=True)}"
            + (" (beyond noise)" if beyond(v["all"]) else " (within noise)")
        )
    return lines


def write_outputs(results: dict[str, Any], out_dir) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "report": out / "report.md"}
    paths["results"].write_text(json.dumps(results, indent=1, default=float) + "\n")
    paths["report"].write_text(report_markdown(results))
    return paths


def load_results(out_dir) -> dict[str, Any]:
    """results.json of ``out_dir``, its summary recomputed from the runs."""
    return read_results(out_dir, DispersionSourcesConfig, summarize_sources)
