"""`mallowspo experiment listwise` (``mallowspo.experiments.listwise``): Kendall's tau against a
brute force, the runner's lists against the world's pairs, and a 1-seed micro run of the five arms
on a miniature world."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from mallowspo.cli import main
from mallowspo.experiments import listwise
from mallowspo.experiments.listwise.run import ListRunner, build_heldout_lists, ranking_metrics

torch.set_num_threads(1)

SHORT = ["--steps", "3", "--batch_size", "4", "--eval_points", "2", "--eval-prompts", "4", "--samples", "2",
         "--eval-pairs", "8", "--eval-lists", "24", "--max-new-tokens", "16", "--train-rows", "48"]  # fmt: skip


def brute_force_tau(rewards, order) -> float:
    """sum over preferred (i, j) of sign(r_i - r_j), over the number of such pairs."""
    signs = [
        np.sign(rewards[i] - rewards[j])
        for i, j in itertools.permutations(range(len(order)), 2)
        if order[i] > order[j]
    ]
    return float(np.mean(signs)) if signs else float("nan")


def test_kendall_tau_matches_brute_force_with_ties_and_is_signed():
    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(2, 7))
        rewards = rng.normal(size=k).round(1)  # rounding makes reward ties too
        order = rng.integers(0, 3, size=k).astype(float)  # ties in the observed order give no pair
        expected = brute_force_tau(rewards, order)
        got = listwise.kendall_tau(rewards, order)
        assert (np.isnan(got) and np.isnan(expected)) or got == pytest.approx(expected)
    assert listwise.kendall_tau(np.array([3.0, 2.0, 1.0]), np.array([2.0, 1.0, 0.0])) == 1.0
    assert listwise.kendall_tau(np.array([1.0, 2.0, 3.0]), np.array([2.0, 1.0, 0.0])) == -1.0


def test_ranking_metrics_read_the_observed_ranking_best_first(mini_world):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(mini_world / "model")
    rows = [
        {"prompt": "a", "responses": [" x", " y", " z"], "ranking": [2, 0, 1], "scores": [0.5, -1.0, 2.0],
         "family": "open"},
    ]  # fmt: skip
    heldout = build_heldout_lists(rows, tokenizer)
    heldout.ref_logps = np.zeros(3)
    # implicit rewards in the ranking's order (z > x > y) and in the true scores' order (z > x > y)
    metrics = ranking_metrics(np.array([1.0, 0.0, 2.0]), heldout, beta=0.1)
    assert metrics["all"]["kendall_tau"] == 1.0 and metrics["all"]["kendall_tau_true"] == 1.0
    metrics = ranking_metrics(np.array([0.0, 1.0, 2.0]), heldout, beta=0.1)  # z > y > x: one pair of three wrong
    assert metrics["open"]["kendall_tau"] == pytest.approx(1 / 3)


def test_runner_trains_on_the_lists_of_the_controllable_pairs(mini_world, tmp_path):
    config = listwise.ListwiseConfig(train_rows=48, eval_prompts=4, eval_pairs=8, eval_lists=8, disable_tqdm=True)
    runner = ListRunner(config, mini_world, tmp_path, log=lambda *_: None)
    assert len(runner.train_lists) == len(runner.train_rows) == min(48, len(runner.all_train_rows)) > 0
    for pair, row in zip(runner.train_rows, runner.train_lists):
        assert row["prompt"] == pair["prompt"]
        best, worst = row["ranking"][0], row["ranking"][-1]
        assert (row["responses"][best], row["responses"][worst]) == (pair["chosen"], pair["rejected"])
    assert len(runner.heldout.ref_logps) == sum(runner.heldout.sizes) and len(runner.heldout.sizes) == 8


def test_config_refuses_unknown_arms():
    with pytest.raises(ValueError, match="plackett_luce"):
        listwise.ListwiseConfig(methods=("dpo", "listnet"))


def test_micro_experiment_runs_every_arm_and_moves_the_ranking(mini_world, tmp_path, mallowspo_cache, capsys):
    out = tmp_path / "listwise"
    assert main(["experiment", "listwise", "--seeds", "1", "--world", str(mini_world), "--out", str(out), *SHORT]) == 0
    assert "experiment listwise: done" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == list(listwise.ARMS)
    for run in results["runs"]:
        first, last = run["checkpoints"][0]["all"], run["checkpoints"][-1]["all"]
        assert first["kendall_tau"] == 0.0 and first["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy is pi_ref
        assert last["kendall_tau"] > 0.0, run["name"]  # a few steps already order the held-out lists
    matched = results["summary"]["0.1"]["matched_kl"]["all"]["methods"]
    assert {"reward_minus_dpo", "kendall_tau_minus_dpo"} <= set(matched["plackett_luce"])
    report = (out / "report.md").read_text()
    assert "MallowsPO-theta + PL" in report and "## beta 0.1: verdict" in report
    assert (out / "listwise.png").stat().st_size > 0
    assert main(["experiment", "listwise", "--report-only", "--out", str(out)]) == 0
