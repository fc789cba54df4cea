"""What a controllable-generation experiment runs: its configuration, the method and
prompt-family names, and the selection of the world's rows."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
    learning_rate: float = (
        3e-5  # = cli/defaults.py WORLD_LEARNING_RATE; at 1e-4 the closed answers garble within 100 steps
    )
    warmup_steps: int = 10
    lr_scheduler_type: str = "constant_with_warmup"
    # evaluation
    eval_points: int = 6  # checkpoints evaluated, step 0 and max_steps included
    eval_prompts: int = 64  # held-out prompts sampled from (balanced over templates)
    samples_per_prompt: int = 4
    max_new_tokens: int = 48
    eval_pairs: int | None = None  # held-out pairs for the accuracy (None: all of the family)
    train_rows: int | None = None  # cap on train pairs (None: all of the family)
    num_threads: int = 1  # torch threads (the tiny model is fastest on one; see cli/defaults.py)
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        known = self.known_methods()
        unknown = [m for m in self.methods if m not in known]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {tuple(known)}, got {self.methods}")
        if self.family not in FAMILY_CHOICES:
            raise ValueError(f"family must be one of {FAMILY_CHOICES}, got {self.family!r}")
        if not self.seeds or not self.betas or any(b <= 0 for b in self.betas):
            raise ValueError(f"need at least one seed and positive betas, got seeds={self.seeds} betas={self.betas}")
        if self.max_steps < 1 or self.eval_points < 2:
            raise ValueError("max_steps must be >= 1 and eval_points >= 2 (step 0 and the last step)")
        if self.eval_prompts < 1 or self.samples_per_prompt < 1 or self.batch_size < 1:
            raise ValueError("eval_prompts, samples_per_prompt and batch_size must be >= 1")

    def known_methods(self) -> tuple[str, ...]:
        """The names ``methods`` may hold (a subclass may train other arms)."""
        return tuple(METHODS)

    def eval_steps(self) -> list[int]:
        """The evaluated steps: ``eval_points`` evenly spaced steps from 0 to ``max_steps``."""
        steps = np.linspace(0, self.max_steps, self.eval_points).round().astype(int)
        return sorted(set(int(s) for s in steps))

    def run_name(self, seed: int, beta: float, method: str) -> str:
        return f"{self.family}-beta{beta:g}-seed{seed}-{method}"


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
