"""The reference pass: exact values against a naive full-logits computation, the cache key,
reuse and invalidation, atomic writes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from mallowspo.training.collate import PreferenceCollator
from mallowspo.training.data import PreferenceDataConfig, load_preference_dataset, prepare_preference_dataset
from mallowspo.training.head import add_completion_head
from mallowspo.training.reference import compute_reference_columns, load_or_compute_reference_columns
from mallowspo.training.reference_cache import (
    cache_dir_for,
    read_cache,
    token_fingerprint,
    weights_fingerprint,
    write_cache_atomically,
)

torch.set_num_threads(1)

DATA_CONFIG = PreferenceDataConfig(max_length=48, max_prompt_length=24)


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir):
    return AutoTokenizer.from_pretrained(tiny_lm_dir)


@pytest.fixture(scope="module")
def dataset(tiny_prefs_path, tokenizer):
    raw = load_preference_dataset(str(tiny_prefs_path)).select(range(24))
    return prepare_preference_dataset(raw, tokenizer, DATA_CONFIG)[0]


def load_patched(path, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    add_completion_head(model)
    return model.eval()


def naive_scores(model, prompt_ids, completion_ids):
    """Summed log-prob and mean entropy of one completion from the full float64 logits, unpadded."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()  # (T, V), the model's own (unfused) forward
    log_p = torch.log_softmax(logits, dim=-1)
    start = len(prompt_ids)
    positions = torch.arange(start - 1, ids.size(1) - 1)  # position t predicts token t + 1
    targets = ids[0, start:]
    logp = log_p[positions, targets].sum()
    entropy = -(log_p[positions].exp() * log_p[positions]).sum(-1).mean()
    return float(logp), float(entropy)


def test_reference_pass_equals_naive_full_logits_float64(tiny_lm_dir, dataset, tokenizer):
    """A float64 model; the naive side is exact float64, and so is the CPU completion head."""
    model = load_patched(tiny_lm_dir, torch.float64)
    columns = compute_reference_columns(
        model,
        dataset,
        PreferenceCollator(tokenizer.pad_token_id),
        Accelerator(cpu=True),
        batch_size=5,
        vocab_size=model.config.vocab_size,  # 5 does not divide 24: a short last batch
    )
    for i, row in enumerate(dataset):
        for side in ("chosen", "rejected"):
            logp, entropy = naive_scores(model, row["prompt_input_ids"], row[f"{side}_input_ids"])
            assert columns[f"ref_{side}_logps"][i] == pytest.approx(logp, rel=1e-12, abs=1e-12)
            assert columns[f"ref_{side}_entropy"][i] == pytest.approx(entropy, rel=1e-12, abs=1e-12)
        hbar = (
            0.5
            * (columns["ref_chosen_entropy"][i] + columns["ref_rejected_entropy"][i])
            / math.log(model.config.vocab_size)
        )
        assert columns["hbar"][i] == pytest.approx(hbar, abs=1e-12)


def test_batch_size_and_padding_do_not_change_the_pass(tiny_lm_dir, dataset, tokenizer):
    model = load_patched(tiny_lm_dir)
    collator = PreferenceCollator(tokenizer.pad_token_id)
    one = compute_reference_columns(model, dataset, collator, Accelerator(cpu=True), 1, model.config.vocab_size)
    many = compute_reference_columns(model, dataset, collator, Accelerator(cpu=True), 7, model.config.vocab_size)
    for name in one:
        np.testing.assert_allclose(one[name], many[name], rtol=1e-5, atol=1e-5)


def test_token_fingerprint_tracks_tokens_only(dataset):
    same = dataset.map(lambda row: row)  # a new dataset object with the same tokens
    assert token_fingerprint(same) == token_fingerprint(dataset)
    changed = dataset.map(
        lambda row, i: {"chosen_input_ids": row["chosen_input_ids"][:-1]} if i == 3 else {}, with_indices=True
    )
    assert token_fingerprint(changed) != token_fingerprint(dataset)
    assert token_fingerprint(dataset.select(range(23))) != token_fingerprint(dataset)


def test_peft_weights_fingerprint_ignores_the_adapter(tiny_lm_dir):
    from peft import LoraConfig, get_peft_model

    def peft_model(seed, perturb=False):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
        if perturb:
            with torch.no_grad():
                model.model.norm.weight.add_(1.0)
        peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        return peft

    assert weights_fingerprint(peft_model(0)) == weights_fingerprint(peft_model(1))  # adapters differ
    assert weights_fingerprint(peft_model(0)) != weights_fingerprint(peft_model(0, perturb=True))


def test_cache_reuse_and_invalidation(tiny_lm_dir, dataset, tokenizer, mallowspo_cache):
    model = load_patched(tiny_lm_dir)
    collator = PreferenceCollator(tokenizer.pad_token_id)

    def run(data=dataset, weights="w0", tok=tokenizer, settings=DATA_CONFIG):
        return load_or_compute_reference_columns(
            model,
            data,
            collator,
            Accelerator(cpu=True),
            batch_size=8,
            weights=weights,
            tokenizer=tok,
            data_settings=settings,
        )

    first = run()
    assert not first.reused and first.cache_dir.is_dir()
    again = run()
    assert again.reused and again.cache_dir == first.cache_dir
    for name in first.columns:
        np.testing.assert_array_equal(first.columns[name], again.columns[name])

    other_template = AutoTokenizer.from_pretrained(tiny_lm_dir)
    other_template.chat_template = "{{ messages }}"
    changed = {
        "weights": run(weights="w1"),
        "tokenizer": run(tok=other_template),
        "settings": run(settings=PreferenceDataConfig(max_length=40, max_prompt_length=24)),
        "tokens": run(data=dataset.select(range(20))),
    }
    for what, result in changed.items():
        assert not result.reused, what
    assert len({r.cache_dir for r in changed.values()} | {first.cache_dir}) == 5


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    columns = {
        name: np.arange(3.0)
        for name in ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_entropy", "ref_rejected_entropy", "hbar")
    }
    path = cache_dir_for("k", tmp_path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies in the middle of writing

    monkeypatch.setattr(np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        write_cache_atomically(path, columns, {})
    assert not path.exists() and read_cache(path) is None
    monkeypatch.undo()

    write_cache_atomically(path, columns, {"k": 1})
    assert read_cache(path) is not None
    write_cache_atomically(path, {k: v + 1 for k, v in columns.items()}, {"k": 2})  # a concurrent writer: first wins
    np.testing.assert_array_equal(read_cache(path)["hbar"], np.arange(3.0))
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
