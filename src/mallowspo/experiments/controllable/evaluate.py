"""Evaluation of a policy on held-out prompts of the world: reward, KL to the reference
and preference accuracy, overall and per prompt family, at the checkpoints of a training
run (``CheckpointEvaluator``)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from mallowspo.experiments.controllable.config import PROMPT_FAMILIES, ControllableConfig, stratified
from mallowspo.experiments.world.lm import sample_completions
from mallowspo.experiments.world.reward import sentiment_reward


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


# Scoring and sampling: plain forward passes; the policy's fused head is not used here.


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
    margin = beta * (
        (chosen - np.array(eval_set.ref_chosen_logps)) - (rejected - np.array(eval_set.ref_rejected_logps))
    )
    pair_family = np.array(eval_set.pair_families)

    def summary(sample_mask: np.ndarray, all_mask: np.ndarray, pair_mask: np.ndarray) -> dict[str, float]:
        return {
            "reward": float(rewards[sample_mask].mean()) if sample_mask.any() else math.nan,
            "reward_se": float(rewards[sample_mask].std(ddof=1) / math.sqrt(sample_mask.sum()))
            if sample_mask.sum() > 1
            else math.nan,
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


def say(message: str) -> None:
    """Print a progress line without breaking an active progress bar."""
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
