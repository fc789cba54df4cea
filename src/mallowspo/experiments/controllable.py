"""Controllable generation in the built-in world (paper §5.3, Fig. 8c) at CPU scale:
DPO against MallowsPO-theta and MallowsPO-phi, trained from the same base model on the
same preference pairs with the same budget, and judged by the ground-truth reward.

The paper fine-tunes GPT-2-large (SFT on IMDB) on offline preference pairs and plots the
sentiment classifier's reward of sampled generations against KL(pi || pi_ref) during
training. Its claim: MallowsPO-theta ~ DPO; MallowsPO-phi reaches the same reward at a
lower KL. Here the world of ``mallowspo.world`` stands in for IMDB: a base ("SFT") model,
closed prompts (annotators agree, phi(x) small) and open prompts (phi(x) near 1), the
VADER sentiment r*(x, y) as the reward, and pairs drawn from Kendall Mallows annotators.

One pipeline (``run_controllable``), used both by ``mallowspo demo`` (one seed, one beta,
the mix of families: ``ControllableConfig.demo()``) and ``mallowspo experiment
controllable`` (several seeds and betas, one family or the mix):

1. Dispersion. A ``MallowsPOTrainer`` with the library defaults is built on the whole
   world train set (the mix): its reference pass gives the entropy estimate of -log phi(x)
   per pair (eqs. 10-11, phi* = train mean 1), compared with the true phi(x) (Fig. 3) and
   histogrammed by family (Fig. 7). Runs restricted to one family keep this phi* (a fixed
   ``dispersion_normalization``), so a closed prompt has the same -log phi estimate in
   every run; the mix runs use the default ``mean`` normalisation, which gives the same phi*.
2. Training. For each seed, beta and method, ``MallowsPOTrainer`` (in-process) trains a
   fresh copy of the base model on the train pairs of the family; a ``TrainerCallback``
   evaluates the policy at step 0 and at evenly spaced steps (``CheckpointEvaluator``).
3. Evaluation on held-out prompts (the world's test titles), per checkpoint:
   - reward: mean r*(x, y) of ``samples_per_prompt`` samples y ~ pi(.|x) per prompt
     (ancestral sampling at temperature 1, no top-k/top-p);
   - KL: mean over the same samples of log pi(y|x) - log pi_ref(y|x), on the exact sampled
     token ids (prompt excluded, end token included): an unbiased estimate of the
     sequence-level KL(pi || pi_ref);
   - preference accuracy: share of held-out pairs whose implicit reward margin
     beta [(log pi - log pi_ref)(yw) - (log pi - log pi_ref)(yl)] is > 0;
   each for all prompts and per family (closed/open). Samples that do not end within
   ``max_new_tokens`` are not responses; they are counted (``unfinished``) and left out.
   All methods use the same sampling seed at each checkpoint (common random numbers).
4. Outputs (``write_outputs``): results.json, report.md with the table and a verdict, and
   the figures reward_kl.png (Fig. 8c), reward_kl_by_family.png, dispersion_vs_truth.png
   (Fig. 3 for the LM) and dispersion_hist.png (Fig. 7).

Over several seeds every number is the mean over seeds with a 95% t-interval. The main
comparison at equal KL: for each seed, each method's reward is interpolated on its own
training curve at the KL where the *least* travelled method ends (``matched_kl``), and the
difference to DPO is taken per seed (paired).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from mallowspo.world.lm import sample_completions

METHODS: dict[str, dict[str, Any]] = {
    "dpo": {"mallows": "none"},
    "theta": {"mallows": "theta"},
    "phi": {"mallows": "phi"},  # library defaults: cubic smoothing, eps 0.1, entropy dispersion, mean normalisation
}
LABELS = {"dpo": "DPO", "theta": "MallowsPO-theta", "phi": "MallowsPO-phi"}
COLORS = {"dpo": "black", "theta": "tab:blue", "phi": "tab:orange"}
FAMILY_CHOICES = ("closed", "open", "mix")
PROMPT_FAMILIES = ("closed", "open")
METRICS = ("reward", "kl", "accuracy")
MAX_LENGTH, MAX_PROMPT_LENGTH = 128, 32  # world prompts are ~10 tokens, responses ~10-40


@dataclass(frozen=True)
class ControllableConfig:
    """One controllable-generation experiment: what is trained and how it is evaluated."""

    seeds: tuple[int, ...] = (0,)
    betas: tuple[float, ...] = (0.1,)
    methods: tuple[str, ...] = ("dpo", "theta", "phi")
    family: str = "mix"  # train and test rows: "closed", "open" or "mix" (both)
    # training budget, identical for every method
    max_steps: int = 150
    batch_size: int = 16
    learning_rate: float = 3e-5  # = builtin.WORLD_LEARNING_RATE; at 1e-4 the closed answers garble within 100 steps
    warmup_steps: int = 10
    lr_scheduler_type: str = "constant_with_warmup"
    # evaluation
    eval_points: int = 6  # checkpoints evaluated, step 0 and max_steps included
    eval_prompts: int = 64  # held-out prompts sampled from (balanced over templates)
    samples_per_prompt: int = 4
    max_new_tokens: int = 48
    eval_pairs: int | None = None  # held-out pairs for the accuracy (None: all of the family)
    train_rows: int | None = None  # cap on train pairs (None: all of the family)
    num_threads: int = 1  # torch threads (the tiny model is fastest on one; see builtin.py)
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {tuple(METHODS)}, got {self.methods}")
        if self.family not in FAMILY_CHOICES:
            raise ValueError(f"family must be one of {FAMILY_CHOICES}, got {self.family!r}")
        if not self.seeds or not self.betas or any(b <= 0 for b in self.betas):
            raise ValueError(f"need at least one seed and positive betas, got seeds={self.seeds} betas={self.betas}")
        if self.max_steps < 1 or self.eval_points < 2:
            raise ValueError("max_steps must be >= 1 and eval_points >= 2 (step 0 and the last step)")
        if self.eval_prompts < 1 or self.samples_per_prompt < 1 or self.batch_size < 1:
            raise ValueError("eval_prompts, samples_per_prompt and batch_size must be >= 1")

    @classmethod
    def demo(cls, **overrides) -> "ControllableConfig":
        """The built-in demo: one seed, beta 0.1, both families (what `make demo` runs)."""
        return cls(**overrides)

    def eval_steps(self) -> list[int]:
        """The evaluated steps: ``eval_points`` evenly spaced steps from 0 to ``max_steps``."""
        steps = np.linspace(0, self.max_steps, self.eval_points).round().astype(int)
        return sorted(set(int(s) for s in steps))

    def run_name(self, seed: int, beta: float, method: str) -> str:
        return f"{self.family}-beta{beta:g}-seed{seed}-{method}"


# ----------------------------------------------------------------------------------------
# Data of the world
# ----------------------------------------------------------------------------------------


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def select_family(rows: list[dict[str, Any]], family: str) -> list[dict[str, Any]]:
    """The rows of one prompt family, or all of them for "mix"."""
    return list(rows) if family == "mix" else [r for r in rows if r["family"] == family]


def stratified(rows: list[dict[str, Any]], n: int | None, key: str = "template") -> list[dict[str, Any]]:
    """The first ``n`` rows taken round-robin over the values of ``key`` (file order within each)."""
    if n is None or n >= len(rows):
        return list(rows)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    out: list[dict[str, Any]] = []
    queues = [list(g) for g in groups.values()]
    while len(out) < n:
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


@dataclass
class EvalSet:
    """Held-out prompts to sample from and held-out pairs to score, with their reference numbers."""

    prompts: list[str]
    prompt_families: list[str]
    prompt_templates: list[str]
    prompt_ids: list[list[int]]
    pair_families: list[str]
    pair_prompt_ids: list[list[int]]
    pair_chosen_ids: list[list[int]]
    pair_rejected_ids: list[list[int]]
    ref_chosen_logps: list[float] = field(default_factory=list)
    ref_rejected_logps: list[float] = field(default_factory=list)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_eval_set(test_rows: list[dict[str, Any]], tokenizer, config: ControllableConfig) -> EvalSet:
    """Prompts (one per held-out prompt, balanced over templates) and pairs of the family.

    Tokenised as the trainer tokenises a standard-format pair: prompt ids (this tokenizer
    adds no special tokens), completion ids, then the end token."""
    prompt_rows = stratified(test_rows, config.eval_prompts)
    pair_rows = stratified(test_rows, config.eval_pairs)
    eos = tokenizer.eos_token_id
    return EvalSet(
        prompts=[r["prompt"] for r in prompt_rows],
        prompt_families=[r["family"] for r in prompt_rows],
        prompt_templates=[r["template"] for r in prompt_rows],
        prompt_ids=[encode(tokenizer, r["prompt"]) for r in prompt_rows],
        pair_families=[r["family"] for r in pair_rows],
        pair_prompt_ids=[encode(tokenizer, r["prompt"]) for r in pair_rows],
        pair_chosen_ids=[encode(tokenizer, r["chosen"]) + [eos] for r in pair_rows],
        pair_rejected_ids=[encode(tokenizer, r["rejected"]) + [eos] for r in pair_rows],
    )


# ----------------------------------------------------------------------------------------
# Scoring and sampling (plain forward passes; the policy's fused head is not used here)
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def sequence_logps(
    model: torch.nn.Module, prompts: list[list[int]], completions: list[list[int]], pad_id: int, batch_size: int = 64
) -> np.ndarray:
    """(N,) float64: sum over completion tokens of log p(token | prefix), prompt excluded."""
    was_training = model.training
    model.eval()
    out: list[np.ndarray] = []
    try:
        for lo in range(0, len(prompts), batch_size):
            seqs = [p + c for p, c in zip(prompts[lo : lo + batch_size], completions[lo : lo + batch_size])]
            starts = [len(p) for p in prompts[lo : lo + batch_size]]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            attention = torch.zeros_like(ids)
            target = torch.zeros((len(seqs), width - 1))
            for i, (s, start) in enumerate(zip(seqs, starts)):
                ids[i, : len(s)] = torch.tensor(s)
                attention[i, : len(s)] = 1
                target[i, start - 1 : len(s) - 1] = 1  # position t predicts token t + 1
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
            token_logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            out.append((token_logps.double() * target.double()).sum(-1).numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0)


def evaluate_policy(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    eval_set: EvalSet,
    tokenizer,
    config: ControllableConfig,
    seed: int,
    beta: float,
) -> dict[str, Any]:
    """Reward, KL and preference accuracy of ``policy`` on the held-out set, overall and per family."""
    from mallowspo.world.reward import sentiment_reward

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    k = config.samples_per_prompt
    samples = sample_completions(policy, eval_set.prompt_ids, k, config.max_new_tokens, eos, pad, seed)
    sample_prompt = [i for i in range(len(eval_set.prompt_ids)) for _ in range(k)]
    done = [j for j, s in enumerate(samples) if s is not None]
    prompts = [eval_set.prompt_ids[sample_prompt[j]] for j in done]
    completions = [samples[j] for j in done]
    policy_logps = sequence_logps(policy, prompts, completions, pad)
    ref_logps = sequence_logps(reference, prompts, completions, pad)
    log_ratio = policy_logps - ref_logps
    rewards = np.array([sentiment_reward(tokenizer.decode(c[:-1])) for c in completions])
    sample_family = np.array([eval_set.prompt_families[sample_prompt[j]] for j in done])
    all_family = np.array([eval_set.prompt_families[i] for i in sample_prompt])

    chosen = sequence_logps(policy, eval_set.pair_prompt_ids, eval_set.pair_chosen_ids, pad)
    rejected = sequence_logps(policy, eval_set.pair_prompt_ids, eval_set.pair_rejected_ids, pad)
    margin = beta * ((chosen - np.array(eval_set.ref_chosen_logps)) - (rejected - np.array(eval_set.ref_rejected_logps)))
    pair_family = np.array(eval_set.pair_families)

    def summary(sample_mask: np.ndarray, all_mask: np.ndarray, pair_mask: np.ndarray) -> dict[str, float]:
        return {
            "reward": float(rewards[sample_mask].mean()) if sample_mask.any() else math.nan,
            "reward_se": float(rewards[sample_mask].std(ddof=1) / math.sqrt(sample_mask.sum())) if sample_mask.sum() > 1 else math.nan,
            "kl": float(log_ratio[sample_mask].mean()) if sample_mask.any() else math.nan,
            "accuracy": float((margin[pair_mask] > 0).mean()) if pair_mask.any() else math.nan,
            "margin": float(margin[pair_mask].mean()) if pair_mask.any() else math.nan,
            "unfinished": float(1 - sample_mask.sum() / max(1, all_mask.sum())),
            "samples": int(sample_mask.sum()),
            "pairs": int(pair_mask.sum()),
        }

    out = {"all": summary(np.ones(len(done), bool), np.ones(len(samples), bool), np.ones(len(margin), bool))}
    for fam in PROMPT_FAMILIES:
        if (all_family == fam).any() or (pair_family == fam).any():
            out[fam] = summary(sample_family == fam, all_family == fam, pair_family == fam)
    # a few generations per template, for the report: the first sample of the first prompts
    examples: list[dict[str, Any]] = []
    per_template: dict[str, int] = {}
    for position, j in enumerate(done):
        i = sample_prompt[j]
        template = eval_set.prompt_templates[i]
        if j % k == 0 and per_template.get(template, 0) < 2:
            per_template[template] = per_template.get(template, 0) + 1
            response = tokenizer.decode(completions[position][:-1])
            examples.append({"prompt": eval_set.prompts[i], "response": response, "reward": float(rewards[position])})
    out["examples"] = examples
    return out


# ----------------------------------------------------------------------------------------
# Training with checkpoint evaluations
# ----------------------------------------------------------------------------------------


def say(message: str) -> None:
    """Print a progress line without breaking an active progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(message)
    sys.stdout.flush()


