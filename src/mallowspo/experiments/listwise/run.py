"""Running the listwise experiment: its arms (``ARMS``), the held-out lists and their ranking
metrics, the runner (``ListRunner``, the controllable experiment's ``WorldRunner`` trained on the
world's ranked lists), and the whole grid (``run_listwise``)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import AutoModelForCausalLM

from mallowspo.experiments.controllable.config import PROMPT_FAMILIES, ControllableConfig, read_rows, stratified
from mallowspo.experiments.controllable.config import select_family as family_rows
from mallowspo.experiments.controllable.evaluate import encode, say, sequence_logps
from mallowspo.experiments.controllable.run import RunSpec, WorldRunner, run_specs, train_grid, world_facts
from mallowspo.experiments.controllable.stats import dispersion_vs_truth, summarize
from mallowspo.experiments.world.ensure import ensure_world
from mallowspo.training.trainer import MallowsPOTrainer

# Each arm: the MallowsPOConfig keys that make it, on one loader of the world's lists.
ARMS: dict[str, dict[str, Any]] = {
    "dpo": {"objective": "pairwise", "binarize": "best_worst", "mallows": "none"},
    "dpo_all_pairs": {"objective": "all_pairs", "mallows": "none"},
    "plackett_luce": {"objective": "plackett_luce", "mallows": "none"},
    "theta_pl": {"objective": "plackett_luce", "mallows": "theta"},
    "phi_all_pairs": {"objective": "all_pairs", "mallows": "phi"},
}
ARM_LABELS = {
    "dpo": "DPO best-vs-worst",
    "dpo_all_pairs": "DPO all pairs",
    "plackett_luce": "Plackett-Luce",
    "theta_pl": "MallowsPO-theta + PL",
    "phi_all_pairs": "MallowsPO-phi all pairs",
}
ARM_COLORS = {
    "dpo": "black",
    "dpo_all_pairs": "tab:gray",
    "plackett_luce": "tab:green",
    "theta_pl": "tab:blue",
    "phi_all_pairs": "tab:orange",
}
# reward, KL and pair accuracy as in the controllable experiment; the Kendall taus on held-out lists
LIST_METRICS = ("reward", "kl", "accuracy", "kendall_tau", "kendall_tau_true")


@dataclass(frozen=True)
class ListwiseConfig(ControllableConfig):
    """A controllable experiment (same budget and sampled evaluation) whose methods are ``ARMS``,
    trained on the world's lists, plus the held-out lists scored by Kendall's tau."""

    methods: tuple[str, ...] = tuple(ARMS)
    eval_lists: int | None = None  # held-out lists for the Kendall taus (None: all of the family)

    def known_methods(self) -> tuple[str, ...]:
        return tuple(ARMS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_lists is not None and self.eval_lists < 1:
            raise ValueError(f"eval_lists must be >= 1, got {self.eval_lists}")


def kendall_tau(rewards: np.ndarray, order: np.ndarray) -> float:
    """Kendall's tau between the reward order and an observed order: the mean over the pairs
    (i, j) with ``order[i] > order[j]`` (i preferred; equal values tie and give no pair) of
    sign(r_i - r_j). NaN without any untied pair."""
    better = order[:, None] > order[None, :]
    if not better.any():
        return math.nan
    return float(np.sign(rewards[:, None] - rewards[None, :])[better].mean())


@dataclass
class HeldOutLists:
    """Held-out lists: each response's tokens, the observed ranking and the true rewards."""

    families: list[str]
    sizes: list[int]
    prompt_ids: list[list[int]]  # one per response, the list's prompt repeated
    response_ids: list[list[int]]  # the responses of all lists back to back, each ending in EOS
    preference: list[np.ndarray]  # per list (K,): higher = preferred (minus the observed rank)
    true_scores: list[np.ndarray]  # per list (K,): the world's true reward of each response
    ref_logps: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (sum K,)


