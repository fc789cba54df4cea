"""TRL DPOConfig keys: each is used with trl 1.16's meaning or refused in one line; none is silently ignored."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import DPOConfig

from mallowspo import MallowsPOConfig, MallowsPOTrainer
from mallowspo.testing.tiny import tiny_run_settings
from mallowspo.training.collate import PreferenceCollator


def config(tmp_path, **settings):
    return MallowsPOConfig(output_dir=str(tmp_path / "out"), **settings)


def test_every_trl_dpo_key_is_a_mallowspo_key():
    # the rest of a TRL DPO recipe parses: MallowsPOConfig has every DPOConfig field (the model and data ones
    # TRL puts in ModelConfig/ScriptArguments are ModelArguments/ScriptArguments fields, tested by the CLI)
    ours = {f.name for f in dataclasses.fields(MallowsPOConfig)}
    missing = {f.name for f in dataclasses.fields(DPOConfig)} - ours - {"trust_remote_code"}
    assert not missing


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(ld_alpha=0.5), "ld_alpha=0.5 is not supported: LD-DPO"),
        (dict(use_weighting=True), "use_weighting=True is not supported: WPO"),
        (dict(activation_offloading=True), "activation_offloading=True is not supported"),
        (dict(sync_ref_model=True), "sync_ref_model=True is not supported: TR-DPO moves the reference"),
        (dict(pad_token="<pad>"), "pad_token='<pad>' is not supported: TRL deprecated it"),
        (dict(f_divergence_type="js_divergence"), "f_divergence_type='js_divergence' is not supported"),
        (dict(ref_model_sync_steps=64), "ref_model_sync_steps is only read with sync_ref_model=True"),
        (dict(discopop_tau=0.1), "discopop_tau is only read with loss_type='discopop'"),
        (dict(f_alpha_divergence_coef=0.3), "f_alpha_divergence_coef is only read with f_divergence_type"),
        (dict(loss_type=["discopop"]), "loss_type 'discopop' (DiscoPOP) is one of TRL's that MallowsPO does not"),
        (dict(loss_type="sigmoid_norm"), "here: loss_type sigmoid with length_normalize: true"),
        (dict(dataset_num_proc=0), "dataset_num_proc must be >= 1"),
        (dict(router_aux_loss_coef=-1.0), "router_aux_loss_coef must be >= 0"),
        (dict(model_init_kwargs="{not json"), "model_init_kwargs must be a JSON object"),
        (dict(model_init_kwargs="[1, 2]"), "model_init_kwargs must be a JSON object"),
        (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights has 1 values for 2 loss types"),
    ],
)
def test_trl_keys_without_a_mallowspo_meaning_are_refused_in_one_line(settings, message, tmp_path):
    with pytest.raises(ValueError) as error:
        config(tmp_path, **settings)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_trl_forms_of_the_keys(tmp_path):
    args = config(
        tmp_path, loss_type="ipo", mallows="theta", model_init_kwargs='{"dtype": "bfloat16", "revision": "main"}'
    )
    assert args.loss_type == ["ipo"]  # TRL's single name is a list of one
    assert args.model_init_kwargs == {"dtype": "bfloat16", "revision": "main"}
    assert not args.bf16  # TRL turns bf16 on by default where a GPU can; on CPU it would refuse to start


def test_use_liger_kernel_is_guarded(tmp_path, monkeypatch):
    import importlib.util

    with pytest.raises(ValueError, match="use_liger_kernel needs the liger-kernel package"):
        config(tmp_path, use_liger_kernel=True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: object() if name == "liger_kernel" else real_find_spec(name)
    )
    with pytest.raises(ValueError, match="fused_linear_cross_entropy=true is not supported: it replaces the model's"):
        config(tmp_path, use_liger_kernel=True, liger_kernel_config={"fused_linear_cross_entropy": True})
    args = config(tmp_path, use_liger_kernel=True, liger_kernel_config={"rms_norm": True})
    assert args.liger_kernel_config == {"rms_norm": True, "fused_linear_cross_entropy": False}


def test_label_smoothing_differences_are_said(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mallowspo"):
        config(tmp_path, loss_type="sigmoid", label_smoothing=0.1)
        config(tmp_path, loss_type="hinge", label_smoothing=0.1, mallows="none")
    text = caplog.text
    assert "label_smoothing=0.1 with sigmoid is conservative DPO (cDPO) here" in text
    assert "trl 1.16's DPOTrainer reads label_smoothing only for robust" in text
    assert "label_smoothing=0.1 is ignored: it smooths the likelihood losses" in text


def test_trainer_takes_dpotrainers_arguments(tiny_lm_dir, tiny_prefs_path, tmp_path, mallowspo_cache):
    import datasets

    rows = datasets.load_dataset("json", data_files=str(tiny_prefs_path), split="train").select(range(8))
    seen = []

    class CountingCollator(PreferenceCollator):
        def __call__(self, batch_rows):
            seen.append(len(batch_rows))
            return super().__call__(batch_rows)

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer = MallowsPOTrainer(
        model=str(tiny_lm_dir),  # a path, loaded with model_init_kwargs
        args=config(
            tmp_path,
            **tiny_run_settings(max_steps=1, per_device_train_batch_size=4, mallows="none"),
            model_init_kwargs={"dtype": "float64"},
        ),
        train_dataset=rows,
        data_collator=CountingCollator(pad_token_id=0),
    )
    assert trainer.model.dtype == torch.float64
    trained = MallowsPOTrainer(
        model=model,
        args=MallowsPOConfig(
            output_dir=str(tmp_path / "out2"),
            **tiny_run_settings(max_steps=1, per_device_train_batch_size=4, mallows="none"),
        ),
        train_dataset=rows,
        data_collator=CountingCollator(pad_token_id=0),
        optimizers=(optimizer, scheduler),
    )
    seen.clear()
    trained.train()
    assert getattr(trained.optimizer, "optimizer", trained.optimizer) is optimizer  # accelerate wraps it
    assert seen and all(n == 4 for n in seen)  # the given collator batched the rows


def test_dataset_num_proc_is_said_to_have_no_effect(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mallowspo"):
        config(tmp_path, dataset_num_proc=4)
    assert "dataset_num_proc=4 has no effect" in caplog.text


def test_test_split_size_holds_out_seeded_training_rows(tiny_prefs_path):
    from mallowspo.training.arguments import ScriptArguments

    share = ScriptArguments(dataset_name=str(tiny_prefs_path), test_split_size=0.2)
    train, held_out = share.load_splits(seed=0)
    assert (len(train), len(held_out)) == (240, 60) and share.evaluates
    rows = lambda d: sorted(zip(d["prompt"], d["chosen"], d["rejected"]))  # noqa: E731
    everything = ScriptArguments(dataset_name=str(tiny_prefs_path)).load_splits(seed=0)[0]
    assert sorted(rows(train) + rows(held_out)) == rows(everything)  # a partition of the training rows
    again_train, again_held = share.load_splits(seed=0)
    assert again_held["prompt"] == held_out["prompt"]  # the seed decides
    assert share.load_splits(seed=1)[1]["prompt"] != held_out["prompt"]
    count = ScriptArguments(dataset_name=str(tiny_prefs_path), test_split_size=25)
    assert len(count.load_splits(seed=0)[1]) == 25


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(test_split_size=0.0), "test_split_size must be a share in (0, 1) or a row count >= 1"),
        (dict(test_split_size=0.1, dataset_test_split="test"), "test_split_size holds out evaluation rows"),
        (dict(dataset_streaming=True), "dataset_streaming=true is not supported"),
    ],
)
def test_bad_data_selection_keys(settings, message, tiny_prefs_path):
    from mallowspo.training.arguments import ScriptArguments

    with pytest.raises(ValueError) as error:
        ScriptArguments(dataset_name=str(tiny_prefs_path), **settings)
    assert message in str(error.value)


def test_dataset_config_is_for_hub_datasets(tiny_prefs_path):
    from mallowspo.training.arguments import ScriptArguments
    from mallowspo.training.data import DataValidationError

    args = ScriptArguments(dataset_name=str(tiny_prefs_path), dataset_config="default")
    with pytest.raises(DataValidationError, match="dataset_config='default' names a configuration of a hub dataset"):
        args.load_splits(seed=0)
