"""Reliability, outputs: what the reference pass reuses, the dispersion it hands on, and what a
save leaves behind when the disk is full.

- A cache entry holding values no reference pass gives (NaN, inf, Hbar outside [0, 1], a
  negative entropy, a positive log-prob) is damaged: logged with its path, recomputed, replaced.
- An entropy estimate that carries no information (a random-init reference: Hbar ~ 1 with a
  spread of 1e-4) is one warning with the spread and the fix.
- A save that fills the disk is one OSError(ENOSPC) naming the directory, and leaves no
  half-written model behind (final save and checkpoints).
"""

from __future__ import annotations

import dataclasses
import errno
import logging

import numpy as np
import pytest
import safetensors
import torch
import transformers.modeling_utils
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from mallowspo.cli.errors import is_user_facing, one_line
from mallowspo.dispersion import UNINFORMATIVE_MEAN_HBAR, UNINFORMATIVE_SPREAD, uninformative_entropy
from mallowspo.testing.tiny import tiny_run_settings
from mallowspo.training import outputs
from mallowspo.training.config import MallowsPOConfig
from mallowspo.training.data import PreferenceDataConfig, load_preference_dataset, prepare_preference_dataset
from mallowspo.training.outputs import disk_full_errno
from mallowspo.training.reference_cache import (
    REFERENCE_COLUMNS,
    cache_dir_for,
    reference_cache_key,
    token_fingerprint,
    tokenizer_fingerprint,
    weights_fingerprint,
    write_cache_atomically,
)
from mallowspo.training.trainer import MallowsPOTrainer

torch.set_num_threads(1)

DATA = PreferenceDataConfig(max_length=48, max_prompt_length=24)


@pytest.fixture(scope="module")
def raw(tiny_prefs_path):
    return load_preference_dataset(str(tiny_prefs_path)).select(range(16))


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir), AutoTokenizer.from_pretrained(tiny_lm_dir)


# ---------------------------------------------------------------------------------------
# 1. A reference-cache entry with impossible values is recomputed
# ---------------------------------------------------------------------------------------


@pytest.fixture
def run_pass(reference_pass):
    """run_pass(raw, lm): the shared reference pass with this file's data settings."""
    return lambda raw, lm: reference_pass(raw, lm[1], lm[0], DATA)


def test_nan_cache_entry_at_the_pass_key_is_recomputed_not_reused(raw, lm, mallowspo_cache, caplog, run_pass):
    model, tokenizer = lm
    dataset, _ = prepare_preference_dataset(raw, tokenizer, DATA)
    key, components = reference_cache_key(  # the key the pass computes for these inputs
        token_fingerprint(dataset),
        weights_fingerprint(model),
        tokenizer_fingerprint(tokenizer),
        dataclasses.asdict(DATA),
        str(Accelerator(cpu=True).mixed_precision),
    )
    path = cache_dir_for(key)
    write_cache_atomically(path, {name: np.full(len(dataset), np.nan) for name in REFERENCE_COLUMNS}, components)
    with caplog.at_level(logging.WARNING, logger="mallowspo"):
        result, _ = run_pass(raw, lm)
    assert result.cache_dir == path and not result.reused
    assert f"reference cache entry {path} is damaged" in caplog.text, caplog.text
    assert "ref_chosen_logps holds NaN or inf in 16 of 16 rows" in caplog.text and "recomputing it" in caplog.text
    for values in result.columns.values():
        assert np.isfinite(values).all()
    with pytest.MonkeyPatch.context() as patch:  # the same pass with an empty cache
        patch.setenv("MALLOWSPO_CACHE", str(mallowspo_cache.parent / "fresh_cache"))
        fresh, _ = run_pass(raw, lm)
    assert not fresh.reused
    for name, values in fresh.columns.items():
        np.testing.assert_array_equal(result.columns[name], values)
    again, _ = run_pass(raw, lm)  # the entry was replaced by the recomputed one
    assert again.reused
    for name, values in fresh.columns.items():
        np.testing.assert_array_equal(again.columns[name], values)


