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
4. Further annotators (``annotate_list``) rank the same K responses: independent draws from
   the same model, from a generator of their own, so that their number never changes the
   first annotator's draw and hence the pair. The pair's label stays the first annotator's;
   the others only vote.
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
    central_ranking: tuple[int, ...]  # response indices best first by reward: mu0


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
        central_ranking=tuple(int(i) for i in order),
    )


def check_annotators(annotators: int) -> int:
    """M, the number of annotators per prompt: an integer >= 1 (the one check of that setting)."""
    if isinstance(annotators, bool) or not isinstance(annotators, int | np.integer) or annotators < 1:
        raise ValueError(f"annotators per prompt must be an integer >= 1, got {annotators!r}")
    return int(annotators)


@dataclass(frozen=True)
class AnnotatedList:
    """M annotators' rankings of K responses, and the first annotator's pair.

    ``rankings[m, k]`` is the rank (0 = best) that annotator m gives response k; row 0 is the
    annotator whose top vs bottom is ``pair``.
    """

    pair: AnnotatedPair
    rankings: NDArray[np.int64]  # (M, K)

    def votes(self) -> NDArray[np.int64]:
        """(M,) each annotator's preference on the pair: 1 = chosen above rejected, -1 = below.

        Signed so that ``mallowspo.annotators.votes_from_preferences`` reads it as it is (there,
        0 is a tie); annotator 1 always votes 1."""
        r = self.rankings
        return np.where(r[:, self.pair.chosen] < r[:, self.pair.rejected], 1, -1).astype(np.int64)


def annotate_list(
    rewards: ArrayLike, phi: float, annotators: int, rng: np.random.Generator, others_rng: np.random.Generator
) -> AnnotatedList:
    """``annotators`` Mallows rankings of ``rewards``' responses around their reward order.

    The first is ``annotate(rewards, phi, rng)``: the same draws from ``rng``, so its pair is
    what ``annotate`` returns. Annotators 2..M are drawn from ``others_rng`` only."""
    annotators = check_annotators(annotators)
    pair = annotate(rewards, phi, rng)
    n = len(pair.central_ranking)
    first = np.empty(n, dtype=np.int64)
    first[list(pair.annotator_ranking)] = np.arange(n)
    others = annotator_ranks(n, phi, annotators - 1, others_rng)  # central rank -> annotator rank
    by_response = np.empty_like(others)
    by_response[:, list(pair.central_ranking)] = others
    return AnnotatedList(pair=pair, rankings=np.vstack([first[None, :], by_response]))
