"""Preference data of the built-in world, made the way the paper models it (§3.2).

For every prompt x of the world:

1. draw ``samples_per_prompt`` responses from the base model (ancestral sampling at
   temperature 1) and keep the first ``responses_per_prompt`` distinct finished ones
   (K; a closed prompt often has fewer distinct answers, and a prompt with fewer than 2
   is skipped);
2. score them with the ground-truth reward r*(x, y) (``reward.py``);
3. let one simulated annotator rank them by a Kendall Mallows model centred on the reward
   order with the prompt's true phi(x), and keep the annotator's top vs bottom response
   as chosen vs rejected (``annotators.py``);
4. let annotators 2..M (``annotators_per_prompt``, default 5) rank the same responses,
   drawn from a generator of their own: they vote on the pair, whose label stays the
   first annotator's, and their rankings go with the list.

Rows are written in TRL's standard preference format (``prompt``/``chosen``/``rejected``)
with extra columns holding the truth, so the dispersion estimate can be checked:
``prompt_id, split, family, template, phi, neg_log_phi, chosen_reward, rejected_reward,
chosen_central_rank, rejected_central_rank, n_responses, base_chosen_entropy,
base_rejected_entropy`` (the base model's mean per-token entropy of the response + end
token, nats), and the annotators' ``chosen_votes, rejected_votes, votes`` (1 = prefers
chosen, -1 = prefers rejected; annotator 1 first). The lists (``lists/``) hold every prompt's
K responses: ``prompt, responses, ranking`` (annotator 1's, best first), ``scores`` (the
rewards), the same truth columns, ``central_ranking`` (mu0) and ``annotator_rankings``
(M x K ranks, 0 = best). Train rows come from the base model's training titles,
test rows from held-out titles. Deterministic under ``WorldDataConfig.seed`` for a given
model, machine and torch build.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from transformers import AutoModelForCausalLM, AutoTokenizer

from mallowspo.dispersion import estimate_neg_log_phi, normalized_entropy
from mallowspo.experiments.world.annotators import annotate_list, check_annotators
from mallowspo.experiments.world.build import load_world_config
from mallowspo.experiments.world.corpus import (
    FAMILIES,
    TEMPLATES,
    TEMPLATES_BY_NAME,
    Prompt,
    closed_answer_is_correct,
    make_prompts,
)
from mallowspo.experiments.world.lm import completion_statistics, sample_responses
from mallowspo.experiments.world.paths import WorldPaths
from mallowspo.experiments.world.reward import sentiment_rewards


@dataclass(frozen=True)
class WorldDataConfig:
    """How the preference data is drawn from a built world."""

    seed: int = 0
    responses_per_prompt: int = 4  # K, the responses one annotator ranks
    samples_per_prompt: int = 8  # draws from the base model to find K distinct ones
    max_new_tokens: int = 48
    batch_size: int = 32  # prompts per generation batch
    num_threads: int = 1
    annotators_per_prompt: int = 5  # M, annotators ranking each prompt's K responses; the label is the first's

    def __post_init__(self):
        check_annotators(self.annotators_per_prompt)


def _distinct(samples: list[str | None], k: int) -> list[str]:
    seen: list[str] = []
    for s in samples:
        if s is not None and s.strip() and s not in seen:
            seen.append(s)
        if len(seen) == k:
            break
    return seen


def _mean(values) -> float:
    values = list(values)
    return float(statistics.fmean(values)) if values else float("nan")


def generate_preference_data(
    root: str | Path,
    config: WorldDataConfig = WorldDataConfig(),
    log=print,
    out_dir: str | Path | None = None,
    lists_dir: str | Path | None = None,
) -> dict:
    """Draw the data from the world built at ``root``; return the report.

    Writes the pairs ``train.jsonl``, ``test.jsonl`` and ``report.json`` to ``out_dir``
    (default: the world's ``data/``) and the lists ``train.jsonl``, ``test.jsonl`` to
    ``lists_dir`` (default: the world's ``lists/``; with ``out_dir`` given, ``<out_dir>-lists``
    beside it). The lists never go inside the pairs' directory: `datasets` would read every
    train*/test* file under it into that split, and the directory would no longer load as pairs."""
    start, start_cpu = time.perf_counter(), time.process_time()
    paths = WorldPaths(Path(root))
    out_dir = Path(out_dir) if out_dir is not None else paths.data_dir
    if lists_dir is None:
        lists_dir = paths.lists_dir if out_dir == paths.data_dir else out_dir.with_name(out_dir.name + "-lists")
    lists_dir = Path(lists_dir)
    world = load_world_config(paths.root)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        tokenizer = AutoTokenizer.from_pretrained(paths.model_dir)
        model = AutoModelForCausalLM.from_pretrained(paths.model_dir)
        vocab_size = model.config.vocab_size
        prompts = make_prompts(world.seed, world.test_fraction, world.max_titles)

        samples = sample_responses(
            model, tokenizer, [p.text for p in prompts], config.samples_per_prompt,
            config.max_new_tokens, config.seed, config.batch_size,
        )  # fmt: skip
        sampling_seconds = time.perf_counter() - start
        finished = [[s for s in row if s is not None] for row in samples]
        flat = [(p.text, s) for p, row in zip(prompts, finished) for s in row]
        stats = completion_statistics(model, tokenizer, [f[0] for f in flat], [f[1] for f in flat])
        entropy_of = dict(zip(flat, stats["mean_entropy"].tolist()))
    finally:
        torch.set_num_threads(previous_threads)

    rows: list[dict] = []
    lists: list[dict] = []
    skipped: list[str] = []
    for index, (prompt, row_samples) in enumerate(zip(prompts, finished)):
        responses = _distinct(row_samples, config.responses_per_prompt)
        if len(responses) < 2:
            skipped.append(prompt.prompt_id)
            continue
        rewards = sentiment_rewards(responses)
        # Annotator 1 draws from the stream the pairs have always used, so that adding
        # annotators (drawn from their own stream) leaves every pair as it was.
        annotated = annotate_list(
            rewards, prompt.phi, config.annotators_per_prompt,
            np.random.default_rng([config.seed, index]), np.random.default_rng([config.seed, index, 1]),
        )  # fmt: skip
        pair, votes = annotated.pair, annotated.votes()
        chosen, rejected = responses[pair.chosen], responses[pair.rejected]
        truth = {
            "prompt_id": prompt.prompt_id,
            "split": prompt.split,
            "family": prompt.family,
            "template": prompt.template,
            "phi": prompt.phi,
            "neg_log_phi": TEMPLATES_BY_NAME[prompt.template].neg_log_phi,
        }
        rows.append(
            {
                "prompt": prompt.text,
                "chosen": chosen,
                "rejected": rejected,
                **truth,
                "chosen_reward": rewards[pair.chosen],
                "rejected_reward": rewards[pair.rejected],
                "chosen_central_rank": pair.chosen_central_rank,
                "rejected_central_rank": pair.rejected_central_rank,
                "n_responses": len(responses),
                "base_chosen_entropy": entropy_of[(prompt.text, chosen)],
                "base_rejected_entropy": entropy_of[(prompt.text, rejected)],
                "chosen_votes": int((votes > 0).sum()),
                "rejected_votes": int((votes < 0).sum()),
                "votes": votes.tolist(),
            }
        )
        lists.append(
            {
                "prompt": prompt.text,
                "responses": responses,
                "ranking": list(pair.annotator_ranking),
                "scores": rewards,
                **truth,
                "central_ranking": list(pair.central_ranking),
                "annotator_rankings": annotated.rankings.tolist(),
            }
        )

    for directory, records in ((out_dir, rows), (lists_dir, lists)):
        directory.mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            with open(directory / f"{split}.jsonl", "w") as f:
                for r in records:
                    if r["split"] == split:
                        f.write(json.dumps(r) + "\n")

    max_k = max((len(r["responses"]) for r in lists), default=2)
    report = {
        "data_config": dataclasses.asdict(config),
        "world_seed": world.seed,
        "rows": {s: sum(r["split"] == s for r in rows) for s in ("train", "test")},
        "skipped_prompts": len(skipped),
        "unfinished_samples": sum(s is None for row in samples for s in row),
        "pair_rule": "annotator top vs annotator bottom",
        "lists": {s: sum(r["split"] == s for r in lists) for s in ("train", "test")},
        "list_lengths": {str(k): sum(len(r["responses"]) == k for r in lists) for k in range(2, max_k + 1)},
        "annotators": annotator_check(rows, lists, config.annotators_per_prompt),
        "seconds": {
            "sampling": sampling_seconds,
            "total": time.perf_counter() - start,
            "total_cpu": time.process_time() - start_cpu,  # wall time inflates on a shared machine
        },
        **dispersion_check(prompts, finished, rows, entropy_of, vocab_size),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(
        f"{report['rows']['train']} train / {report['rows']['test']} test pairs in {out_dir}, lists in {lists_dir} "
        f"({report['seconds']['total']:.0f}s); mean entropy closed "
        f"{report['by_family']['closed']['sample_entropy']:.3f} vs open "
        f"{report['by_family']['open']['sample_entropy']:.3f} nats/token; "
        f"estimate vs true -log phi: Spearman {report['estimator']['spearman']:.2f}"
    )
    return report


def annotator_check(rows: list[dict], lists: list[dict], annotators: int) -> dict:
    """How the M annotators agree, over all rows (train and test), per family and template.

    majority_agrees_with_label: share of pairs where more than M/2 annotators prefer the
    label's chosen (the label is annotator 1's, who always does); vote_agreement: mean share
    of the M annotators who do; vote_agreement_others: the same among annotators 2..M (None
    when M = 1); unanimous: share of pairs all M annotators agree on; adjacent_agreement:
    share of (annotator, pair of responses adjacent in mu0) ordered as mu0 orders them, which
    the Kendall model puts at 1/(1 + phi) (``adjacent_expected``, per template)."""

    def summary(pairs: list[dict], ranked: list[dict]) -> dict:
        agree = [r["chosen_votes"] for r in pairs]
        adjacent = [
            m[c] < m[d]
            for r in ranked
            for m in r["annotator_rankings"]
            for c, d in zip(r["central_ranking"], r["central_ranking"][1:])
        ]
        others = _mean((v - 1) / (annotators - 1) for v in agree) if annotators > 1 else None
        return {
            "pairs": len(pairs),
            "majority_agrees_with_label": _mean(v > annotators / 2 for v in agree),
            "vote_agreement": _mean(v / annotators for v in agree),
            "vote_agreement_others": others,
            "unanimous": _mean(v == annotators for v in agree),
            "adjacent_agreement": _mean(adjacent),
        }

    by_template = {
        t.name: {
            "family": t.family,
            "phi": t.phi,
            **summary([r for r in rows if r["template"] == t.name], [r for r in lists if r["template"] == t.name]),
            "adjacent_expected": 1 / (1 + t.phi),
        }
        for t in TEMPLATES
    }
    by_family = {
        fam: summary([r for r in rows if r["family"] == fam], [r for r in lists if r["family"] == fam])
        for fam in FAMILIES
    }
    return {
        "per_prompt": annotators,
        "label": "first annotator (its top vs bottom, as with one annotator); the others only vote",
        "streams": "annotator 1: default_rng([seed, prompt index]); annotators 2..M: default_rng([seed, prompt index, 1])",
        "by_family": by_family,
        "by_template": by_template,
    }


def dispersion_check(
    prompts: list[Prompt], finished: list[list[str]], rows: list[dict], entropy_of: dict, vocab_size: int
) -> dict:
    """Per template and family: the base model's entropy on its samples, the reward spread,
    how often the annotators' choice agrees with the reward; and the entropy estimate of
    -log phi(x) (eqs. 10-11, phi* normalised to mean 1 on the train rows) against the truth."""
    by_template = {}
    for t in TEMPLATES:
        t_prompts = [(p, s) for p, s in zip(prompts, finished) if p.template == t.name]
        t_rows = [r for r in rows if r["template"] == t.name]
        sample_rewards = sentiment_rewards(x for _, s in t_prompts for x in s)
        entry = {
            "family": t.family,
            "phi": t.phi,
            "neg_log_phi": t.neg_log_phi,
            "prompts": len(t_prompts),
            "sample_entropy": _mean(entropy_of[(p.text, x)] for p, s in t_prompts for x in s),
            "sample_reward_mean": _mean(sample_rewards),
            "sample_reward_std": float(np.std(sample_rewards)) if sample_rewards else float("nan"),
            "distinct_responses_mean": _mean(r["n_responses"] for r in t_rows),
            "chosen_reward_higher": _mean(r["chosen_reward"] > r["rejected_reward"] for r in t_rows),
            "reward_tie": _mean(r["chosen_reward"] == r["rejected_reward"] for r in t_rows),
        }
        if t.family == "closed":
            for split in ("train", "test"):
                entry[f"answer_correct_{split}"] = _mean(
                    closed_answer_is_correct(p, x) for p, s in t_prompts if p.split == split for x in s
                )
        by_template[t.name] = entry
    by_family = {
        fam: {
            "sample_entropy": _mean(
                entropy_of[(p.text, x)] for p, s in zip(prompts, finished) if p.family == fam for x in s
            ),
            "chosen_reward_higher": _mean(
                r["chosen_reward"] > r["rejected_reward"] for r in rows if r["family"] == fam
            ),
        }
        for fam in FAMILIES
    }

    train = [r for r in rows if r["split"] == "train"]
    hbar = normalized_entropy(
        torch.tensor([r["base_chosen_entropy"] for r in train], dtype=torch.float64),
        torch.tensor([r["base_rejected_entropy"] for r in train], dtype=torch.float64),
        vocab_size,
    )
    estimate, phi_star = estimate_neg_log_phi(hbar, "mean")
    truth = np.array([r["neg_log_phi"] for r in train])
    est = estimate.numpy()
    families = np.array([r["family"] for r in train])

    def rho(mask) -> float:
        return float(spearmanr(est[mask], truth[mask]).statistic) if len(set(truth[mask])) > 1 else float("nan")

    for t in TEMPLATES:
        mask = np.array([r["template"] == t.name for r in train])
        by_template[t.name]["estimate_mean"] = float(est[mask].mean()) if mask.any() else float("nan")
        by_template[t.name]["hbar_mean"] = float(hbar.numpy()[mask].mean()) if mask.any() else float("nan")
    estimator = {
        "rows": len(train),
        "phi_star": phi_star,
        "spearman": rho(np.ones(len(train), bool)),
        **{f"spearman_{fam}": rho(families == fam) for fam in FAMILIES},
    }
    return {"by_family": by_family, "by_template": by_template, "estimator": estimator}