def build_heldout_lists(rows: list[dict[str, Any]], tokenizer) -> HeldOutLists:
    """Tokenised as the trainer tokenises standard text: prompt ids, then response ids and EOS."""
    eos = tokenizer.eos_token_id
    prompts, responses, preference, scores = [], [], [], []
    for r in rows:
        prompt = encode(tokenizer, r["prompt"])
        prompts += [prompt] * len(r["responses"])
        responses += [encode(tokenizer, y) + [eos] for y in r["responses"]]
        ranks = np.empty(len(r["ranking"]), np.int64)
        ranks[np.asarray(r["ranking"])] = np.arange(len(r["ranking"]))
        preference.append(-ranks.astype(np.float64))
        scores.append(np.asarray(r["scores"], np.float64))
    return HeldOutLists(
        families=[r["family"] for r in rows],
        sizes=[len(r["responses"]) for r in rows],
        prompt_ids=prompts,
        response_ids=responses,
        preference=preference,
        true_scores=scores,
    )


def ranking_metrics(policy_logps: np.ndarray, heldout: HeldOutLists, beta: float) -> dict[str, dict[str, float]]:
    """Per scope (all and each family): the mean over lists of Kendall's tau between the implicit
    rewards beta (log pi - log pi_ref) and the observed ranking, and the true rewards' order."""
    rewards = beta * (policy_logps - heldout.ref_logps)
    bounds = np.cumsum([0, *heldout.sizes])
    observed, true = [], []
    for n in range(len(heldout.sizes)):
        r = rewards[bounds[n] : bounds[n + 1]]
        observed.append(kendall_tau(r, heldout.preference[n]))
        true.append(kendall_tau(r, heldout.true_scores[n]))
    family = np.asarray(heldout.families)
    observed, true = np.asarray(observed), np.asarray(true)

    def scope(mask: np.ndarray) -> dict[str, float]:
        return {
            "kendall_tau": float(np.nanmean(observed[mask])),
            "kendall_tau_true": float(np.nanmean(true[mask])),
            "lists": int(mask.sum()),
        }

    out = {"all": scope(np.ones(len(family), bool))}
    out.update({f: scope(family == f) for f in PROMPT_FAMILIES if (family == f).any()})
    return out


class ListRunner(WorldRunner):
    """The controllable runner on the world's ranked lists: every arm reads the same train lists
    (the prompts of the controllable experiment's pairs, in the same order) through the trainer's
    list loader, and every checkpoint is also scored on the held-out lists."""

    def __init__(self, config: ListwiseConfig, world_root, out_dir, log=say):
        super().__init__(config, world_root, out_dir, log=log)
        if not self.world.has_lists():
            raise FileNotFoundError(
                f"{self.world.lists_dir} has no train.jsonl and test.jsonl; redraw the world's data with "
                "`mallowspo world data`"
            )
        self.all_train_lists = read_rows(self.world.train_lists_file)
        by_prompt = {r["prompt_id"]: r for r in self.all_train_lists}
        if len(by_prompt) != len(self.all_train_lists) or any(
            r["prompt_id"] not in by_prompt for r in self.train_rows
        ):
            raise ValueError(f"{self.world.train_lists_file} does not hold each train pair's prompt exactly once")
        self.train_lists = [by_prompt[r["prompt_id"]] for r in self.train_rows]
        test = family_rows(read_rows(self.world.test_lists_file), config.family)
        self.heldout = build_heldout_lists(stratified(test, config.eval_lists), self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.heldout.ref_logps = sequence_logps(
            self.reference, self.heldout.prompt_ids, self.heldout.response_ids, pad
        )

    def _dataset(self, rows: list[dict[str, Any]]):
        return datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "responses", "ranking")} for r in rows])

    def train_dataset(self):
        return self._dataset(self.train_lists)

    def method_args(self, spec: RunSpec) -> dict[str, Any]:
        return dict(ARMS[spec.method])

    def label(self, spec: RunSpec) -> str:
        return ARM_LABELS[spec.method]

    def evaluate(self, policy: torch.nn.Module, spec: RunSpec) -> dict[str, Any]:
        out = super().evaluate(policy, spec)
        pad = self.tokenizer.pad_token_id
        logps = sequence_logps(policy, self.heldout.prompt_ids, self.heldout.response_ids, pad)
        for scope, values in ranking_metrics(logps, self.heldout, spec.beta).items():
            out.setdefault(scope, {}).update(values)
        return out

    def dispersion(self) -> dict[str, Any]:
        """The trainer's entropy estimate of -log phi(x) over the K responses of every train list
        (the mix), library defaults; sets ``phi_star`` (kept by the runs on one family)."""
        model = AutoModelForCausalLM.from_pretrained(self.world.model_dir, dtype=torch.float32)
        args = self.trainer_args(self.out_dir / "dispersion", "phi", 0.1, 0, 1, objective="all_pairs")
        trainer = MallowsPOTrainer(
            model, args=args, train_dataset=self._dataset(self.all_train_lists), processing_class=self.tokenizer
        )
        data = trainer.train_dataset
        rows = [self.all_train_lists[i] for i in data["row_index"]]
        self.phi_star = float(trainer.phi_star)
        return {
            "phi_star": self.phi_star,
            "estimate": [float(x) for x in data["neg_log_phi"]],
            "hbar": [float(x) for x in data["hbar"]],
            "true_neg_log_phi": [float(r["neg_log_phi"]) for r in rows],
            "family": [r["family"] for r in rows],
            "template": [r["template"] for r in rows],
            "sizes": [len(r["responses"]) for r in rows],
        }


