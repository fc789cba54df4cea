"""Running the grid of a controllable-generation experiment: the world and its frozen
reference (``WorldRunner``), the dispersion pass, one training run per (seed, beta,
method), in-process or in worker processes, and the results dict (``run_controllable``)."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import logging as hf_logging

from mallowspo.experiments.controllable.config import (
    LABELS,
    MAX_LENGTH,
    MAX_PROMPT_LENGTH,
    METHODS,
    ControllableConfig,
    read_rows,
    select_family,
    stratified,
)
from mallowspo.experiments.controllable.evaluate import (
    CheckpointEvaluator,
    build_eval_set,
    evaluate_policy,
    say,
    sequence_logps,
)
from mallowspo.experiments.controllable.stats import dispersion_vs_truth, summarize
from mallowspo.experiments.world.ensure import ensure_world
from mallowspo.experiments.world.paths import WorldPaths
from mallowspo.training.config import MallowsPOConfig
from mallowspo.training.trainer import MallowsPOTrainer


def quiet_trainer_output(trainer, progress_bar: bool) -> None:
    """Keep the Trainer's progress bar but not its printed log dicts (the checkpoint lines say more)."""

    class BarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress_bar:
        trainer.add_callback(BarOnly())


@dataclass(frozen=True)
class RunSpec:
    seed: int
    beta: float
    method: str