class CheckpointEvaluator(TrainerCallback):
    """Evaluates the policy at step 0 (``on_train_begin``) and after each step in ``steps``.

    ``evaluate(model) -> dict`` must leave the model's mode and the global random state as
    it found them (``evaluate_policy`` does), so evaluations do not change the training."""

    def __init__(self, steps: list[int], evaluate: Callable[[torch.nn.Module], dict], log=say, label: str = ""):
        self.steps = set(steps)
        self.evaluate = evaluate
        self.log = log
        self.label = label
        self.records: list[dict[str, Any]] = []

    def _record(self, step: int, model: torch.nn.Module) -> None:
        start = time.perf_counter()
        metrics = self.evaluate(model)
        self.records.append({"step": step, **metrics, "seconds": time.perf_counter() - start})
        m = metrics["all"]
        self.log(
            f"    {self.label} step {step:>4}: reward {m['reward']:+.3f}  KL {m['kl']:6.3f}  "
            f"accuracy {m['accuracy']:.3f}  ({time.perf_counter() - start:.0f}s eval)"
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if 0 in self.steps:
            self._record(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            self._record(state.global_step, model)


def quiet_trainer_output(trainer, progress_bar: bool) -> None:
    """Keep the Trainer's progress bar but not its printed log dicts (the checkpoint lines say more)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

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
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mallowspo.world.paths import WorldPaths

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
        from mallowspo.config import MallowsPOConfig

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
        import datasets

        return datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])

    def dispersion(self) -> dict[str, Any]:
        """The trainer's entropy estimate of -log phi(x) on the whole train set (the mix),
        library defaults (one reference pass, cached); sets ``phi_star``."""
        from transformers import AutoModelForCausalLM

        from mallowspo.trainer import MallowsPOTrainer

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

    def train_one(self, spec: RunSpec) -> dict[str, Any]:
        """Train one method from the base model and evaluate it at ``config.eval_steps()``."""
        from transformers import AutoModelForCausalLM

        from mallowspo.trainer import MallowsPOTrainer

        c = self.config
        name = c.run_name(spec.seed, spec.beta, spec.method)
        # A family run keeps the phi* fitted on the mix (see the module docstring).
        normalization = "mean" if c.family == "mix" or self.phi_star is None else self.phi_star
        args = self.trainer_args(
            self.out_dir / "runs" / name, METHODS[spec.method]["mallows"], spec.beta, spec.seed, c.max_steps,
            dispersion_normalization=normalization,
        )  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(self.world.model_dir, dtype=torch.float32)

        def evaluate(policy: torch.nn.Module) -> dict:
            return evaluate_policy(policy, self.reference, self.eval_set, self.tokenizer, c, spec.seed, spec.beta)

        callback = CheckpointEvaluator(c.eval_steps(), evaluate, self.log, label=f"{LABELS[spec.method]:>15}")
        start = time.perf_counter()
        trainer = MallowsPOTrainer(
            model, args=args, train_dataset=self._dataset(self.train_rows), processing_class=self.tokenizer,
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


# ----------------------------------------------------------------------------------------
# Running the grid
# ----------------------------------------------------------------------------------------

_WORKER: WorldRunner | None = None


def _worker_init(config: ControllableConfig, world_root: str, out_dir: str, phi_star: float) -> None:
    from transformers.utils import logging as hf_logging

    global _WORKER
    torch.set_num_threads(config.num_threads)
    hf_logging.disable_progress_bar()
    _WORKER = WorldRunner(config, world_root, out_dir, log=say)
    _WORKER.phi_star = phi_star


def _worker_run(spec: RunSpec) -> dict[str, Any]:
    assert _WORKER is not None
    return _WORKER.train_one(spec)


def run_specs(config: ControllableConfig) -> list[RunSpec]:
    """Seed-major order, so an interrupted grid still has whole seeds."""
    return [RunSpec(s, b, m) for s in config.seeds for b in config.betas for m in config.methods]


def run_controllable(
    config: ControllableConfig, out_dir: str | Path, world_root: str | Path | None = None, jobs: int = 1, log=say
) -> dict[str, Any]:
    """The whole experiment: world, dispersion, every (seed, beta, method) run, summaries.

    Returns the results dict (``write_outputs`` writes it and the report). ``jobs`` > 1
    trains that many runs at a time in worker processes (each with ``num_threads``)."""
    from mallowspo.world.paths import ensure_world

    from transformers.utils import logging as hf_logging

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
        summary = dispersion_summary(dispersion)
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
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

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
        facts["chosen_reward_higher"] = {k: v.get("chosen_reward_higher") for k, v in report.get("by_family", {}).items()}
    return facts


# ----------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------


def mean_ci(values: list[float], level: float = 0.95) -> dict[str, Any]:
    """Mean and the two-sided t-interval over ``values`` (seeds); no interval for one value."""
    from scipy.stats import t as student_t

    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0, "values": []}
    mean = float(x.mean())
    if n == 1:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": 1, "values": x.tolist()}
    half = float(student_t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "values": x.tolist()}


def value_at_kl(checkpoints: list[dict[str, Any]], kl: float, metric: str = "reward", scope: str = "all") -> float:
    """``metric`` interpolated along a training curve at the first point where its KL reaches ``kl``."""
    points = [(c[scope]["kl"], c[scope][metric]) for c in checkpoints if scope in c]
    for (k0, v0), (k1, v1) in zip(points, points[1:]):
        if k0 <= kl <= k1 or k1 <= kl <= k0:
            return v0 if k1 == k0 else v0 + (v1 - v0) * (kl - k0) / (k1 - k0)
    return math.nan


def dispersion_summary(dispersion: dict[str, Any]) -> dict[str, Any]:
    from scipy.stats import spearmanr

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


def summarize(config: ControllableConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per beta: each method's curve (mean over seeds per checkpoint) and final numbers with
    95% t-intervals over seeds; and the paired comparison with DPO at matched KL."""
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
                        k: mean_ci([r["checkpoints"][i][scope][k] for r in rs]) for k in (*METRICS, "unfinished", "reward_se")
                    }
                curve.append(point)
            entry["methods"][m] = {
                "label": LABELS[m],
                "seeds": [r["seed"] for r in rs],
                "curve": curve,
                "final": curve[-1],
                "base": curve[0],
                "train_loss_last": mean_ci([r["train_loss_last"] for r in rs]),
                "seconds": mean_ci([r["seconds"] for r in rs]),
            }
        entry["matched_kl"] = matched_kl_comparison(by_method, scopes)
        out[f"{beta:g}"] = entry
    return out


def matched_kl_comparison(by_method: dict[str, list[dict[str, Any]]], scopes: list[str]) -> dict[str, Any]:
    """Per seed and scope: K* = the smallest final KL among the methods; each method's
    reward and accuracy at K* on its own curve; the paired difference to DPO."""
    seeds = sorted(set.intersection(*(set(r["seed"] for r in rs) for rs in by_method.values())))
    out: dict[str, Any] = {}
    for scope in scopes:
        per_seed: dict[str, dict[str, list[float]]] = {m: {"reward": [], "accuracy": []} for m in by_method}
        kstars = []
        for seed in seeds:
            curves = {m: next(r for r in rs if r["seed"] == seed)["checkpoints"] for m, rs in by_method.items()}
            kstar = max(0.0, min(c[-1][scope]["kl"] for c in curves.values()))  # a sampled KL can be slightly < 0
            kstars.append(kstar)
            for m, c in curves.items():
                for metric in ("reward", "accuracy"):
                    per_seed[m][metric].append(value_at_kl(c, kstar, metric, scope))
        entry: dict[str, Any] = {"kl": mean_ci(kstars), "methods": {}}
        final = {m: {k: [next(r for r in rs if r["seed"] == s)["checkpoints"][-1][scope][k] for s in seeds] for k in ("reward", "kl")}
                 for m, rs in by_method.items()}  # fmt: skip
        for m in by_method:
            entry["methods"][m] = {metric: mean_ci(v) for metric, v in per_seed[m].items()}
            if m != "dpo" and "dpo" in by_method:
                paired = lambda a, b: mean_ci([x - y for x, y in zip(a, b)])  # noqa: E731
                entry["methods"][m]["reward_minus_dpo"] = paired(per_seed[m]["reward"], per_seed["dpo"]["reward"])
                entry["methods"][m]["final_reward_minus_dpo"] = paired(final[m]["reward"], final["dpo"]["reward"])
                entry["methods"][m]["final_kl_minus_dpo"] = paired(final[m]["kl"], final["dpo"]["kl"])
        out[scope] = entry
    return out


# ----------------------------------------------------------------------------------------
# Outputs: results.json, figures, report.md
# ----------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out, write and close ``fig``; returns the path."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return Path(path)


def _draw_curves(ax, entry: dict[str, Any], scope: str) -> None:
    for m, r in entry["methods"].items():
        kl = [p[scope]["kl"]["mean"] for p in r["curve"]]
        rw = [p[scope]["reward"]["mean"] for p in r["curve"]]
        lo = [p[scope]["reward"]["lo"] for p in r["curve"]]
        hi = [p[scope]["reward"]["hi"] for p in r["curve"]]
        ax.plot(kl, rw, "o-", ms=4, lw=1.5, color=COLORS[m], label=r["label"])
        if not any(math.isnan(x) for x in lo):
            ax.errorbar(kl, rw, yerr=[np.subtract(rw, lo), np.subtract(hi, rw)], fmt="none", ecolor=COLORS[m], alpha=0.5, capsize=2)
        ax.annotate(f"{r['curve'][-1]['step']}", (kl[-1], rw[-1]), fontsize=7, color=COLORS[m], xytext=(3, -9), textcoords="offset points")
    ax.set_xlabel("KL(pi || pi_ref), nats per response")
    ax.set_ylabel("mean true reward r* (VADER)")
    ax.grid(alpha=0.3)


def _seed_text(results: dict[str, Any]) -> str:
    n = len(results["config"]["seeds"])
    return "1 seed" if n == 1 else f"mean of {n} seeds, 95% t-interval"


def plot_reward_kl(results: dict[str, Any], path: str | Path, dpi: int = 120, scope: str = "all") -> Path:
    """Fig. 8c: reward against KL over training checkpoints, one curve per method, a panel per beta."""
    plt = _pyplot()
    betas = list(results["summary"])
    fig, axes = plt.subplots(1, len(betas), figsize=(5.2 * len(betas), 4), squeeze=False)
    for ax, beta in zip(axes[0], betas):
        _draw_curves(ax, results["summary"][beta], scope)
        ax.set_title(f"beta {beta}: held-out {results['config']['family']} prompts ({_seed_text(results)})", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
    return _save_figure(fig, path, dpi)


def plot_reward_kl_by_family(results: dict[str, Any], path: str | Path) -> Path:
    """The same curves with reward and KL restricted to each prompt family (rows: betas)."""
    plt = _pyplot()
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
    plt = _pyplot()
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
        ax.annotate(t, (s["true_neg_log_phi"], s["estimate_mean"]), fontsize=8, xytext=(6, 4), textcoords="offset points")
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
    plt = _pyplot()
    values = results["dispersion"]["values"]
    est, family = np.asarray(values["estimate"]), np.asarray(values["family"])
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    bins = np.linspace(est.min(), est.max(), 40) if np.ptp(est) > 0 else 10
    for f, color in zip(PROMPT_FAMILIES, ("tab:green", "tab:purple")):
        if (family == f).any():
            ax.hist(est[family == f], bins=bins, alpha=0.6, color=color, label=f"{f} (mean {est[family == f].mean():.2f})")
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


def load_results(out_dir: str | Path) -> dict[str, Any]:
    """results.json of ``out_dir``, its summary recomputed from the runs (so a report redrawn
    with a newer version of this module has that version's statistics)."""
    results = json.loads((Path(out_dir) / "results.json").read_text())
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in results["config"].items()}
    results["summary"] = summarize(ControllableConfig(**fields), results["runs"])
    return results


def _fmt(ci: dict[str, Any], digits: int = 3, signed: bool = False) -> str:
    if ci is None or ci.get("n", 0) == 0 or math.isnan(ci["mean"]):
        return "n/a"
    spec = f"{'+' if signed else ''}.{digits}f"
    text = format(ci["mean"], spec)
    if ci["n"] > 1:
        text += f" [{format(ci['lo'], spec)}, {format(ci['hi'], spec)}]"
    return text


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
                what = (f"a higher reward than DPO at equal KL ({kl:.2f} nats): {d:+.3f} ({c['noise']}), i.e. it "
                        "reaches DPO's reward at a lower KL")
            else:
                what = (f"a lower reward than DPO at equal KL ({kl:.2f} nats): {d:+.3f} ({c['noise']}), i.e. it "
                        "needs more KL than DPO for the same reward")
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
            lines.append("The paper's claim (MallowsPO-phi: same reward at a lower KL than DPO) is **contradicted** here.")
        else:
            lines.append("The paper's claim (MallowsPO-phi: same reward at a lower KL than DPO) is **not shown** here "
                         "(at some beta the reward difference at equal KL is within noise).")
    d = results["dispersion"]
    lines.append(
        f"The entropy estimate of -log phi(x) ranks prompts by their true dispersion with Spearman "
        f"{d['spearman']:.3f} over {len(d['values']['estimate'])} train pairs (closed {d['spearman_closed']:.2f}, "
        f"open {d['spearman_open']:.2f} within each family)."
    )
    return lines


def table_scopes(results: dict[str, Any]) -> list[str]:
    """"all" and each family; just "all" when the run has one family (the columns would repeat)."""
    scopes = scopes_of(results["runs"])
    return scopes if len(scopes) > 2 else ["all"]


def _final_table(results: dict[str, Any], beta: str) -> list[str]:
    entry = results["summary"][beta]
    scopes = table_scopes(results)
    header = ["method"] + [f"{k} ({s})" for s in scopes for k in ("reward", "KL", "accuracy")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    first = next(iter(entry["methods"].values()))
    base = ["base model (step 0)"] + [
        _fmt(first["base"][s][k], 3 if k != "kl" else 2) if k != "accuracy" else "-"
        for s in scopes for k in METRICS
    ]  # fmt: skip
    lines.append("| " + " | ".join(base) + " |")
    for m, r in entry["methods"].items():
        cells = [r["label"]] + [_fmt(r["final"][s][k], 2 if k == "kl" else 3) for s in scopes for k in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _fmt_diff(ci: dict[str, Any] | None, digits: int = 3) -> str:
    """A paired difference, with the number of seeds on each side of 0 when there are several."""
    text = _fmt(ci, digits, signed=True)
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
        cells = [scope, _fmt(matched["kl"], 2)] + [_fmt(matched["methods"][m]["reward"]) for m in methods]
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
        lines += [f"- `{e['prompt']}` -> `{e['response'].strip()}` (r* {e['reward']:+.2f})" for e in r["checkpoints"][-1]["examples"]]
        lines.append("")
    lines += [
        "Reproduce: `mallowspo demo --out DIR` (the single-seed demo) or `mallowspo experiment controllable` "
        "(see docs/controllable.md); every number above is in `results.json`.",
        "",
    ]
    return "\n".join(lines)