def summarize_listwise(config: ListwiseConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The controllable summary with the Kendall taus: curves, finals, and every metric at matched KL."""
    return summarize(config, runs, metrics=LIST_METRICS, labels=ARM_LABELS)


def run_listwise(config: ListwiseConfig, out_dir, world_root=None, jobs: int = 1, log=say) -> dict[str, Any]:
    """World, the list dispersion, every (seed, beta, arm) run, the summary (``write_outputs`` writes them).
    Each finished run is appended to ``out_dir/runs.jsonl`` at once, so a stopped grid keeps its runs."""
    from transformers.utils import logging as hf_logging

    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    hf_logging.disable_progress_bar()
    try:
        world = ensure_world(world_root, log=log)
        runner = ListRunner(config, world.root, out, log=log)
        dispersion = runner.dispersion()
        summary = dispersion_vs_truth(dispersion)
        log(
            f"[dispersion] {len(dispersion['estimate'])} train lists, phi* {dispersion['phi_star']:.3f}, "
            f"Spearman(estimate, true -log phi) {summary['spearman']:.3f}"
        )
        specs = run_specs(config)
        log(
            f"[runs] {len(specs)} runs on {len(runner.train_lists)} {config.family} lists, {config.max_steps} steps "
            f"of {config.batch_size} prompts; {len(runner.heldout.sizes)} held-out lists"
        )
        runs = train_grid(runner, specs, jobs, world.root, out, log)
    finally:
        torch.set_num_threads(previous_threads)
    sizes = np.asarray(dispersion["sizes"])
    return {
        "config": asdict(config),
        "jobs": jobs,
        "world": world_facts(world),
        "train_lists": len(runner.train_lists),
        "train_sequences": int(sum(len(r["responses"]) for r in runner.train_lists)),
        "eval_prompts": len(runner.eval_set.prompts),
        "eval_pairs": len(runner.eval_set.pair_families),
        "eval_lists": len(runner.heldout.sizes),
        "list_sizes": {str(k): int((sizes == k).sum()) for k in sorted(set(sizes.tolist()))},
        "dispersion": {**summary, "values": dispersion},
        "runs": runs,
        "summary": summarize_listwise(config, runs),
        "seconds": time.perf_counter() - start,
    }