class WorldRunner:
    """Everything shared by the runs of one experiment: the world, its data, the frozen
    reference model and the held-out set with its reference log-probs."""

    def __init__(self, config: ControllableConfig, world_root: str | Path, out_dir: str | Path, log=say):
        self.config = config
        self.world = WorldPaths(Path(world_root))
        self.out_dir = Path(out_dir)
        self.log = log
        self.tokenizer = AutoTokenizer.from_pretrained(self.world.model_dir)
        reference = AutoModelForCausalLM.from_pretrained(self.world.model_dir, dtype=torch.float32)
        self.reference = reference.eval().requires_grad_(False)  # the base model, frozen: pi_ref
        self.all_train_rows = read_rows(self.world.train_file)
        train = select_family(self.all_train_rows, config.family)
        self.train_rows = stratified(train, config.train_rows)
        test = select_family(read_rows(self.world.test_file), config.family)
        self.eval_set = build_eval_set(test, self.tokenizer, config)
        pad = self.tokenizer.pad_token_id
        es = self.eval_set
        es.ref_chosen_logps = sequence_logps(reference, es.pair_prompt_ids, es.pair_chosen_ids, pad).tolist()
        es.ref_rejected_logps = sequence_logps(reference, es.pair_prompt_ids, es.pair_rejected_ids, pad).tolist()
        self.phi_star: float | None = None

    def trainer_args(self, output_dir: Path, mallows: str, beta: float, seed: int, max_steps: int, **extra):
        c = self.config
        return MallowsPOConfig(
            output_dir=str(output_dir),
            mallows=mallows,
            beta=beta,
            seed=seed,
            max_steps=max_steps,
            per_device_train_batch_size=c.batch_size,
            per_device_eval_batch_size=64,
            precompute_ref_batch_size=64,
            learning_rate=c.learning_rate,
            warmup_steps=c.warmup_steps,
            lr_scheduler_type=c.lr_scheduler_type,
            max_length=MAX_LENGTH,
            max_prompt_length=MAX_PROMPT_LENGTH,
            logging_steps=max(1, max_steps // 10),
            save_strategy="no",
            report_to="none",
            dataloader_pin_memory=False,
            disable_tqdm=c.disable_tqdm,
            use_cpu=True,
            **extra,
        )

    def _dataset(self, rows: list[dict[str, Any]]):
        return datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])

    def dispersion(self) -> dict[str, Any]:
        """The trainer's entropy estimate of -log phi(x) on the whole train set (the mix),
        library defaults (one reference pass, cached); sets ``phi_star``."""
        model = AutoModelForCausalLM.from_pretrained(self.world.model_dir, dtype=torch.float32)
        args = self.trainer_args(self.out_dir / "dispersion", "phi", 0.1, 0, 1)
        trainer = MallowsPOTrainer(
            model, args=args, train_dataset=self._dataset(self.all_train_rows), processing_class=self.tokenizer
        )
        data = trainer.train_dataset
        rows = [self.all_train_rows[i] for i in data["row_index"]]
        self.phi_star = float(trainer.phi_star)
        return {
            "phi_star": self.phi_star,
            "reference_cache": str(trainer.reference_results["train"].cache_dir),
            "cache_reused": bool(trainer.reference_results["train"].reused),
            "estimate": [float(x) for x in data["neg_log_phi"]],
            "hbar": [float(x) for x in data["hbar"]],
            "true_neg_log_phi": [float(r["neg_log_phi"]) for r in rows],
            "family": [r["family"] for r in rows],
            "template": [r["template"] for r in rows],
        }

    def run_name(self, spec: RunSpec) -> str:
        return self.config.run_name(spec.seed, spec.beta, spec.method)

    def dispersion_args(self, spec: RunSpec) -> dict[str, Any]:
        """The ``MallowsPOConfig`` dispersion keys of one run (a subclass may choose another source)."""
        # A family run keeps the phi* fitted on the mix (see the package docstring).
        c = self.config
        return {"dispersion_normalization": "mean" if c.family == "mix" or self.phi_star is None else self.phi_star}

    def method_args(self, spec: RunSpec) -> dict[str, Any]:
        """The ``MallowsPOConfig`` keys that make ``spec.method`` (``mallows`` included)."""
        return {"mallows": METHODS[spec.method]["mallows"]}

    def label(self, spec: RunSpec) -> str:
        return LABELS[spec.method]

    def train_dataset(self):
        """What every run trains on (the selected train pairs)."""
        return self._dataset(self.train_rows)

    def evaluate(self, policy: torch.nn.Module, spec: RunSpec) -> dict[str, Any]:
        """One checkpoint's held-out metrics (``evaluate_policy``)."""
        c = self.config
        return evaluate_policy(policy, self.reference, self.eval_set, self.tokenizer, c, spec.seed, spec.beta)

    def train_one(self, spec: RunSpec) -> dict[str, Any]:
        """Train one method from the base model and evaluate it at ``config.eval_steps()``."""
        c = self.config
        name = self.run_name(spec)
        keys = {**self.method_args(spec), **self.dispersion_args(spec)}
        mallows = keys.pop("mallows")
        args = self.trainer_args(self.out_dir / "runs" / name, mallows, spec.beta, spec.seed, c.max_steps, **keys)
        model = AutoModelForCausalLM.from_pretrained(self.world.model_dir, dtype=torch.float32)

        def evaluate(policy: torch.nn.Module) -> dict:
            return self.evaluate(policy, spec)

        callback = CheckpointEvaluator(c.eval_steps(), evaluate, self.log, label=f"{self.label(spec):>15}")
        start = time.perf_counter()
        trainer = MallowsPOTrainer(
            model, args=args, train_dataset=self.train_dataset(), processing_class=self.tokenizer,
            callbacks=[callback],
        )  # fmt: skip
        quiet_trainer_output(trainer, progress_bar=not c.disable_tqdm)
        output = trainer.train()
        seconds = time.perf_counter() - start
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        data = trainer.train_dataset
        return {
            "name": name,
            **asdict(spec),
            "checkpoints": callback.records,
            "train_loss_first": losses[0] if losses else math.nan,
            "train_loss_last": losses[-1] if losses else math.nan,
            "train_accuracy_last": trainer.last_logged_metrics().get("rewards/accuracies", math.nan),
            "phi_star": trainer.phi_star,
            "neg_log_phi_mean": float(np.mean(data["neg_log_phi"])) if "neg_log_phi" in data.column_names else None,
            "train_seconds": float(output.metrics.get("train_runtime", math.nan)),
            "eval_seconds": float(sum(r["seconds"] for r in callback.records)),
            "seconds": seconds,
        }


_WORKER: WorldRunner | None = None


def _worker_init(config, world_root: str, out_dir: str, phi_star: float, runner_class=WorldRunner) -> None:
    global _WORKER
    torch.set_num_threads(config.num_threads)
    hf_logging.disable_progress_bar()
    _WORKER = runner_class(config, world_root, out_dir, log=say)
    _WORKER.phi_star = phi_star


def _worker_run(spec: RunSpec) -> dict[str, Any]:
    assert _WORKER is not None
    return _WORKER.train_one(spec)


def train_grid(
    runner: WorldRunner, specs: list, jobs: int, world_root: str, out: Path, log=say
) -> list[dict[str, Any]]:
    """Train every spec with ``runner`` (in this process), or with ``jobs`` > 1 worker processes that
    each build a runner of the same class. Each finished run is appended to ``out/runs.jsonl`` at
    once, so a stopped grid keeps its runs."""
    runs: list[dict[str, Any]] = []
    partial = out / "runs.jsonl"
    partial.write_text("")

    def done(n: int, result: dict[str, Any]) -> None:
        runs.append(result)
        with partial.open("a") as f:
            f.write(json.dumps(result, default=float) + "\n")
        log(f"  run {n}/{len(specs)} done: {result['name']} ({result['seconds']:.0f}s)")

    if jobs <= 1:
        for n, spec in enumerate(specs, 1):
            done(n, runner.train_one(spec))
        return runs
    init = (runner.config, str(world_root), str(out), runner.phi_star, type(runner))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init, initargs=init) as pool:
        for n, result in enumerate(pool.map(_worker_run, specs), 1):
            done(n, result)
    return runs


