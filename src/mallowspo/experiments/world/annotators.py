"""Simulated annotators whose rankings follow a Kendall Mallows model (paper §3.1-3.2).

For a prompt x with K responses:

1. The central ranking mu0(.|x) orders the responses by the ground-truth reward r*(x, y),
   best first (ties broken uniformly at random, seeded).
2. An annotator's ranking is one draw from the Kendall Mallows model centred on mu0 with
   the prompt's dispersion phi(x) (``mallowspo.mallows.sample_kendall``): phi -> 0 means
   every annotator returns mu0, phi = 1 means rankings are uniformly random.
3. The preference pair is the annotator's top response (chosen) against the annotator's
   bottom response (rejected), as in the paper's Fig. 3 check and its UltraFeedback setup
   ("best vs worst"). With K = 2 this is simply the annotator's preference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from mallowspo.mallows import sample_kendall


def central_order(rewards: ArrayLike, rng: np.random.Generator) -> NDArray[np.int64]:
    """Response indices best-first by reward: out[c] is the response at central rank c.

    Ties are broken uniformly at random (a random permutation, then a stable sort).
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    shuffled = rng.permutation(len(rewards))
    return shuffled[np.argsort(-rewards[shuffled], kind="stable")]


def annotator_ranks(n: int, phi: float, size: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """(size, n) annotator ranks of the items at central ranks 0..n-1 (0 = annotator's best)."""
    return sample_kendall(n, phi, size, rng)


@dataclass(frozen=True)
class AnnotatedPair:
    """One annotator's verdict on K responses, reduced to a chosen/rejected pair.

    Indices refer to the list of responses; central ranks are positions in mu0 (0 = best).
    """

    chosen: int
    rejected: int
    chosen_central_rank: int
    rejected_central_rank: int
    annotator_ranking: tuple[int, ...]  # response indices, annotator's best first


def annotate(rewards: ArrayLike, phi: float, rng: np.random.Generator) -> AnnotatedPair:
    """Rank ``rewards``' responses by one Mallows annotator; return its top vs bottom pair."""
    rewards = np.asarray(rewards, dtype=np.float64)
    n = len(rewards)
    if n < 2:
        raise ValueError(f"an annotated pair needs at least 2 responses, got {n}")
    order = central_order(rewards, rng)  # central rank -> response index
    ranks = annotator_ranks(n, phi, 1, rng)[0]  # central rank -> annotator rank
    by_annotator = np.argsort(ranks)  # annotator rank -> central rank
    top, bottom = int(by_annotator[0]), int(by_annotator[-1])
    return AnnotatedPair(
        chosen=int(order[top]),
        rejected=int(order[bottom]),
        chosen_central_rank=top,
        rejected_central_rank=bottom,
        annotator_ranking=tuple(int(order[c]) for c in by_annotator),
    )
