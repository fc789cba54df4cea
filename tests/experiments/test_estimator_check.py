"""The Fig. 3 estimator check: the command writes its files, and the estimate tracks the truth."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mallowspo.cli import main
from mallowspo.experiments.estimator_check import (
    normalized_entropy,
    run_estimator_check,
    winner_loser_distributions,
    write_outputs,
)


def test_command_writes_every_file(tmp_path, capsys):
    out = tmp_path / "check"
    code = main(
        ["estimator-check", "--out", str(out), "--n", "5", "--samples", "200", "--grid_points", "6", "--seed", "3"]
    )
    assert code == 0
    for name in ("results.json", "estimator_check.png", "README.md"):
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert results["options"] == {"n": 5, "samples": 200, "grid_points": 6, "seed": 3}
    for key in ("truth", "hbar", "raw_estimate", "winner_entropy", "loser_entropy", "population_hbar"):
        assert len(results[key]) == 6 and all(math.isfinite(v) for v in results[key])
    for key in ("phi_star_mean", "phi_star_lsq", "spearman", "pearson"):
        assert math.isfinite(results[key])
    assert results["truth"][0] == 0.0 and results["truth"][-1] == 5.0
    readme = (out / "README.md").read_text()
    assert f"{results['spearman']:.4f}" in readme and f"{results['phi_star_mean']:.4f}" in readme
    assert (out / "estimator_check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Spearman" in capsys.readouterr().out


def test_estimate_tracks_the_truth_on_a_moderate_grid():
    result = run_estimator_check(n=8, samples=800, grid_points=11, seed=1)
    truth, raw = np.array(result.truth), np.array(result.raw_estimate)
    assert result.spearman > 0.9 and result.pearson > 0.9
    # monotone-ish: nearly every step up in the truth is a step up in the estimate, and
    # the estimate at truth 5 is well above that at 2.5, itself well above that at 0
    assert np.mean(np.diff(raw) > 0) >= 0.8
    assert raw[0] < 0.05 < raw[5] < raw[-1]
    # phi* (mean) makes the grid means agree; the least-squares phi* is close to it here
    assert np.mean(result.phi_star_mean * raw) == pytest.approx(truth.mean())
    assert result.phi_star_lsq == pytest.approx(result.phi_star_mean, rel=0.2)
    # the sampled Hbar is near its infinite-sample value, and entropies are in [0, 1]
    assert np.allclose(result.hbar, result.population_hbar, atol=0.05)
    for key in ("winner_entropy", "loser_entropy", "hbar"):
        values = np.array(getattr(result, key))
        assert np.all((values >= 0) & (values <= 1))


def test_winner_and_loser_distributions_and_entropy():
    rankings = np.array([[0, 1, 2], [1, 0, 2], [2, 1, 0], [0, 2, 1]])  # ranks of items 0, 1, 2
    winners, losers = winner_loser_distributions(rankings)
    assert winners.tolist() == [0.5, 0.25, 0.25]  # item with rank 0 in each row: 0, 1, 2, 0
    assert losers.tolist() == [0.25, 0.25, 0.5]  # item with rank 2: 2, 2, 0, 1
    assert normalized_entropy(np.full(4, 0.25)) == pytest.approx(1.0)
    assert normalized_entropy(np.array([1.0, 0.0, 0.0])) == 0.0


def test_degenerate_draws_stay_finite(tmp_path):
    # one draw per point: every empirical distribution is a point mass, Hbar = 0 and the
    # estimate is the bounded -log(1e-6), not inf
    result = run_estimator_check(n=4, samples=1, grid_points=3, seed=0)
    assert result.hbar == [0.0, 0.0, 0.0]
    assert result.raw_estimate == pytest.approx([-math.log(1e-6)] * 3)
    assert math.isnan(result.spearman)  # constant estimate: no correlation, reported as NaN
    paths = write_outputs(result, tmp_path)
    assert json.loads(paths["results"].read_text())["spearman"] is None  # null in strict JSON


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="--n must be"):
        run_estimator_check(n=1)
    with pytest.raises(ValueError, match="grid_points must be >= 3"):
        run_estimator_check(grid_points=2)