DAMAGES = {
    "inf log-prob": ("ref_rejected_logps", 3, np.inf, "ref_rejected_logps holds NaN or inf in 1 of 16 rows"),
    "hbar above 1": ("hbar", 0, 1.5, "hbar is outside [0, 1] in 1 of 16 rows"),
    "hbar below 0": ("hbar", 7, -0.2, "hbar is outside [0, 1] in 1 of 16 rows"),
    "negative entropy": ("ref_chosen_entropy", 2, -1.0, "ref_chosen_entropy is negative in 1 of 16 rows"),
    "positive log-prob": ("ref_chosen_logps", 5, 4.0, "ref_chosen_logps is positive in 1 of 16 rows"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_cache_entry_with_impossible_values_is_recomputed_and_replaced(
    damage, raw, lm, mallowspo_cache, caplog, run_pass
):
    column, row, value, expected = DAMAGES[damage]
    first, _ = run_pass(raw, lm)
    columns = {name: values.copy() for name, values in first.columns.items()}
    columns[column][row] = value
    np.savez(first.cache_dir / "columns.npz", **columns)
    with caplog.at_level(logging.WARNING, logger="mallowspo"):
        second, _ = run_pass(raw, lm)
    assert not second.reused
    assert f"reference cache entry {first.cache_dir} is damaged ({expected}); recomputing it" in caplog.text
    third, _ = run_pass(raw, lm)
    assert third.reused
    for name, values in first.columns.items():
        np.testing.assert_array_equal(second.columns[name], values)
        np.testing.assert_array_equal(third.columns[name], values)


# ---------------------------------------------------------------------------------------
# 2. An entropy estimate without information is a warning
# ---------------------------------------------------------------------------------------


def config(tmp_path, **overrides) -> MallowsPOConfig:
    fields = dict(max_steps=1, per_device_train_batch_size=8, per_device_eval_batch_size=8, logging_steps=1)
    return MallowsPOConfig(**tiny_run_settings(**{"output_dir": str(tmp_path / "out"), **fields, **overrides}))


def make_trainer(tiny_lm_dir, raw, tmp_path, eval_dataset=None, **overrides):
    return MallowsPOTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
        args=config(tmp_path, **overrides),
        train_dataset=raw,
        eval_dataset=eval_dataset,
        processing_class=AutoTokenizer.from_pretrained(tiny_lm_dir),
    )


def entropy_warnings(caplog):
    return [r for r in caplog.records if "cannot rank prompts" in r.getMessage()]


def test_random_init_reference_warns_once_that_its_entropies_cannot_rank_prompts(
    tiny_lm_dir, raw, tiny_prefs_path, tmp_path, mallowspo_cache, caplog
):
    evaluation = load_preference_dataset(str(tiny_prefs_path)).select(range(16, 24))
    with caplog.at_level(logging.WARNING, logger="mallowspo"):
        trainer = make_trainer(tiny_lm_dir, raw, tmp_path, eval_dataset=evaluation, mallows="theta")
    hbar = np.asarray(trainer.train_dataset["hbar"])
    assert hbar.min() > 0.99 and hbar.std() < 1e-3  # the tiny Llama is random-init
    (record,) = entropy_warnings(caplog)  # one warning, from the train split only
    message = record.getMessage()
    assert record.levelno == logging.WARNING and record.name.startswith("mallowspo")
    assert message.startswith("dispersion (train): the reference model's entropies cannot rank prompts: Hbar = 0.99")
    assert f"over {len(raw)} pairs" in message and "next-token distributions near uniform" in message
    neg_log_phi = np.asarray(trainer.train_dataset["neg_log_phi"])
    assert f"-log phi(x) in [{neg_log_phi.min():.3g}, {neg_log_phi.max():.3g}]" in message
    assert "a trained (SFT) reference model" in message and "--dispersion_source constant" in message


@pytest.mark.parametrize(
    "settings", [dict(mallows="theta", dispersion_source="constant"), dict(mallows="none")], ids=["constant", "dpo"]
)
def test_no_entropy_warning_when_the_estimate_is_not_used(
    tiny_lm_dir, raw, tmp_path, mallowspo_cache, caplog, settings
):
    with caplog.at_level(logging.WARNING, logger="mallowspo"):
        make_trainer(tiny_lm_dir, raw, tmp_path, **settings)
    assert not entropy_warnings(caplog), caplog.text


def estimate(hbar):
    raw = -np.log(hbar)
    return raw / raw.mean()


def test_spread_out_entropies_are_informative():
    """Hbar of a trained model: the built-in world's SFT model spans 0.009-0.26 (CV of -log Hbar 0.43)."""
    rng = np.random.default_rng(0)
    for hbar in (np.geomspace(0.009, 0.26, 200), rng.uniform(0.05, 0.6, 50), np.array([0.3])):
        assert uninformative_entropy(hbar, estimate(hbar)) is None


@pytest.mark.parametrize(
    "hbar, reason",
    [
        (0.9976 + 7.5e-5 * np.random.default_rng(0).standard_normal(64), "near uniform"),  # the tiny random-init Llama
        (0.968 + 2.4e-3 * np.random.default_rng(1).standard_normal(64), "near uniform"),  # random-init, hidden 1024
        (0.95 + 0.02 * np.random.default_rng(2).standard_normal(64), "near uniform"),  # spread, but near the maximum
        (0.1 * np.exp(1e-3 * np.random.default_rng(3).standard_normal(64)), "varies by"),  # far from it, but flat
    ],
    ids=["random-init", "random-init-wide", "high", "flat"],
)
def test_flat_or_near_uniform_entropies_are_uninformative(hbar, reason):
    message = uninformative_entropy(hbar, estimate(hbar))
    assert message is not None and reason in message
    assert f"Hbar = {hbar.mean():.4f} +- {hbar.std():.2g} over 64 pairs" in message
    assert f"[{estimate(hbar).min():.3g}, {estimate(hbar).max():.3g}]" in message


def test_thresholds_separate_random_init_from_trained():
    """The measured numbers in mallowspo.dispersion: random-init CV 0.031-0.078 and mean Hbar >= 0.968;
    the trained world model mean 0.10, CV 0.43."""
    assert 0.101 < UNINFORMATIVE_MEAN_HBAR < 0.968
    assert 0.031 < UNINFORMATIVE_SPREAD < 0.43


# ---------------------------------------------------------------------------------------
# 3. A full disk at a save
# ---------------------------------------------------------------------------------------

DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors 0.8


@pytest.fixture
def full_disk_at_safetensors(monkeypatch):
    """``save_pretrained``'s safetensors writer writes part of the file, then finds the disk full."""
    calls = []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        with open(filename, "wb") as f:
            f.write(b"\x00" * 4096)  # a partial file, as a writer killed mid-way leaves it
        raise safetensors.SafetensorError(DISK_FULL)

    assert transformers.modeling_utils.safe_save_file is not None  # the call site in save_pretrained
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    return calls


def files_in(path):
    return sorted(p.name for p in path.iterdir() if p.is_file()) if path.exists() else []


def assert_one_line_disk_full(error, directory):
    assert error.errno == errno.ENOSPC
    text = one_line(error)
    assert is_user_facing(error) and "\n" not in str(error)
    assert f"to {directory} (No space left on device)" in text and "Free some space" in text
    return text


def test_disk_full_at_the_final_save_is_one_oserror_and_leaves_no_model(
    tiny_lm_dir, raw, tmp_path, mallowspo_cache, full_disk_at_safetensors
):
    trainer = make_trainer(tiny_lm_dir, raw, tmp_path, mallows="theta")
    out = tmp_path / "out"
    before = files_in(out)
    with pytest.raises(OSError) as caught:
        trainer.save_model()
    assert full_disk_at_safetensors and full_disk_at_safetensors[0].endswith("model.safetensors")
    text = assert_one_line_disk_full(caught.value, out)
    assert text.startswith("not enough disk space to save the final model to ")
    assert "the files it had written there were removed" in text
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    assert files_in(out) == before  # nothing of the failed save is left (config.json, generation_config.json)


def test_disk_full_at_the_final_save_over_an_earlier_one_removes_the_overwritten_model(
    tiny_lm_dir, raw, tmp_path, mallowspo_cache, monkeypatch
):
    trainer = make_trainer(tiny_lm_dir, raw, tmp_path, mallows="theta")
    out = tmp_path / "out"
    trainer.save_model()  # a complete earlier save
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()

    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 4096)
        raise safetensors.SafetensorError(DISK_FULL)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    with pytest.raises(OSError) as caught:
        trainer.save_model()
    assert_one_line_disk_full(caught.value, out)
    assert not (out / "model.safetensors").exists()  # the overwritten (half-written) model is gone