def run_specs(config: ControllableConfig) -> list[RunSpec]:
    """Seed-major order, so an interrupted grid still has whole seeds."""
    return [RunSpec(s, b, m) for s in config.seeds for b in config.betas for m in config.methods]


def run_controllable(
    config: ControllableConfig, out_dir: str | Path, world_root: str | Path | None = None, jobs: int = 1, log=say
) -> dict[str, Any]:
    """The whole experiment: world, dispersion, every (seed, beta, method) run, summaries.

    Returns the results dict (``write_outputs`` writes it and the report). ``jobs`` > 1
    trains that many runs at a time in worker processes (each with ``num_threads``)."""
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model load; the training bars stay
    timing: dict[str, float] = {}
    try:
        t = time.perf_counter()
        world = ensure_world(world_root, log=log)
        timing["world"] = time.perf_counter() - t
        log(f"[1/4] world: {world.root} ({timing['world']:.0f}s)")

        t = time.perf_counter()
        runner = WorldRunner(config, world.root, out, log=log)
        dispersion = runner.dispersion()
        timing["dispersion"] = time.perf_counter() - t
        summary = dispersion_vs_truth(dispersion)
        log(
            f"[2/4] dispersion: {len(dispersion['estimate'])} train pairs, phi* {dispersion['phi_star']:.3f}, "
            f"Spearman(estimate, true -log phi) {summary['spearman']:.3f} ({timing['dispersion']:.0f}s)"
        )

        specs = run_specs(config)
        log(
            f"[3/4] training {len(specs)} runs ({', '.join(LABELS[m] for m in config.methods)} x "
            f"{len(config.betas)} beta x {len(config.seeds)} seed) on {len(runner.train_rows)} {config.family} pairs, "
            f"{config.max_steps} steps of {config.batch_size}; evaluating at steps {config.eval_steps()} on "
            f"{len(runner.eval_set.prompts)} held-out prompts x {config.samples_per_prompt} samples and "
            f"{len(runner.eval_set.pair_families)} held-out pairs"
        )
        t = time.perf_counter()
        runs: list[dict[str, Any]] = []
        if jobs <= 1:
            for n, spec in enumerate(specs, 1):
                log(f"  run {n}/{len(specs)}: {LABELS[spec.method]}, beta {spec.beta:g}, seed {spec.seed}")
                runs.append(runner.train_one(spec))
                log(f"  run {n}/{len(specs)} done in {runs[-1]['seconds']:.0f}s")
        else:
            context = multiprocessing.get_context("spawn")
            init = (config, str(world.root), str(out), runner.phi_star)
            with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init, initargs=init) as pool:
                for n, result in enumerate(pool.map(_worker_run, specs), 1):
                    runs.append(result)
                    log(f"  run {n}/{len(specs)} done: {result['name']} ({result['seconds']:.0f}s)")
        timing["training"] = time.perf_counter() - t
        log(f"[4/4] summarising ({timing['training']:.0f}s of training and evaluation)")
    finally:
        torch.set_num_threads(previous_threads)
        if bars:
            hf_logging.enable_progress_bar()
    timing["total"] = time.perf_counter() - start
    return {
        "config": asdict(config),
        "jobs": jobs,
        "world": world_facts(world),
        "train_pairs": len(runner.train_rows),
        "eval_prompts": len(runner.eval_set.prompts),
        "eval_pairs": len(runner.eval_set.pair_families),
        "dispersion": {**summary, "values": dispersion},
        "runs": runs,
        "summary": summarize(config, runs),
        "timing_seconds": timing,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": config.num_threads,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
    }


def world_facts(world) -> dict[str, Any]:
    facts: dict[str, Any] = {"root": str(world.root)}
    if world.manifest.is_file():
        manifest = json.loads(world.manifest.read_text())
        facts["model_parameters"] = manifest.get("model", {}).get("parameters")
        facts["heldout_perplexity"] = manifest.get("evaluation", {}).get("heldout_perplexity")
        facts["config"] = manifest.get("config")
    if world.data_report.is_file():
        report = json.loads(world.data_report.read_text())
        facts["data_rows"] = report.get("rows")
        facts["chosen_reward_higher"] = {
            k: v.get("chosen_reward_higher") for k, v in report.get("by_family", {}).items()
        }
    return facts
