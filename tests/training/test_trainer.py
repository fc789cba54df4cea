"""MallowsPOTrainer through its Python API: loss parity, references (copy, LoRA), metrics,
evaluation, outputs, resume. Tiny local models, a few steps each."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mallowspo.testing.tiny import tiny_run_settings
from mallowspo.training.config import MallowsPOConfig
from mallowspo.training.data import load_preference_dataset, prepare_preference_dataset
from mallowspo.training.head import add_completion_head
from mallowspo.training.loading import ensure_pad_token
from mallowspo.training.metrics import MetricAccumulator
from mallowspo.training.reference import compute_reference_columns
from mallowspo.training.trainer import MallowsPOTrainer

torch.set_num_threads(1)


def config(tmp_path, **overrides) -> MallowsPOConfig:
    fields = dict(max_steps=4, per_device_train_batch_size=8, per_device_eval_batch_size=16, logging_steps=2)
    return MallowsPOConfig(**tiny_run_settings(**{"output_dir": str(tmp_path / "out"), **fields, **overrides}))


@pytest.fixture(scope="module")
def raw_data(tiny_prefs_path):
    return load_preference_dataset(str(tiny_prefs_path)).select(range(64))


def make_trainer(tiny_lm_dir, raw_data, tmp_path, peft_config=None, **overrides):
    return MallowsPOTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
        args=config(tmp_path, **overrides),
        train_dataset=raw_data,
        processing_class=AutoTokenizer.from_pretrained(tiny_lm_dir),
        peft_config=peft_config,
    )


def first_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


@pytest.mark.parametrize("variant", [dict(mallows="theta"), dict(mallows="phi", phi_smoothing="sigmoid")])
def test_unit_dispersion_loss_equals_dpo(tiny_lm_dir, raw_data, tmp_path, mallowspo_cache, variant):
    """Theta with -log phi = 1 for every prompt (and phi under the sigmoid smoothing) is DPO, on the same batch."""
    dpo = make_trainer(tiny_lm_dir, raw_data, tmp_path / "dpo", mallows="none")
    mallows = make_trainer(
        tiny_lm_dir, raw_data, tmp_path / "m", dispersion_source="constant", dispersion_constant=1.0, **variant
    )
    batch = first_batch(mallows)
    assert torch.equal(batch["neg_log_phi"], torch.ones(8))
    with torch.no_grad():  # same initial weights; perturb the policy so the margins are not all 0
        for model in (dpo.model, mallows.model):
            torch.manual_seed(1)
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    loss_dpo, out_dpo = dpo.compute_loss(dpo.model, batch, return_outputs=True)
    loss_mallows, out_mallows = mallows.compute_loss(mallows.model, batch, return_outputs=True)
    assert out_dpo.preference.margins.abs().max() > 1e-3
    torch.testing.assert_close(out_mallows.losses, out_dpo.losses, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss_mallows, loss_dpo)


def test_lora_reference_is_the_adapter_disabled_model(tiny_lm_dir, raw_data, tmp_path, mallowspo_cache):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    full = make_trainer(tiny_lm_dir, raw_data, tmp_path / "full")
    trainer = make_trainer(tiny_lm_dir, raw_data, tmp_path, peft_config=lora, learning_rate=1e-2, max_steps=3)
    assert trainer.ref_model is None  # no second copy
    assert trainer.reference_results["train"].reused  # same reference weights as the full fine-tuning run
    assert trainer.reference_results["train"].cache_dir == full.reference_results["train"].cache_dir
    ref_columns = trainer.reference_results["train"].columns
    trainer.train()

    data = trainer.train_dataset
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)  # independent: a fresh base model
    add_completion_head(base)
    fresh = compute_reference_columns(base, data, trainer.data_collator, Accelerator(cpu=True), 16, 512)
    with trainer.model.disable_adapter():
        disabled = compute_reference_columns(
            trainer.model, data, trainer.data_collator, Accelerator(cpu=True), 16, 512
        )
    enabled = compute_reference_columns(trainer.model, data, trainer.data_collator, Accelerator(cpu=True), 16, 512)
    for name in ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_entropy"):
        np.testing.assert_allclose(ref_columns[name], fresh[name], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(disabled[name], fresh[name], rtol=1e-5, atol=1e-5)
    assert np.abs(enabled["ref_chosen_logps"] - fresh["ref_chosen_logps"]).max() > 1e-3  # the adapter trained


def test_online_reference_is_a_frozen_copy_of_the_initial_model(tiny_lm_dir, raw_data, tmp_path, mallowspo_cache):
    trainer = make_trainer(tiny_lm_dir, raw_data, tmp_path, precompute_ref_log_probs=False, mallows="theta")
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    initial = {k: v.clone() for k, v in trainer.ref_model.state_dict().items()}
    batch = first_batch(trainer)
    _, out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    torch.testing.assert_close(
        out.preference.chosen_rewards, torch.zeros(8), atol=1e-5, rtol=0
    )  # policy == reference at step 0
    trainer.train()
    assert all(torch.equal(v, trainer.ref_model.state_dict()[k]) for k, v in initial.items())
    _, out = trainer.compute_loss(trainer.model, first_batch(trainer), return_outputs=True)
    assert out.preference.chosen_rewards.abs().max() > 1e-4  # the policy moved away from the frozen copy


def test_simpo_with_mallows_uses_initial_policy_entropy(tiny_lm_dir, raw_data, tmp_path, mallowspo_cache, caplog):
    with caplog.at_level(logging.INFO, logger="mallowspo"):
        trainer = make_trainer(
            tiny_lm_dir, raw_data, tmp_path, loss_type="simpo", mallows="theta", beta=2.0, simpo_gamma=0.5, max_steps=2
        )
    assert trainer.ref_model is None
    assert "reference-free: the dispersion entropy comes from the initial policy weights" in caplog.text
    assert "neg_log_phi" in trainer.train_dataset.column_names
    trainer.train()
    assert trainer.state.log_history[-2]["mallows/neg_log_phi_mean"] > 0


def test_metric_accumulator_pools_examples():
    acc = MetricAccumulator()
    names = ["rewards/accuracies", "mallows/neg_log_phi"]
    assert acc.update(names, torch.tensor([[1.0, 0.5], [0.0, 2.0], [1.0, 1.0]]))  # micro-batch of 3
    assert acc.update(names, torch.tensor([[1.0, 0.5, 7.0]]))  # micro-batch of 1; column 3 only checked
    assert not acc.update(names, torch.tensor([[0.0, 0.5, float("nan")]]))  # a NaN anywhere: nothing added
    assert acc.pop() == {
        "rewards/accuracies": 0.75,  # per example, not the mean of the micro-batch means (0.83)
        "mallows/neg_log_phi_mean": pytest.approx(4.0 / 4),
        "mallows/neg_log_phi_min": 0.5,
        "mallows/neg_log_phi_max": 2.0,
    }
    assert acc.pop() == {}


def test_logged_metrics_with_accumulation_and_eval(tiny_lm_dir, raw_data, tmp_path, mallowspo_cache):
    args = config(
        tmp_path,
        gradient_accumulation_steps=2,
        max_steps=4,
        logging_steps=2,
        mallows="phi",
        eval_strategy="steps",
        eval_steps=4,
    )
    trainer = MallowsPOTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
        args=args,
        train_dataset=raw_data,
        eval_dataset=raw_data.select(range(20)),
        processing_class=AutoTokenizer.from_pretrained(tiny_lm_dir),
    )
    trainer.train()
    logs = trainer.state.log_history
    train_logs = [h for h in logs if "loss" in h]
    names = [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "mallows/neg_log_phi_mean",
        "mallows/neg_log_phi_min",
        "mallows/neg_log_phi_max",
        "mallows/ref_entropy_mean",
    ]
    assert len(train_logs) == 2 and all(name in train_logs[-1] for name in names)
    for log in train_logs:
        assert log["rewards/margins"] == pytest.approx(log["rewards/chosen"] - log["rewards/rejected"], abs=1e-6)
        assert log["mallows/neg_log_phi_min"] <= log["mallows/neg_log_phi_mean"] <= log["mallows/neg_log_phi_max"]
    eval_log = next(h for h in logs if "eval_loss" in h)
    assert all(f"eval_{name}" in eval_log for name in names)
    # the eval split uses the train split's phi*: its estimates are -phi* log Hbar with that phi*
    eval_data = trainer.eval_dataset
    expected = np.clip(-trainer.phi_star * np.log(np.asarray(eval_data["hbar"])), 0.05, 20.0)
    np.testing.assert_allclose(eval_data["neg_log_phi"], expected, rtol=1e-9)
    assert eval_log["eval_mallows/neg_log_phi_mean"] == pytest.approx(float(np.mean(expected)), rel=1e-5)


def test_save_model_writes_hf_model_card_config_and_dispersion(tiny_lm_dir, raw_data, tmp_path, mallowspo_cache):
    trainer = make_trainer(tiny_lm_dir, raw_data, tmp_path, max_steps=2)
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "README.md",
        "mallowspo_config.yaml",
        "dispersion.jsonl",
        "trainer_state.json",
    ):
        assert (out / name).is_file(), name
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    state = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert all(torch.equal(v, state[k]) for k, v in reloaded.state_dict().items())
    records = [json.loads(line) for line in (out / "dispersion.jsonl").read_text().splitlines()]
    assert len(records) == 64
    assert set(records[0]) == {
        "row_index",
        "prompt",
        "hbar",
        "neg_log_phi",
        "ref_chosen_entropy",
        "ref_rejected_entropy",
    }
    card = (out / "README.md").read_text()
    assert "MallowsPO-phi" in card and "phi*" in card and "dispersion.jsonl" in card
    import yaml

    resolved = yaml.safe_load((out / "mallowspo_config.yaml").read_text())
    assert resolved["training"]["mallows"] == "phi" and resolved["training"]["phi_star"] == pytest.approx(
        trainer.phi_star
    )


def test_plain_dpo_run_has_no_dispersion_metrics_or_file(tiny_lm_dir, raw_data, tmp_path, mallowspo_cache):
    trainer = make_trainer(tiny_lm_dir, raw_data, tmp_path, max_steps=2, logging_steps=1, mallows="none")
    assert "neg_log_phi" not in trainer.train_dataset.column_names
    trainer.train()
    trainer.save_model()
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert train_logs and "rewards/margins" in train_logs[-1]
    assert not [name for log in train_logs for name in log if name.startswith("mallows/")]
    assert not (tmp_path / "out" / "dispersion.jsonl").exists()


def test_resume_from_checkpoint_matches_uninterrupted_run(tiny_lm_dir, raw_data, tmp_path, mallowspo_cache):
    overrides = dict(max_steps=6, save_strategy="steps", save_steps=3, mallows="theta")
    full = make_trainer(tiny_lm_dir, raw_data, tmp_path / "a", **overrides)
    full.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-3"
    assert checkpoint.is_dir()

    resumed = make_trainer(tiny_lm_dir, raw_data, tmp_path / "b", **overrides)
    assert resumed.reference_results["train"].reused  # the cache serves the resumed run
    resumed.train(resume_from_checkpoint=str(checkpoint))
    final_a = load_file(tmp_path / "a" / "out" / "checkpoint-6" / "model.safetensors")
    final_b = load_file(tmp_path / "b" / "out" / "checkpoint-6" / "model.safetensors")
    for name, tensor in final_a.items():
        torch.testing.assert_close(final_b[name], tensor, rtol=0, atol=1e-6)


def test_tokenizer_without_pad_token_uses_eos(tiny_lm_dir, caplog):
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    tokenizer.pad_token = None
    with caplog.at_level(logging.WARNING, logger="mallowspo"):
        ensure_pad_token(tokenizer)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert "no pad token" in caplog.text


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(beta=0.0), "beta must be > 0"),
        (dict(loss_type="kto"), "unknown loss_type"),
        (dict(mallows="kendall"), "unknown Mallows variant"),
        (dict(smoothing_eps="-0.1"), "smoothing_eps must be > 0"),
        (dict(smoothing_eps="wide"), "a number or 'adaptive'"),
        (dict(dispersion_clamp=[2.0, 1.0]), "min <= max"),
        (dict(max_length=64, max_prompt_length=64), "must exceed max_prompt_length"),
        (dict(dispersion_source="column"), "dispersion_column and dispersion_source='column' go together"),
        (dict(dispersion_source="oracle"), "unknown dispersion_source"),
        (dict(dispersion_normalization="median"), "'mean'"),
        (dict(loss_type="ipo", mallows="phi"), "mallows='phi' replaces the logistic link"),
    ],
)
def test_config_rejects_invalid_values(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        MallowsPOConfig(output_dir=str(tmp_path), **fields)


def test_config_builds_the_data_config(tmp_path):
    args = MallowsPOConfig(
        output_dir=str(tmp_path),
        max_length=100,
        max_prompt_length=40,
        max_completion_length=30,
        strict_validation=False,
        dispersion_source="column",
        dispersion_column="d",
        smoothing_eps="0.1",
        dispersion_normalization="0.29",
    )
    data = args.to_data_config()
    assert (
        data.max_length,
        data.max_prompt_length,
        data.max_completion_length,
        data.strict,
        data.dispersion_column,
    ) == (100, 40, 30, False, "d")
    assert args.smoothing_eps == 0.1 and args.dispersion_normalization == 0.29


@pytest.mark.parametrize(
    "fields, runs",
    [
        (dict(mallows="none", precompute_ref_log_probs=True), True),  # reference log-probs precomputed
        (dict(mallows="none", precompute_ref_log_probs=False), False),  # DPO with an online reference: no pass
        (dict(mallows="theta", precompute_ref_log_probs=False), True),  # the entropy is always precomputed
        (dict(mallows="theta", dispersion_source="constant", precompute_ref_log_probs=False), False),
        (dict(loss_type="simpo", mallows="none"), False),  # reference-free, no dispersion
        (dict(loss_type="simpo", mallows="theta"), True),  # reference-free, entropy of the initial policy
    ],
)
def test_when_the_reference_pass_runs(tmp_path, fields, runs):
    assert MallowsPOConfig(output_dir=str(tmp_path), **fields).runs_reference_pass is runs


@pytest.mark.parametrize(
    "fields, ignored",
    [
        (
            dict(mallows="theta", phi_smoothing="sigmoid"),
            "phi_smoothing='sigmoid' is ignored: it smooths the phi link",
        ),
        (dict(mallows="phi", phi_smoothing="sigmoid", smoothing_eps="0.3"), "smoothing_eps=0.3 is ignored"),
        (dict(mallows="none", dispersion_normalization="0.29"), "is ignored: mallows='none' uses no dispersion"),
        (dict(mallows="theta", dispersion_source="constant", dispersion_clamp=[0.1, 5]), "dispersion_clamp="),
        (dict(mallows="theta", dispersion_constant=2.0), "dispersion_constant=2.0 is ignored"),
        (dict(loss_type="ipo", mallows="theta", simpo_gamma=1.0), "simpo_gamma=1.0 is ignored"),
    ],
)
def test_config_warns_about_settings_the_mode_ignores(tmp_path, caplog, fields, ignored):
    with caplog.at_level(logging.WARNING, logger="mallowspo"):
        config(tmp_path, **fields)
    assert any(ignored in record.getMessage() for record in caplog.records), caplog.text


def test_config_does_not_warn_about_settings_in_use(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mallowspo"):
        config(tmp_path, mallows="phi", phi_smoothing="cubic", smoothing_eps="adaptive", dispersion_clamp=[0.1, 5])
        config(tmp_path, mallows="theta", dispersion_source="constant", dispersion_constant=2.0)
        config(tmp_path, loss_type="simpo", mallows="none", simpo_gamma=1.0)
    assert not [r for r in caplog.records if "is ignored" in r.getMessage()], caplog.text


def test_trainer_takes_run_metadata_and_reports_in_its_constructor(tiny_lm_dir, raw_data, tmp_path, mallowspo_cache):
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    args = config(tmp_path, max_steps=1, mallows="theta")
    tokenized, report = prepare_preference_dataset(raw_data, tokenizer, args.to_data_config(), name="train")
    trainer = MallowsPOTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
        args=args,
        train_dataset=tokenized,
        processing_class=tokenizer,
        run_metadata={"model": {"model_name_or_path": "my-base"}, "data": {"dataset_name": "my-data"}},
        validation_reports={"train": report},
    )
    assert not (tmp_path / "out" / "dispersion.jsonl").exists()  # nothing is written before the final save
    trainer.train()
    trainer.save_model()
    import yaml

    resolved = yaml.safe_load((tmp_path / "out" / "mallowspo_config.yaml").read_text())
    assert resolved["model"] == {"model_name_or_path": "my-base"} and resolved["data"]["dataset_name"] == "my-data"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "`my-base`" in card and "`my-data`" in card and "64 rows, 64 kept" in card