def test_disk_full_at_a_checkpoint_removes_it_and_is_one_oserror(
    tiny_lm_dir, raw, tmp_path, mallowspo_cache, full_disk_at_safetensors
):
    trainer = make_trainer(tiny_lm_dir, raw, tmp_path, mallows="theta", save_strategy="steps", save_steps=1)
    checkpoint = tmp_path / "out" / "checkpoint-1"
    with pytest.raises(OSError) as caught:
        trainer.train()
    assert full_disk_at_safetensors == [str(checkpoint / "model.safetensors")]
    text = assert_one_line_disk_full(caught.value, checkpoint)
    assert text.startswith("not enough disk space to save a checkpoint to ")
    assert "the partial checkpoint was removed" in text
    assert not checkpoint.exists()


def test_disk_full_is_recognised_from_every_writer(tmp_path, monkeypatch):
    assert disk_full_errno(OSError(errno.ENOSPC, "No space left on device"), tmp_path) == errno.ENOSPC
    assert disk_full_errno(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path) == errno.EDQUOT
    assert disk_full_errno(safetensors.SafetensorError(DISK_FULL), tmp_path) == errno.ENOSPC
    quota = "Error while serializing: I/O error: Disk quota exceeded (os error 122)"
    assert disk_full_errno(safetensors.SafetensorError(quota), tmp_path) == errno.EDQUOT
    try:  # a disk-full OSError under another error
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("could not save") from inner
    except RuntimeError as wrapped:
        assert disk_full_errno(wrapped, tmp_path) == errno.ENOSPC
    for other in (OSError(errno.EACCES, "Permission denied"), ValueError("bad"), RuntimeError("boom (os error 2)")):
        assert disk_full_errno(other, tmp_path) is None
    torch_full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # torch.save
    assert disk_full_errno(torch_full, tmp_path) is None  # this disk has room: not a full disk
    monkeypatch.setattr(outputs, "_free_bytes", lambda directory: 0)
    assert disk_full_errno(torch_full, tmp_path) == errno.ENOSPC
    assert disk_full_errno(RuntimeError("some other failure"), tmp_path) is None
