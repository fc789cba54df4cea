"""What an annotator-accuracy experiment runs (``AnnotatorsConfig``) and the run itself
(``run_annotators``): load or draw the prompts, estimate, score; no files written here."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mallowspo.experiments.annotators.data import SPLITS, AnnotatedPrompts, load_world, simulate
from mallowspo.experiments.annotators.evaluate import entropy_estimate, evaluate


@dataclass(frozen=True)
class AnnotatorsConfig:
    """The annotator counts M, the world's prompts, and the simulation."""

    annotators: tuple[int, ...] = (1, 2, 3, 5, 10)
    split: str = "train"  # the world's split (train: 1,220 prompts, the world report's entropy check)
    max_prompts: int | None = None  # the world's first N prompts of the split (None: all)
    list_size: int = 4  # K of the lists compared with the pairs, and of the simulation
    sim_prompts: int = 2000
    sim_max_neg_log_phi: float = 5.0  # the simulation's truth ~ U[0, this] (Fig. 3's range)
    entropy_samples: int = 2000  # the simulation's rankings per prompt behind Hbar (Fig. 3's)
    seed: int = 0

    def __post_init__(self) -> None:
        if (
            not self.annotators
            or any(m < 1 for m in self.annotators)
            or len(set(self.annotators)) != len(self.annotators)
        ):
            raise ValueError(f"annotators must be distinct counts >= 1, got {self.annotators}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.max_prompts is not None and self.max_prompts < 3:
            raise ValueError(f"max_prompts must be >= 3 (correlations need 3 prompts), got {self.max_prompts}")
        if not 2 <= self.list_size <= 7:
            raise ValueError(
                f"list_size must be 2..7 (the ranking estimate enumerates K! centers), got {self.list_size}"
            )

    @property
    def max_annotators(self) -> int:
        return max(self.annotators)


def _evaluations(prompts: AnnotatedPrompts, config: AnnotatorsConfig) -> dict[str, Any]:
    """pairs and lists on every prompt; for the world also the lists with K = list_size."""
    entropy, phi_star = entropy_estimate(prompts)
    every = np.arange(len(prompts.truth))
    runs = {"pairs": ("pairs", every), "lists": ("lists", every)}
    if prompts.name == "world":
        runs[f"lists_k{config.list_size}"] = ("lists", np.flatnonzero(prompts.size == config.list_size))
    out = {"prompts": len(every), "phi_star": phi_star, "evaluations": {}}
    for name, (kind, rows) in runs.items():
        if len(rows) >= 3:
            out["evaluations"][name] = evaluate(prompts, rows, kind, config.annotators, entropy)
    return out


def run_annotators(config: AnnotatorsConfig, world_root: str | Path) -> dict[str, Any]:
    """The experiment on the world at ``world_root`` and on the simulation: results.json's content."""
    start = time.perf_counter()
    world = load_world(
        world_root,
        config.split,
        max_annotators=config.max_annotators,
        max_prompts=config.max_prompts,
        seed=config.seed,
    )
    sim = simulate(
        config.sim_prompts,
        items=config.list_size,
        max_annotators=config.max_annotators,
        max_neg_log_phi=config.sim_max_neg_log_phi,
        entropy_samples=config.entropy_samples,
        seed=config.seed,
    )
    results = {
        "options": {**asdict(config), "annotators": list(config.annotators), "world": str(world_root)},
        "world": {
            **_evaluations(world, config),
            "given_annotators": world.given_annotators,
            "shipped_votes_match": world.shipped_votes_match,
        },
        "simulation": _evaluations(sim, config),
    }
    results["seconds"] = time.perf_counter() - start
    return results
