"""`mallowspo demo` and `mallowspo experiment controllable` (``mallowspo.experiments.controllable``):
a shortened demo and a 1-seed micro experiment on a miniature world, plus the statistics
and the verdict on synthetic curves."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mallowspo.cli import main
from mallowspo.experiments import controllable as cg
from mallowspo.experiments.controllable.evaluate import encode, sequence_logps
from mallowspo.experiments.controllable.report import FIGURES
from mallowspo.experiments.controllable.stats import mean_ci, summarize, value_at_kl
from mallowspo.experiments.world.lm import sample_completions

torch.set_num_threads(1)

PNG = b"\x89PNG\r\n\x1a\n"
# A few steps, a handful of prompts and samples: the whole pipeline in seconds.
SHORT = ["--steps", "3", "--batch_size", "4", "--eval_points", "2", "--eval-prompts", "4", "--samples", "2",
         "--eval-pairs", "8", "--max-new-tokens", "24"]  # fmt: skip


def test_short_demo_writes_every_report_file(mini_world, tmp_path, mallowspo_cache, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--world", str(mini_world), *SHORT]) == 0
    printed = capsys.readouterr().out
    assert "[1/4] world" in printed and "[3/4] training 3 runs" in printed and "mallowspo demo: done" in printed
    for name in ("report.md", "results.json", *FIGURES.values()):
        assert (out / name).is_file(), name
    for name in FIGURES.values():
        assert (out / name).read_bytes()[:8] == PNG

    results = json.loads((out / "results.json").read_text())
    assert results["config"]["family"] == "mix" and results["config"]["seeds"] == [0]
    assert [r["method"] for r in results["runs"]] == ["dpo", "theta", "phi"]
    for run in results["runs"]:
        steps = [c["step"] for c in run["checkpoints"]]
        assert steps == [0, 3]
        base = run["checkpoints"][0]
        assert base["all"]["kl"] == 0.0 and base["all"]["accuracy"] == 0.0  # the policy is the reference
        assert set(base) >= {"all", "closed", "open"}
    # every method starts from the same model and is evaluated on the same samples
    assert len({r["checkpoints"][0]["all"]["reward"] for r in results["runs"]}) == 1
    d = results["dispersion"]
    assert len(d["values"]["estimate"]) == len(d["values"]["true_neg_log_phi"]) > 0
    assert np.mean(d["values"]["estimate"]) == pytest.approx(1.0, abs=1e-6)  # mean normalisation
    assert -1 <= d["spearman"] <= 1
    report = (out / "report.md").read_text()
    assert "## Verdict" in report and "| DPO |" in report and "| MallowsPO-phi |" in report
    assert "![reward vs KL](reward_kl.png)" in report


def test_experiment_cli_runs_a_one_seed_micro_config_and_redraws(mini_world, tmp_path, mallowspo_cache):
    out = tmp_path / "exp"
    argv = ["experiment", "controllable", "--seeds", "1", "--betas", "0.1,0.5", "--family", "open",
            "--methods", "dpo,phi", "--out", str(out), "--world", str(mini_world), *SHORT]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["family"] == "open" and results["config"]["betas"] == [0.1, 0.5]
    assert len(results["runs"]) == 4 and set(results["summary"]) == {"0.1", "0.5"}
    assert results["eval_prompts"] > 0
    for run in results["runs"]:
        assert set(run["checkpoints"][0]) >= {"all", "open"} and "closed" not in run["checkpoints"][0]
        # a family run keeps the phi* fitted on the whole train set; DPO has no dispersion
        expected_phi_star = None if run["method"] == "dpo" else pytest.approx(results["dispersion"]["phi_star"])
        assert run["phi_star"] == expected_phi_star
    final = results["summary"]["0.1"]["methods"]["phi"]["final"]["all"]["reward"]
    assert final["n"] == 1 and math.isnan(final["lo"])  # one seed: no interval
    (out / "report.md").unlink()
    assert main(["experiment", "controllable", "--out", str(out), "--report_only"]) == 0
    assert (out / "report.md").is_file()


def test_experiment_cli_rejects_a_bad_family_and_methods():
    with pytest.raises(SystemExit):
        main(["experiment", "controllable", "--family", "both"])
    with pytest.raises(ValueError, match="methods"):
        cg.ControllableConfig(methods=("dpo", "ipo"))


def test_sampling_leaves_the_global_random_state_alone(mini_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mallowspo.experiments.world.paths import WorldPaths

    paths = WorldPaths(mini_world)
    model = AutoModelForCausalLM.from_pretrained(paths.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(paths.model_dir)
    prompts = [encode(tokenizer, "review of the silent harbor:"), encode(tokenizer, "facts about the silver river:")]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = sample_completions(model, prompts, 3, 24, tokenizer.eos_token_id, tokenizer.pad_token_id, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = sample_completions(model, prompts, 3, 24, tokenizer.eos_token_id, tokenizer.pad_token_id, seed=5)
    assert a == b and len(a) == 6
    done = [s for s in a if s is not None]
    assert all(s[-1] == tokenizer.eos_token_id for s in done)
    # the policy is the reference: every log-ratio is 0; log-probs are those of a plain forward
    logps = sequence_logps(
        model, [prompts[i // 3] for i, s in enumerate(a) if s is not None], done, tokenizer.pad_token_id
    )
    assert np.all(logps < 0)
    seq = prompts[0] + done[0] if a[0] is not None else None
    if seq is not None:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0, :-1].log_softmax(-1)
        manual = logits[torch.arange(len(seq) - 1), torch.tensor(seq[1:])][len(prompts[0]) - 1 :].sum()
        assert logps[0] == pytest.approx(float(manual), abs=1e-4)


# ----------------------------------------------------------------------------- statistics and verdict


def test_mean_ci_is_the_t_interval():
    from scipy import stats

    x = [0.1, 0.3, 0.2, 0.6]
    ci = mean_ci(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert ci["mean"] == pytest.approx(np.mean(x)) and ci["lo"] == pytest.approx(lo) and ci["hi"] == pytest.approx(hi)
    one = mean_ci([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["lo"]) and one["n"] == 1
    assert mean_ci([])["n"] == 0


def _checkpoints(kls, rewards):
    return [{"step": 10 * i, "all": {"kl": k, "reward": r, "accuracy": 0.5, "unfinished": 0.0, "reward_se": 0.01}}
            for i, (k, r) in enumerate(zip(kls, rewards))]  # fmt: skip


def test_value_at_kl_interpolates_along_the_curve():
    curve = _checkpoints([0.0, 2.0, 6.0], [0.1, 0.3, 0.5])
    assert value_at_kl(curve, 1.0) == pytest.approx(0.2)
    assert value_at_kl(curve, 4.0) == pytest.approx(0.4)
    assert value_at_kl(curve, 6.0) == pytest.approx(0.5)
    assert math.isnan(value_at_kl(curve, 7.0))


def _synthetic_results(phi_gain: float, seeds=(0, 1, 2)):
    config = cg.ControllableConfig(seeds=tuple(seeds), methods=("dpo", "theta", "phi"))
    rng = np.random.default_rng(0)
    runs = []
    for seed in seeds:
        noise = rng.normal(0, 0.002)
        for m, gain, end in (("dpo", 0.0, 4.0), ("theta", 0.0, 4.2), ("phi", phi_gain, 3.0)):
            kls = np.linspace(0, end, 4)
            rewards = 0.1 + 0.05 * kls + gain * kls / end + noise
            runs.append({"seed": seed, "beta": 0.1, "method": m, "checkpoints": _checkpoints(kls, rewards),
                         "train_loss_last": 0.5, "seconds": 1.0})  # fmt: skip
    return {"config": {"seeds": list(seeds)}, "runs": runs, "summary": summarize(config, runs),
            "dispersion": {"spearman": 0.9, "spearman_closed": 0.5, "spearman_open": 0.6, "values": {"estimate": [1.0]}}}  # fmt: skip


@pytest.mark.parametrize("gain, word", [(0.1, "holds"), (-0.1, "contradicted"), (0.0, "not shown")])
def test_verdict_follows_the_matched_kl_difference(gain, word):
    results = _synthetic_results(gain)
    matched = results["summary"]["0.1"]["matched_kl"]["all"]
    assert matched["kl"]["mean"] == pytest.approx(3.0, abs=0.01)  # phi travels least
    diff = matched["methods"]["phi"]["reward_minus_dpo"]
    assert diff["mean"] == pytest.approx(gain, abs=0.005) and diff["n"] == 3
    text = "\n".join(cg.verdict_lines(results))
    assert f"**{word}**" in text
    assert "MallowsPO-theta has about the same reward as DPO" in text


def test_a_missing_world_directory_is_an_error_not_a_build(tmp_path, capsys):
    argv = [
        "experiment",
        "controllable",
        "--seeds",
        "1",
        "--world",
        str(tmp_path / "nowhere"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) != 0
    assert "no complete world" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(FileNotFoundError, match="no complete world"):
        cg.run_controllable(cg.ControllableConfig(), tmp_path / "o", world_root=tmp_path / "nowhere")
    from mallowspo.experiments.world import ensure_world

    with pytest.raises(FileNotFoundError, match="mallowspo world build --out"):
        ensure_world(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()
