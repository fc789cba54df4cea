"""The prompts an annotator experiment scores: the built-in world's, or a pure Kendall Mallows
simulation's. Both give, per prompt, the true -log phi(x), up to ``max_annotators`` rankings of
its K responses, annotator 1's pair (top vs bottom), and the Hbar(x) of the entropy estimate.

World (``load_world``): the shipped pairs (``data/{split}.jsonl``) and lists
(``lists/{split}.jsonl``), the same prompts in the same order. The lists hold the world's M
annotators' rankings; annotators beyond them are drawn here from the Kendall model at the prompt's
true phi, centred on the list's ``central_ranking`` (or, without one, on the order of its
``scores``), from ``numpy.random.default_rng([seed, split index, prompt index])``. Hbar is eq. 11
of the reference model's mean per-token entropies on the pair (``base_*_entropy``), divided by
log V with V the world model's vocabulary.

Simulation (``simulate``): true -log phi ~ U[0, max_neg_log_phi], M rankings of K items around
the identity (``mallowspo.mallows.sample_kendall``); annotator 1's top and bottom are the pair, and Hbar as in the paper's Fig. 3
(``mallowspo.experiments.estimator_check``): the winner and loser entropies over
``entropy_samples`` further draws from the prompt's own model, divided by log K. That is the
entropy of a reference model that knows each prompt's ranking distribution, the best case of
the entropy proxy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from mallowspo.dispersion import normalized_entropy
from mallowspo.experiments.estimator_check import normalized_entropy as entropy_over_items
from mallowspo.experiments.estimator_check import winner_loser_distributions
from mallowspo.mallows import sample_kendall

SPLITS = ("train", "test")
FAMILIES = ("closed", "open")


@dataclass(frozen=True)
class AnnotatedPrompts:
    """N prompts with their truth and annotations.

    rankings[n] is (M, K_n): rankings[n][m, k] = the rank (0 = best) annotator m gives response k.
    chosen[n], rejected[n] index annotator 1's top and bottom response (the pair).
    family / template are "" for the simulation (it has neither).
    """

    name: str
    truth: NDArray[np.float64]  # (N,) true -log phi(x)
    family: NDArray[np.str_]  # (N,)
    template: NDArray[np.str_]  # (N,)
    rankings: list[NDArray[np.int64]]  # N x (M, K_n)
    chosen: NDArray[np.int64]  # (N,)
    rejected: NDArray[np.int64]  # (N,)
    hbar: NDArray[np.float64]  # (N,) Hbar(x) in [0, 1], eq. 11
    given_annotators: int  # annotators in the data; those beyond were drawn here
    shipped_votes_match: bool | None = None  # world: votes from the rankings == the pairs' votes column

    @property
    def size(self) -> NDArray[np.int64]:
        """(N,) K_n, the responses per prompt."""
        return np.array([r.shape[1] for r in self.rankings], dtype=np.int64)

    def votes(self, annotators: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """(agree, total) of the first ``annotators`` on the pair, for ``consensus="majority"``:
        agree = max(votes chosen above rejected, the rest), total = annotators."""
        first = [r[:annotators] for r in self.rankings]
        for_chosen = np.array([(r[:, c] < r[:, j]).sum() for r, c, j in zip(first, self.chosen, self.rejected)])
        total = np.full(len(first), annotators, dtype=np.int64)
        return np.maximum(for_chosen, total - for_chosen).astype(np.int64), total


def one_at_a_time(items: int, phi: float, annotators: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """(annotators, items) Kendall draws around the identity (``sample_kendall``), one annotator per
    call, so that the first m rows do not depend on how many are drawn: M = 10 has the same first
    10 annotators whether the largest M is 10 or 100."""
    return np.vstack([sample_kendall(items, phi, 1, rng) for _ in range(annotators)])


def _read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _by_response(center: NDArray[np.int64], ranks: NDArray[np.int64]) -> NDArray[np.int64]:
    """(D, K) ranks of the responses from (D, K) ranks of the central ranks 0..K-1, given
    ``center``, the response indices best first (as ``world.annotators.annotate_list``)."""
    out = np.empty_like(ranks)
    out[:, center] = ranks
    return out


def load_world(
    world_root: str | Path,
    split: str = "train",
    *,
    max_annotators: int,
    max_prompts: int | None = None,
    seed: int = 0,
) -> AnnotatedPrompts:
    """The world's ``split`` prompts with ``max_annotators`` annotators each (see the module doc)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(world_root)
    pairs_file, lists_file = root / "data" / f"{split}.jsonl", root / "lists" / f"{split}.jsonl"
    for path in (pairs_file, lists_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; redraw the world's data with `mallowspo world data`")
    vocab_size = json.loads((root / "model" / "config.json").read_text())["vocab_size"]
    pairs, lists = _read_jsonl(pairs_file), _read_jsonl(lists_file)
    if len(pairs) != len(lists) or any(p["prompt_id"] != q["prompt_id"] for p, q in zip(pairs, lists)):
        raise ValueError(f"{pairs_file} and {lists_file} do not hold the same prompts in the same order")
    if max_prompts is not None:
        pairs, lists = pairs[:max_prompts], lists[:max_prompts]
    given = min(len(q["annotator_rankings"]) for q in lists)
    rankings, chosen, rejected = [], [], []
    for n, (pair, row) in enumerate(zip(pairs, lists)):
        ranks = np.asarray(row["annotator_rankings"], dtype=np.int64)[:given]
        order = row["ranking"]  # annotator 1's response indices, best first: its pair
        if row["responses"][order[0]] != pair["chosen"] or row["responses"][order[-1]] != pair["rejected"]:
            raise ValueError(f"{lists_file} row {n}: its ranking's top and bottom are not the pair's chosen/rejected")
        extra = max_annotators - given
        if extra > 0:
            center = row.get("central_ranking")
            if center is None:  # mu0: best first by the true reward
                center = np.argsort(-np.asarray(row["scores"], dtype=np.float64), kind="stable")
            rng = np.random.default_rng([seed, SPLITS.index(split), n])
            drawn = one_at_a_time(ranks.shape[1], float(row["phi"]), extra, rng)
            ranks = np.vstack([ranks, _by_response(np.asarray(center, dtype=np.int64), drawn)])
        rankings.append(ranks[:max_annotators])
        chosen.append(order[0])
        rejected.append(order[-1])
    prompts = AnnotatedPrompts(
        name="world",
        truth=np.array([p["neg_log_phi"] for p in pairs], dtype=np.float64),
        family=np.array([p["family"] for p in pairs]),
        template=np.array([p["template"] for p in pairs]),
        rankings=rankings,
        chosen=np.array(chosen, dtype=np.int64),
        rejected=np.array(rejected, dtype=np.int64),
        hbar=normalized_entropy(
            torch.tensor([p["base_chosen_entropy"] for p in pairs], dtype=torch.float64),
            torch.tensor([p["base_rejected_entropy"] for p in pairs], dtype=torch.float64),
            vocab_size,
        ).numpy(),
        given_annotators=given,
    )
    shipped = [p.get("votes") for p in pairs]
    if all(v is not None and len(v) == given for v in shipped):
        first = [r[:given] for r in rankings]
        derived = [np.where(r[:, c] < r[:, j], 1, -1) for r, c, j in zip(first, prompts.chosen, prompts.rejected)]
        match = all(np.array_equal(d, v) for d, v in zip(derived, shipped))
        prompts = replace(prompts, shipped_votes_match=match)
    return prompts


def simulate(
    prompts: int,
    *,
    items: int = 4,
    max_annotators: int,
    max_neg_log_phi: float = 5.0,
    entropy_samples: int = 2000,
    seed: int = 0,
) -> AnnotatedPrompts:
    """``prompts`` simulated prompts (see the module doc). The truth comes from
    ``default_rng([seed, 0])``, prompt n's annotators from ``default_rng([seed, 1, n])`` and its
    entropy draws from ``default_rng([seed, 2, n])``: fewer prompts or annotators are a prefix."""
    if prompts < 3 or items < 2 or entropy_samples < 1 or not max_neg_log_phi > 0:
        raise ValueError(
            f"the simulation needs >= 3 prompts, >= 2 items, >= 1 entropy sample and a positive range, got "
            f"prompts={prompts}, items={items}, entropy_samples={entropy_samples}, max={max_neg_log_phi}"
        )
    truth = np.random.default_rng([seed, 0]).uniform(0.0, max_neg_log_phi, prompts)
    rankings, hbar = [], []
    for n, L in enumerate(truth):
        phi = math.exp(-L)
        rankings.append(one_at_a_time(items, phi, max_annotators, np.random.default_rng([seed, 1, n])))
        draws = sample_kendall(items, phi, entropy_samples, np.random.default_rng([seed, 2, n]))
        winners, losers = winner_loser_distributions(draws)
        hbar.append(0.5 * (entropy_over_items(winners) + entropy_over_items(losers)))
    first = np.stack([r[0] for r in rankings])
    return AnnotatedPrompts(
        name="simulation",
        truth=truth,
        family=np.full(prompts, ""),
        template=np.full(prompts, ""),
        rankings=rankings,
        chosen=first.argmin(axis=1),
        rejected=first.argmax(axis=1),
        hbar=np.array(hbar, dtype=np.float64),
        given_annotators=0,
    )
