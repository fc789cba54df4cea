"""Reliability, numerics, end to end through the trainer: each case gives a finite loss and
finite gradients, or a clear error.

- reference entropy exactly 0 (the estimate -log Hbar is infinite: it is bounded);
- phi exactly 1 (-log phi = 0: no preference signal, loss log 2, zero but finite gradient);
- a model in bfloat16 / float16 through the reference pass and training steps;
- log-ratio differences of +-1e4 under every objective;
- NaN in the model: a clear FloatingPointError, not a NaN logged and stepped on.
(tests/test_losses.py and tests/test_dispersion.py check the formulas themselves.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mallowspo.losses import LOSS_TYPES, MALLOWS_VARIANTS, preference_loss
from mallowspo.testing.tiny import tiny_run_settings
from mallowspo.training import reference
from mallowspo.training.config import MallowsPOConfig
from mallowspo.training.data import load_preference_dataset
from mallowspo.training.trainer import MallowsPOTrainer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def raw_data(tiny_prefs_path):
    return load_preference_dataset(str(tiny_prefs_path)).select(range(16))


def make_trainer(tiny_lm_dir, raw_data, tmp_path, dtype=torch.float32, **overrides):
    fields = dict(max_steps=2, per_device_train_batch_size=8, logging_steps=1)
    fields = tiny_run_settings(**{"output_dir": str(tmp_path / "out"), **fields, **overrides})
    return MallowsPOTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=dtype),
        args=MallowsPOConfig(**fields),
        train_dataset=raw_data,
        processing_class=AutoTokenizer.from_pretrained(tiny_lm_dir),
    )


def loss_and_gradients(trainer, batch=None):
    """The loss of the first batch and whether every gradient is finite (after one backward)."""
    batch = batch if batch is not None else next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = [p.grad for p in trainer.model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    return loss, all(bool(torch.isfinite(g).all()) for g in grads)


def with_entropy(monkeypatch, value_for_row):
    """Make the reference pass report the per-token entropy value_for_row(i) for pair i."""
    compute = reference.compute_reference_columns

    def fixed_entropy(model, dataset, *args, **kwargs):
        columns = compute(model, dataset, *args, **kwargs)
        entropy = np.array([value_for_row(i) for i in range(len(dataset))], dtype=np.float64)
        columns["ref_chosen_entropy"] = columns["ref_rejected_entropy"] = entropy
        columns["hbar"] = entropy / math.log(kwargs.get("vocab_size", args[3] if len(args) > 3 else 512))
        return columns

    monkeypatch.setattr(reference, "compute_reference_columns", fixed_entropy)


@pytest.mark.parametrize("mallows", ["theta", "phi"])
@pytest.mark.parametrize("clamp", [[0.05, 20.0], None], ids=["clamped", "no-clamp"])
def test_zero_reference_entropy_gives_a_bounded_dispersion(
    mallows, clamp, tiny_lm_dir, raw_data, tmp_path, mallowspo_cache, monkeypatch
):
    with_entropy(monkeypatch, lambda i: 0.0 if i % 2 == 0 else 3.0)  # a certain reference on half the prompts
    trainer = make_trainer(tiny_lm_dir, raw_data, tmp_path, mallows=mallows, dispersion_clamp=clamp)
    estimates = np.asarray(trainer.train_dataset["neg_log_phi"])
    assert np.isfinite(estimates).all() and (estimates > 0).all()
    assert estimates[0] == estimates.max() <= (20.0 if clamp else 13.82 * trainer.phi_star + 1e-9)  # -log 1e-6
    loss, finite_grads = loss_and_gradients(trainer)
    assert torch.isfinite(loss) and finite_grads
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


@pytest.mark.parametrize("mallows", ["theta", "phi"])
def test_phi_exactly_one_gives_log_2_and_finite_gradients(
    mallows, tiny_lm_dir, raw_data, tmp_path, mallowspo_cache, monkeypatch
):
    """Hbar = 1 (the reference at maximum entropy) with a fixed phi* and a clamp from 0: -log phi = 0."""
    with_entropy(monkeypatch, lambda i: math.log(512))
    trainer = make_trainer(
        tiny_lm_dir, raw_data, tmp_path, mallows=mallows, dispersion_normalization="0.29", dispersion_clamp=[0.0, 20.0]
    )
    assert np.asarray(trainer.train_dataset["neg_log_phi"]).max() == 0.0
    with torch.no_grad():  # move the policy off the reference, so the margins are not all 0
        for p in trainer.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    loss, finite_grads = loss_and_gradients(trainer)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and finite_grads


def test_phi_one_everywhere_with_mean_normalisation_is_a_clear_error(
    tiny_lm_dir, raw_data, tmp_path, mallowspo_cache, monkeypatch
):
    with_entropy(monkeypatch, lambda i: math.log(512))
    with pytest.raises(ValueError, match="at maximum entropy .* use a fixed phi_star"):
        make_trainer(tiny_lm_dir, raw_data, tmp_path, mallows="phi")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_model_trains_with_finite_values(dtype, tiny_lm_dir, raw_data, tmp_path, mallowspo_cache):
    trainer = make_trainer(tiny_lm_dir, raw_data, tmp_path, dtype=dtype, mallows="phi")
    assert next(trainer.model.parameters()).dtype == dtype
    for column in ("ref_chosen_logps", "ref_rejected_logps", "hbar", "neg_log_phi"):
        assert np.isfinite(trainer.train_dataset[column]).all(), column
    loss, finite_grads = loss_and_gradients(trainer)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and finite_grads
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


OBJECTIVES = [
    (loss_type, mallows)
    for loss_type in LOSS_TYPES
    for mallows in MALLOWS_VARIANTS
    if not (mallows == "phi" and loss_type in ("ipo", "hinge"))
]


def test_extreme_log_ratio_differences_through_the_trainer(tiny_lm_dir, raw_data, tmp_path, mallowspo_cache):
    """Reference log-probs shifted by +-1e4 so that the log-ratio difference is about +-2e4."""
    trainer = make_trainer(tiny_lm_dir, raw_data, tmp_path, mallows="phi")
    batch = next(iter(trainer.get_train_dataloader()))
    sign = torch.tensor([1.0, -1.0] * 4)
    batch["ref_chosen_logps"] = batch["ref_chosen_logps"] - 1e4 * sign
    batch["ref_rejected_logps"] = batch["ref_rejected_logps"] + 1e4 * sign
    for loss_type, mallows in OBJECTIVES:
        trainer.args.loss_type, trainer.args.mallows = [loss_type], mallows
        loss, finite_grads = loss_and_gradients(trainer, batch)
        assert torch.isfinite(loss) and finite_grads, (loss_type, mallows, loss)


@pytest.mark.parametrize("loss_type,mallows", OBJECTIVES)
def test_extreme_float16_log_ratios_give_finite_losses(loss_type, mallows):
    """float16 inputs (max 65504) are computed in float32: beta * 2e4 * L(x) would overflow.
    (For MallowsIPO, the authors' form's gradient 2 L (L Delta - 1 / (2 beta)) itself passes 65504 at
    Delta = 2e4 once L > 1, so L <= 1 there.)"""
    delta = torch.tensor([-1e4, -50.0, 0.0, 50.0, 1e4], dtype=torch.float16)
    chosen = delta.clone().requires_grad_(True)
    zeros = torch.zeros(5, dtype=torch.float16)
    out = preference_loss(
        chosen,
        -delta,
        zeros,
        zeros,
        loss_type=loss_type,
        mallows=mallows,
        beta=0.5,
        neg_log_phi=torch.tensor([1.0, 0.9, 0.5, 0.1, 0.01] if loss_type == "ipo" else [30.0, 9.0, 1.0, 0.5, 0.01]),
        chosen_lengths=torch.ones(5),
        rejected_lengths=torch.ones(5),
    ).losses
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all()), out
    out.sum().backward()
    assert bool(torch.isfinite(chosen.grad).all())


def test_nan_in_training_is_a_clear_error(tiny_lm_dir, raw_data, tmp_path, mallowspo_cache):
    trainer = make_trainer(tiny_lm_dir, raw_data, tmp_path, mallows="theta")
    with torch.no_grad():  # weights that went NaN (e.g. after a float16 overflow)
        trainer.model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"NaN or inf .*loss at step 0 \(training\) for 8 of 8 pairs"):
        trainer.train()
