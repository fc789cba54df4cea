"""`mallowspo experiment dispersion_sources` (``mallowspo.experiments.dispersion_sources``): a
1-seed micro run on a miniature world, the placebo's permutation, and the -log phi(x) that
each source attaches in training."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from mallowspo.cli import main
from mallowspo.dispersion import DEFAULT_CLAMP
from mallowspo.experiments import dispersion_sources as ds

torch.set_num_threads(1)

SHORT = ["--steps", "2", "--batch_size", "4", "--eval_points", "2", "--eval-prompts", "4", "--samples", "2",
         "--eval-pairs", "8", "--max-new-tokens", "16", "--train-rows", "48"]  # fmt: skip


@pytest.fixture(scope="module")
def runner(mini_world, tmp_path_factory):
    config = ds.DispersionSourcesConfig(train_rows=48, eval_prompts=4, eval_pairs=8, disable_tqdm=True)
    return ds.SourceRunner(config, mini_world, tmp_path_factory.mktemp("out"), log=lambda *_: None)


def test_micro_experiment_writes_results_and_report(mini_world, tmp_path, mallowspo_cache, capsys):
    out = tmp_path / "sources"
    args = ["experiment", "dispersion_sources", "--seeds", "1", "--sources", "oracle,placebo", "--methods", "dpo,phi"]
    assert main([*args, "--world", str(mini_world), "--out", str(out), *SHORT]) == 0
    assert "experiment dispersion_sources: done" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [ds.key(r) for r in results["runs"]] == ["dpo", "phi:oracle", "phi:placebo"]
    assert set(results["sources"]) == {"oracle", "placebo"}
    assert results["sources"]["oracle"]["spearman"] == pytest.approx(1.0)
    entry = results["summary"]["0.1"]
    assert set(entry["matched_kl"]["all"]["methods"]) == {"dpo", "phi:oracle", "phi:placebo"}
    assert "phi" in entry["oracle_minus_placebo"]
    report = (out / "report.md").read_text()
    assert "MallowsPO-phi (placebo)" in report and "## Verdict" in report
    assert main(["experiment", "dispersion_sources", "--report-only", "--out", str(out)]) == 0


def test_placebo_is_a_permutation_of_the_oracle_across_prompts(runner):
    rows = runner.all_train_rows
    truth = [r["neg_log_phi"] for r in rows]
    placebo = ds.placebo_values(rows, seed=0)
    assert Counter(placebo) == Counter(truth)  # one pair per prompt in the world: the same multiset
    assert placebo != truth and placebo == ds.placebo_values(rows, seed=0) != ds.placebo_values(rows, seed=1)
    by_prompt: dict[str, set] = {}
    for r, p in zip(rows, placebo):
        by_prompt.setdefault(r["prompt_id"], set()).add(p)
    assert all(len(v) == 1 for v in by_prompt.values())


def test_each_source_attaches_its_normalised_input(runner):
    all_rows = runner.all_train_rows
    truth = np.asarray([r["neg_log_phi"] for r in all_rows])
    placebo = np.asarray(ds.placebo_values(all_rows, 0))
    index = {id(r): i for i, r in enumerate(all_rows)}
    expected = {
        "oracle": np.clip(truth / truth.mean(), *DEFAULT_CLAMP),
        "placebo": np.clip(placebo / placebo.mean(), *DEFAULT_CLAMP),
    }
    for source, values in expected.items():
        rows, attached = runner.attached_dispersion(source)
        np.testing.assert_allclose(attached, values[[index[id(r)] for r in rows]], rtol=1e-6)
    rows, attached = runner.attached_dispersion("annotators")  # the mix's train rows, capped: mean 1 over them
    raw = ds.vote_estimate(rows)
    np.testing.assert_allclose(attached, np.clip(raw / raw.mean(), *DEFAULT_CLAMP), rtol=1e-6)
    assert runner.dispersion_args(ds.SourceSpec(0, 0.1, "dpo")) == {"dispersion_normalization": "mean"}


def test_specs_run_dpo_once_per_seed():
    config = ds.DispersionSourcesConfig(seeds=(0, 1))
    specs = ds.run_specs(config)
    assert len(specs) == 2 * (1 + 2 * len(ds.SOURCES))
    assert [s.seed for s in specs if s.method == "dpo"] == [0, 1]
    with pytest.raises(ValueError, match="sources"):
        ds.DispersionSourcesConfig(sources=("oracle", "tea leaves"))
