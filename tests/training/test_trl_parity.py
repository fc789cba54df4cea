"""Parity with TRL itself: trl 1.16's ``DPOTrainer`` and ``MallowsPOTrainer(mallows="none")`` on the
same tiny model, data and settings see the same token ids, and train to the same losses and weights.

Each test trains both for a few steps from the same initial weights (dropout off, same seed, so
the same batches) and compares the per-step losses, the logged rewards and the final weights
to float32 tolerance. Both precompute the reference log-probs (TRL's default scores the
reference at every step, through another code path than its policy's, so at step 0 its
margins are float noise of about 1e-3 nats rather than 0).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from mallowspo import MallowsPOConfig, MallowsPOTrainer
from mallowspo.testing.tiny import trl_parity_settings

STEPS = 3
COMMON = trl_parity_settings(max_steps=STEPS)


def standard_rows(path, n=24):
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]


def conversational_rows(path, n=24):
    return [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in standard_rows(path, n)
    ]


def train_both(model_dir, rows, tmp_path, **settings):
    """(trl trainer, mallowspo trainer, initial weights), both trained STEPS steps with ``settings`` on ``rows``."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    raw = datasets.Dataset.from_list(rows)
    trl = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=DPOConfig(output_dir=str(tmp_path / "trl"), **COMMON, **settings),
        train_dataset=raw,
        processing_class=tokenizer,
    )
    ours = MallowsPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=MallowsPOConfig(
            output_dir=str(tmp_path / "mallowspo"), mallows="none", max_prompt_length=None, **COMMON, **settings
        ),
        train_dataset=raw,
        processing_class=tokenizer,
    )
    assert_same_token_ids(trl.train_dataset, ours.train_dataset)
    initial = {name: weight.detach().clone() for name, weight in ours.model.named_parameters()}
    trl.train()
    ours.train()
    return trl, ours, initial


def assert_same_token_ids(trl_data, our_data):
    for column_trl, column_ours in (
        ("prompt_ids", "prompt_input_ids"),
        ("chosen_ids", "chosen_input_ids"),
        ("rejected_ids", "rejected_input_ids"),
    ):
        assert trl_data[column_trl] == our_data[column_ours], column_trl


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry]


# Tolerances. TRL's CPU head computes in float32 even for a float64 model: on a float64 batch its summed
# log-probs are 3e-3 nats off and its gradients up to 3.5e-4 (relative) off the exact ones, where
# mallowspo's head is exact to 2e-16 (tests/training/test_head.py checks it against plain logits). So losses
# and rewards agree to about 1e-3, and each weight's change over the run (SGD) to about 1% of that change.
# TRL's token metrics (tests/training/test_trl_metrics.py checks them against plain logits) agree to the same
# float32 noise; num_tokens is a count, equal.
TOLERANCES = {
    "loss": 1e-3,
    "rewards/chosen": 2e-3,
    "rewards/rejected": 2e-3,
    "rewards/margins": 2e-3,
    "entropy": 1e-3,
    "logits/chosen": 1e-3,
    "logits/rejected": 1e-3,
    "mean_token_accuracy": 1e-3,
}


def assert_same_training(trl, ours, initial):
    for key, atol in TOLERANCES.items():
        trl_values, our_values = logged(trl, key), logged(ours, key)
        assert len(trl_values) == len(our_values) == STEPS, key
        torch.testing.assert_close(torch.tensor(our_values), torch.tensor(trl_values), rtol=1e-3, atol=atol, msg=key)
    assert logged(ours, "num_tokens") == logged(trl, "num_tokens")  # cumulative: increasing
    assert sorted(set(logged(ours, "num_tokens"))) == logged(ours, "num_tokens")
    assert max(logged(ours, "loss")) - min(logged(ours, "loss")) > 1e-2  # the runs moved
    assert max(abs(m) for m in logged(ours, "rewards/margins")) > 0.05
    trl_weights = dict(trl.model.named_parameters())
    for name, weight in ours.model.named_parameters():
        change = (trl_weights[name] - initial[name]).norm()
        assert change > 0, name
        assert (weight - trl_weights[name]).norm() < 0.02 * change, name


@pytest.mark.parametrize(
    "settings",
    [
        dict(loss_type=["sigmoid"]),
        dict(loss_type=["ipo"]),
        dict(loss_type=["hinge"]),
        dict(loss_type=["robust"], label_smoothing=0.1),
        dict(loss_type=["sigmoid", "sft"], loss_weights=[0.8, 0.5]),
        dict(loss_type=["ipo", "hinge", "sft"], loss_weights=[1.0, 0.3, 0.2]),
        dict(loss_type=["sigmoid"], padding_free=True),  # trl 1.16 pads anyway (it warns); mallowspo packs
    ],
    ids=["sigmoid", "ipo", "hinge", "robust", "sigmoid+sft", "ipo+hinge+sft", "padding_free"],
)
def test_same_losses_and_weights_as_trl_dpo(settings, tiny_lm_dir, tiny_prefs_path, tmp_path, mallowspo_cache):
    assert_same_training(*train_both(tiny_lm_dir, standard_rows(tiny_prefs_path), tmp_path, **settings))


def test_same_training_as_trl_on_conversational_data(tiny_lm_dir, tiny_prefs_path, tmp_path, mallowspo_cache):
    assert_same_training(
        *train_both(tiny_lm_dir, conversational_rows(tiny_prefs_path), tmp_path, loss_type=["sigmoid"])
    )


def test_a_trl_recipe_runs_unchanged_in_both_clis(tiny_lm_dir, tiny_prefs_path, tmp_path, mallowspo_cache):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in standard_rows(tiny_prefs_path)))
    recipe = dict(
        model_name_or_path=str(tiny_lm_dir),
        dataset_name=str(data_dir),
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, 0.5],
        **{**COMMON, "save_strategy": "steps", "save_steps": STEPS},  # checkpoint-3 holds TRL's log history
    )
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env_python = sys.executable
    trl_out, ours_out = tmp_path / "trl_out", tmp_path / "ours_out"
    trl_cli = str(Path(sys.executable).parent / "trl")
    done = subprocess.run(
        [trl_cli, "dpo", "--config", str(path), "--output_dir", str(trl_out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    subprocess.run(
        [
            env_python,
            "-m",
            "mallowspo.cli",
            "train",
            "--config",
            str(path),
            "--mallows",
            "none",
            "--output_dir",
            str(ours_out),
        ],
        check=True,
        capture_output=True,
    )
    trl_log = json.loads((trl_out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    ours_log = json.loads((ours_out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    trl_losses = [e["loss"] for e in trl_log if "loss" in e]
    our_losses = [e["loss"] for e in ours_log if "loss" in e]
    assert len(trl_losses) == len(our_losses) == STEPS
    torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(trl_losses), rtol=1e-4, atol=1e-5)
