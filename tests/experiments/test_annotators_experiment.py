"""`mallowspo experiment annotators`: it writes every output on a small subset, the annotator
estimate gets better with more annotators on the Kendall simulation, and the world's data are
read as the world describes them (votes, entropies, the drawn annotators)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mallowspo
from mallowspo.experiments.annotators import AnnotatorsConfig, run_annotators, write_outputs
from mallowspo.experiments.annotators.data import load_world, simulate
from mallowspo.experiments.annotators.evaluate import entropy_estimate, evaluate, spearman, truth_bins

# The shipped world, found without importing mallowspo.experiments.world (which loads transformers).
WORLD = Path(mallowspo.__file__).parent / "experiments" / "world" / "assets"
needs_world = pytest.mark.skipif(
    not (WORLD / "lists" / "train.jsonl").is_file(), reason="no world data shipped under experiments/world/assets"
)
SMALL = AnnotatorsConfig(annotators=(1, 2, 10), max_prompts=60, sim_prompts=150, entropy_samples=200)


@needs_world
def test_a_small_run_writes_every_output(tmp_path):
    results = run_annotators(SMALL, WORLD)
    paths = write_outputs(results, tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"results.json", "annotators.png", "report.md"}
    assert paths["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(paths["results"].read_text())
    assert saved["options"]["annotators"] == [1, 2, 10] and saved["world"]["prompts"] == 60
    assert set(saved["world"]["evaluations"]) == {"pairs", "lists", "lists_k4"}
    assert set(saved["simulation"]["evaluations"]) == {"pairs", "lists"}
    for evaluation in [*saved["world"]["evaluations"].values(), *saved["simulation"]["evaluations"].values()]:
        for row in evaluation["spearman"].values():
            assert set(row) == {"prompts", "1", "2", "10", "entropy"}
            assert row["1"] is None  # one annotator: every prompt gets the prior mean
        assert sum(b["count"] for b in evaluation["calibration"]["bins"]) == evaluation["prompts"]
    assert set(saved["world"]["evaluations"]["pairs"]["spearman"]) == {"all", "closed", "open"}
    report = paths["report"].read_text()
    rho = saved["world"]["evaluations"]["lists"]["spearman"]["all"]["10"]
    assert "## Spearman correlation" in report and "## Verdict" in report and f"{rho:.3f}" in report


def test_the_ranking_estimate_improves_with_annotators_on_the_simulation():
    """Kendall draws at K = 4 with a continuous truth on [0, 5]: Spearman rises with M, and ten
    annotators' rankings order the prompts well (0.91 on 2,000 prompts)."""
    annotators = (1, 2, 3, 5, 10)
    sim = simulate(400, items=4, max_annotators=10, entropy_samples=100, seed=1)
    entropy, _ = entropy_estimate(sim)
    rho = {
        kind: evaluate(sim, np.arange(400), kind, annotators, entropy)["spearman"]["all"]
        for kind in ("lists", "pairs")
    }
    for kind, row in rho.items():
        assert row["1"] is None  # a constant estimate: no order at all
        values = [row[str(m)] for m in annotators[1:]]
        assert 0 < values[0] and all(a < b for a, b in zip(values, values[1:])), (kind, values)
    assert rho["lists"]["10"] > 0.8 and rho["pairs"]["10"] > 0.6


def test_the_simulation_is_nested_in_its_sizes():
    small = simulate(20, max_annotators=3, entropy_samples=50, seed=4)
    large = simulate(30, max_annotators=10, entropy_samples=50, seed=4)
    assert np.array_equal(small.truth, large.truth[:20])
    assert all(np.array_equal(a, b[:3]) for a, b in zip(small.rankings, large.rankings))
    assert np.array_equal(small.hbar, large.hbar[:20])


@needs_world
def test_the_world_is_read_as_it_ships():
    world = load_world(WORLD, "train", max_annotators=10, seed=0)
    assert world.given_annotators == 5 and world.shipped_votes_match
    assert all(r.shape[0] == 10 for r in world.rankings)
    lists = [json.loads(line) for line in open(WORLD / "lists" / "train.jsonl")]
    assert all(np.array_equal(r[:5], q["annotator_rankings"]) for r, q in zip(world.rankings, lists))
    fewer = load_world(WORLD, "train", max_annotators=7, max_prompts=50, seed=0)
    assert all(np.array_equal(a, b[:7]) for a, b in zip(fewer.rankings, world.rankings))
    # the drawn annotators follow the Kendall model around mu0: on open prompts (K = 4) the
    # response at central rank 0 is ranked first with probability 1 / (1 + phi + phi^2 + phi^3)
    first, expected = [], []
    for r, q in zip(world.rankings, lists):
        if q["family"] == "open":
            first.extend(r[5:, q["central_ranking"][0]] == 0)
            expected.append(1.0 / sum(q["phi"] ** i for i in range(4)))
    assert abs(np.mean(first) - np.mean(expected)) < 4 * np.sqrt(np.mean(expected) / len(first))
    # the entropy estimate is the world report's (docs/world.md: 0.97, 0.85 and 0.87)
    entropy, _ = entropy_estimate(world)
    assert spearman(entropy, world.truth) == pytest.approx(0.966, abs=5e-4)
    for family, rho in (("closed", 0.849), ("open", 0.866)):
        mask = world.family == family
        assert spearman(entropy[mask], world.truth[mask]) == pytest.approx(rho, abs=5e-4)


def test_the_truth_is_binned_by_value_or_by_decile():
    binning, labels, index = truth_bins(
        np.array([3.0, 0.05, 3.0, 1.9]), np.array(["facts", "review", "facts", "genre"])
    )
    assert binning == "distinct true values" and labels == ["review (0.05)", "genre (1.90)", "facts (3.00)"]
    assert index.tolist() == [2, 0, 2, 1]
    binning, labels, index = truth_bins(np.linspace(0, 5, 100), np.full(100, ""))
    assert binning == "deciles of the truth" and len(labels) == 10
    assert np.bincount(index).tolist() == [10] * 10
